//! The agent's log on stderr: plain text (coloured only on a terminal) or one JSON object
//! per line, filtered by `RUST_LOG` (default `info`) with defaults that keep the gRPC
//! stack's per-frame debug output out of Myconet's debug log.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; ANSI colours only when stderr is a terminal.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`).
    Json,
}

/// Crates below the control API (HTTP/2 framing, connection handling) whose debug and
/// trace output is per frame or per poll, and the level they get unless `RUST_LOG`
/// names them: `RUST_LOG=debug` then shows Myconet's debug lines, not thousands of
/// frame logs. `RUST_LOG=h2=debug` still turns them on.
pub const QUIET_TARGETS: &[(&str, &str)] = &[
    ("h2", "info"),
    ("hyper", "info"),
    ("hyper_util", "info"),
    ("tonic", "info"),
    ("tower", "info"),
    ("rtnetlink", "info"),
    ("netlink_proto", "info"),
];

/// The filter directives for `rust_log` (the `RUST_LOG` value, if any): the operator's
/// own, then a directive for every [`QUIET_TARGETS`] entry they did not name.
pub fn directives(rust_log: Option<&str>) -> String {
    let base = rust_log
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or("info");
    let named: Vec<&str> = base
        .split(',')
        .filter_map(|d| {
            let target = d.split(['=', '[']).next()?.trim();
            // A bare level ("debug") names no target.
            (!target.is_empty() && target.parse::<tracing::Level>().is_err()).then_some(target)
        })
        .collect();
    let mut out = base.to_string();
    for (target, level) in QUIET_TARGETS {
        let mentioned = named
            .iter()
            .any(|n| n == target || n.starts_with(&format!("{target}::")));
        if !mentioned {
            out.push_str(&format!(",{target}={level}"));
        }
    }
    out
}

/// Installs the global subscriber. Returns the problem with `RUST_LOG` if it did not
/// parse (the default filter is used then), for the caller to log once logging works.
pub fn init(format: LogFormat) -> Option<String> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, problem) = match EnvFilter::try_new(directives(rust_log.as_deref())) {
        Ok(f) => (f, None),
        Err(e) => (
            EnvFilter::new(directives(None)),
            Some(format!(
                "ignoring RUST_LOG={:?}: {e}",
                rust_log.unwrap_or_default()
            )),
        ),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(use_colour()).init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
    problem
}

/// Colour codes only for a person at a terminal who has not asked for none
/// (<https://no-color.org>): journald, files and pipes get plain text.
fn use_colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[test]
    fn quiet_targets_are_added_unless_named() {
        assert_eq!(
            directives(None),
            "info,h2=info,hyper=info,hyper_util=info,tonic=info,tower=info,rtnetlink=info,netlink_proto=info"
        );
        let d = directives(Some("debug,h2=trace,tonic::transport=debug"));
        assert!(
            d.starts_with("debug,h2=trace,tonic::transport=debug,hyper=info"),
            "{d}"
        );
        assert!(!d.contains("h2=info") && !d.contains("tonic=info"), "{d}");
        assert_eq!(directives(Some("  ")), directives(None));
    }

    /// A writer collecting what the subscriber writes.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn debug_keeps_myconet_and_drops_http2_frames() {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(directives(Some("debug"))))
            .with_writer(buffer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(target: "myconet_agent::link", "hello sent");
            tracing::debug!(target: "h2::codec::framed_write", "send frame");
            tracing::debug!(target: "hyper_util::client", "connecting");
            tracing::info!(target: "h2::proto", "connection error");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("hello sent"), "{text}");
        assert!(text.contains("connection error"), "{text}");
        assert!(
            !text.contains("send frame") && !text.contains("connecting"),
            "{text}"
        );
    }
}
