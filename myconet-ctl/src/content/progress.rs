//! Following a download: a progress bar (bytes, rate, ETA, providers) when standard
//! error is a terminal, plain progress lines otherwise, JSON lines with `--json`.

use std::{
    io::{IsTerminal, Write},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use myconet_proto::content::v1::{self as pb, content_client::ContentClient};
use tonic::transport::Channel;

use super::{GetArgs, absolute, render::bytes};
use crate::client::CtlError;

/// Plain progress lines at most this often (events always print).
const PLAIN_EVERY: Duration = Duration::from_secs(1);

enum View {
    Json,
    Bar(ProgressBar),
    Plain { last: Option<Instant> },
}

impl View {
    fn new(json: bool) -> Self {
        if json {
            return View::Json;
        }
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{spinner} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(200));
            View::Bar(bar)
        } else {
            View::Plain { last: None }
        }
    }

    fn show(&mut self, p: &pb::Progress) -> anyhow::Result<()> {
        match self {
            View::Json => {
                let mut out = std::io::stdout().lock();
                serde_json::to_writer(&mut out, p).context("encoding JSON")?;
                out.write_all(b"\n").context("writing to standard output")?;
                out.flush().context("writing to standard output")?;
            }
            View::Bar(bar) => {
                if p.total_bytes > 0 {
                    bar.set_length(p.total_bytes);
                }
                bar.set_position(p.verified_bytes);
                bar.set_message(providers(p));
                if !p.event.is_empty() {
                    bar.println(&p.event);
                }
            }
            View::Plain { last } => {
                let due = last.is_none_or(|t| t.elapsed() >= PLAIN_EVERY);
                if !p.event.is_empty() {
                    eprintln!("{}", p.event);
                }
                if due || p.state != "downloading" {
                    eprintln!("{}", line(p));
                    *last = Some(Instant::now());
                }
            }
        }
        Ok(())
    }

    fn finish(&self) {
        if let View::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// `fd6d::…]:9651 12.0 MiB, … (1 dropped)`
fn providers(p: &pb::Progress) -> String {
    let live: Vec<String> = p
        .providers
        .iter()
        .filter(|x| x.dropped.is_empty())
        .map(|x| format!("{} {}", x.address, bytes(x.delivered_bytes)))
        .collect();
    let dropped = p.providers.len() - live.len();
    let mut s = format!("{} provider(s)", live.len());
    if !live.is_empty() {
        s.push_str(": ");
        s.push_str(&live.join(", "));
    }
    if dropped > 0 {
        s.push_str(&format!(" ({dropped} dropped)"));
    }
    s
}

/// One plain progress line.
pub fn line(p: &pb::Progress) -> String {
    let pct = p
        .verified_bytes
        .saturating_mul(100)
        .checked_div(p.total_bytes)
        .unwrap_or(0);
    let eta = if p.rate > 0.0 && p.total_bytes > p.verified_bytes {
        format!(
            ", ETA {:.0} s",
            (p.total_bytes - p.verified_bytes) as f64 / p.rate
        )
    } else {
        String::new()
    };
    format!(
        "{} {}: {} of {} ({pct}%), {}/s{eta}, {}",
        p.state,
        p.mri,
        bytes(p.verified_bytes),
        bytes(p.total_bytes),
        bytes(p.rate as u64),
        providers(p)
    )
}

/// `content get`
pub async fn get(c: &mut ContentClient<Channel>, json: bool, g: GetArgs) -> anyhow::Result<String> {
    let output_dir = match &g.output {
        Some(d) => absolute(d)?,
        None => String::new(),
    };
    let mut stream = c
        .get(pb::GetRequest {
            mri: g.mri.clone(),
            providers: g.from,
            output_dir,
            no_pin: g.no_pin,
        })
        .await
        .map_err(CtlError::from)?
        .into_inner();
    let mut view = View::new(json);
    let mut last = None;
    let result = loop {
        match stream.message().await {
            Ok(Some(p)) => {
                view.show(&p)?;
                last = Some(p);
            }
            Ok(None) => break Ok(()),
            Err(s) => break Err(CtlError::from(s)),
        }
    };
    view.finish();
    result?;
    let last = last.context("the agent ended the download without a word")?;
    match last.state.as_str() {
        "done" => {}
        "failed" => bail!("download of {} failed: {}", g.mri, last.error),
        other => bail!(
            "download of {} stopped in state {other:?} (was the agent stopped?)",
            g.mri
        ),
    }
    if json {
        return Ok(String::new());
    }
    let mut out = format!(
        "{}: complete, {} verified ({} were here already) in {:.1} s",
        last.mri,
        bytes(last.verified_bytes),
        bytes(last.resumed_bytes),
        last.elapsed_seconds
    );
    if !last.event.is_empty() {
        out.push_str("; ");
        out.push_str(&last.event);
    }
    out.push('\n');
    Ok(out)
}

/// `content watch`
pub async fn watch(c: &mut ContentClient<Channel>, json: bool) -> anyhow::Result<String> {
    let mut stream = c
        .watch(pb::WatchRequest {})
        .await
        .map_err(CtlError::from)?
        .into_inner();
    while let Some(p) = stream.message().await.map_err(CtlError::from)? {
        if json {
            println!("{}", serde_json::to_string(&p).context("encoding JSON")?);
        } else {
            if !p.event.is_empty() {
                println!("{}", p.event);
            }
            println!("{}", line(&p));
        }
    }
    Ok(String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_say_bytes_rate_eta_and_providers() {
        let p = pb::Progress {
            mri: "mri:x".into(),
            state: "downloading".into(),
            total_bytes: 100 << 20,
            verified_bytes: 25 << 20,
            rate: (25 << 20) as f64,
            providers: vec![
                pb::ProviderProgress {
                    address: "[fd6d::1]:9651".into(),
                    delivered_bytes: 25 << 20,
                    ..Default::default()
                },
                pb::ProviderProgress {
                    address: "[fd6d::2]:9651".into(),
                    dropped: "corrupt".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let l = line(&p);
        assert!(l.contains("25.0 MiB of 100.0 MiB (25%)"), "{l}");
        assert!(l.contains("ETA 3 s"), "{l}");
        assert!(
            l.contains("1 provider(s): [fd6d::1]:9651 25.0 MiB (1 dropped)"),
            "{l}"
        );
    }
}
