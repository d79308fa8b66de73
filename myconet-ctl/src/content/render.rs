//! Human output of the `content` commands: pure functions from proto messages to text.

use myconet_proto::content::v1 as pb;

use crate::render::{Align, table};

/// `1.5 MiB`, `200 B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn state(p: &pb::Package) -> String {
    if p.complete {
        "complete".into()
    } else {
        match p
            .verified_bytes
            .saturating_mul(100)
            .checked_div(p.total_size)
        {
            Some(pct) => format!("partial {pct}%"),
            None => "partial".into(),
        }
    }
}

fn usage_line(u: &pb::Usage) -> String {
    format!(
        "store: {} of {} used ({} pinned, {} cached, {} reserved for downloads)\n",
        bytes(u.used),
        bytes(u.max_bytes),
        bytes(u.held_bytes),
        bytes(u.cached_bytes),
        bytes(u.reserved_bytes)
    )
}

/// `content ls`
pub fn list(r: &pb::ListResponse) -> String {
    let rows: Vec<Vec<String>> = r
        .packages
        .iter()
        .map(|p| {
            vec![
                p.mri.clone(),
                p.kind.clone(),
                bytes(p.total_size),
                p.file_count.to_string(),
                state(p),
                if p.pinned { "pinned" } else { "cached" }.into(),
                p.title.clone(),
            ]
        })
        .collect();
    let mut out = if rows.is_empty() {
        "no packages\n".to_owned()
    } else {
        table(
            &["MRI", "KIND", "SIZE", "FILES", "STATE", "KEPT", "TITLE"],
            &[
                Align::Left,
                Align::Left,
                Align::Right,
                Align::Right,
                Align::Left,
                Align::Left,
                Align::Left,
            ],
            &rows,
        )
    };
    if let Some(u) = &r.usage {
        out.push_str(&usage_line(u));
    }
    out
}

/// `content info`
pub fn info(d: &pb::PackageDetail) -> String {
    let mut out = String::new();
    let p = d.package.clone().unwrap_or_default();
    let m = d.metadata.clone().unwrap_or_default();
    let mut field = |k: &str, v: &str| {
        if !v.is_empty() {
            out.push_str(&format!("{k:<12} {v}\n"));
        }
    };
    field("mri", &p.mri);
    field("title", &m.title);
    field("kind", &m.kind);
    field("description", &m.description);
    field("tags", &m.tags.join(", "));
    field("language", &m.language);
    field("licence", &m.licence);
    let mut extra: Vec<_> = m.extra.iter().collect();
    extra.sort();
    for (k, v) in extra {
        field(&format!("meta {k}"), v);
    }
    field("author", &d.author);
    field("created", &d.created.to_string());
    field(
        "size",
        &format!("{} in {} files", bytes(p.total_size), p.file_count),
    );
    field("state", &state(&p));
    field(
        "kept",
        &if p.holds.is_empty() {
            "cached (evictable)".to_owned()
        } else {
            p.holds.join(", ")
        },
    );
    field("on disk", &bytes(p.disk_bytes));
    let rows: Vec<Vec<String>> = d
        .files
        .iter()
        .map(|f| {
            vec![
                f.path.clone(),
                bytes(f.size),
                if f.executable { "x" } else { "" }.into(),
                if f.complete {
                    "complete".into()
                } else {
                    format!("{} verified", bytes(f.verified_bytes))
                },
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        &["PATH", "SIZE", "EXEC", "STATE"],
        &[Align::Left, Align::Right, Align::Left, Align::Left],
        &rows,
    ));
    out
}

/// `content verify`
pub fn verify(r: &pb::VerifyResponse) -> String {
    let mut out = format!(
        "checked {} files, {}: {}\n",
        r.blobs_checked,
        bytes(r.bytes_checked),
        if r.corrupt.is_empty() {
            "all verify".to_owned()
        } else {
            format!("{} corrupt", r.corrupt.len())
        }
    );
    for c in &r.corrupt {
        out.push_str(&format!(
            "  {}: {} ({} still verify; packages {})\n",
            c.hash,
            c.problem,
            bytes(c.verified_bytes_kept),
            c.packages.join(", ")
        ));
    }
    out
}

/// `content stats`
pub fn stats(s: &pb::ContentStats) -> String {
    let mut out = format!(
        "listening: {}\n",
        if s.listen.is_empty() {
            "no (no TUN device)"
        } else {
            &s.listen
        }
    );
    if let Some(u) = &s.usage {
        out.push_str(&usage_line(u));
    }
    let rows: Vec<Vec<String>> = s
        .counters
        .iter()
        .filter(|c| c.value != 0)
        .map(|c| vec![c.name.clone(), c.value.to_string()])
        .collect();
    out.push_str(&table(
        &["COUNTER", "VALUE"],
        &[Align::Left, Align::Right],
        &rows,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(200 << 20), "200.0 MiB");
    }

    #[test]
    fn list_shows_state_and_usage() {
        let r = pb::ListResponse {
            packages: vec![pb::Package {
                mri: "mri:x".into(),
                title: "T".into(),
                kind: "site".into(),
                total_size: 200,
                file_count: 2,
                verified_bytes: 50,
                ..Default::default()
            }],
            usage: Some(pb::Usage {
                used: 1 << 20,
                max_bytes: 1 << 30,
                ..Default::default()
            }),
        };
        let t = list(&r);
        assert!(t.contains("partial 25%"), "{t}");
        assert!(t.contains("cached"), "{t}");
        assert!(t.contains("1.0 MiB of 1.0 GiB"), "{t}");
        assert_eq!(list(&pb::ListResponse::default()), "no packages\n");
    }
}
