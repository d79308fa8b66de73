//! The sample configuration shipped in the Debian package (`packaging/agent.toml`) lists
//! every key `config.rs` knows, with its real default: the keys are read from the
//! parser's own field lists, so a key added to `FileConfig` without a line in the sample
//! (or in docs/operations.md) fails here, and so does a default that drifts.

use clap::Parser;
use myconet_agent::config::{Cli, FileConfig, FileMetrics, FileRoute};
use myconet_agent::shell::content::settings::{ContentSection, StorageSection};
use serde::Deserialize;

const SAMPLE: &str = include_str!("../../packaging/agent.toml");
const OPERATIONS: &str = include_str!("../../docs/operations.md");

/// The field names serde's derive passes to `deserialize_struct` for `T`.
fn fields<T: for<'de> Deserialize<'de>>() -> Vec<&'static str> {
    struct Capture(Vec<&'static str>);
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("captured")
        }
    }
    impl std::error::Error for Stop {}
    impl serde::de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    impl<'de> serde::Deserializer<'de> for &mut Capture {
        type Error = Stop;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0 = fields.to_vec();
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 u8 u16 u32 u64 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut capture = Capture(Vec::new());
    let _ = T::deserialize(&mut capture);
    assert!(!capture.0.is_empty(), "no fields captured");
    capture.0
}

/// Every key the file format accepts, nested ones as `table.key`.
fn all_keys() -> Vec<String> {
    let mut keys: Vec<String> = fields::<FileConfig>()
        .iter()
        .map(|k| k.to_string())
        .collect();
    keys.extend(fields::<FileRoute>().iter().map(|k| format!("routes.{k}")));
    keys.extend(
        fields::<FileMetrics>()
            .iter()
            .map(|k| format!("metrics.{k}")),
    );
    keys.extend(
        fields::<StorageSection>()
            .iter()
            .map(|k| format!("storage.{k}")),
    );
    keys.extend(
        fields::<ContentSection>()
            .iter()
            .map(|k| format!("content.{k}")),
    );
    keys
}

/// The sample with its default lines (`#key = value`, `#[table]`) uncommented and its
/// examples (`# e.g. …`) left out.
fn defaults_only(sample: &str) -> String {
    sample
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix('#')?;
            let starts_key = rest.starts_with(|c: char| c.is_ascii_lowercase() || c == '[');
            starts_key.then(|| rest.to_string())
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_sample_lists_every_key() {
    for key in all_keys() {
        let leaf = key.rsplit('.').next().unwrap();
        let written = SAMPLE.lines().any(|l| {
            let l = l.trim_start_matches('#').trim_start();
            let l = l.strip_prefix("e.g.").map_or(l, str::trim_start);
            l.starts_with(&format!("{leaf} ="))
                || l == format!("[{leaf}]")
                || l == format!("[[{leaf}]]")
        });
        assert!(written, "packaging/agent.toml does not mention {key}");
    }
}

#[test]
fn the_sample_defaults_are_the_real_defaults() {
    let dir = std::env::temp_dir().join(format!("myconet-sample-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uncommented = dir.join("defaults.toml");
    std::fs::write(&uncommented, defaults_only(SAMPLE)).unwrap();
    let whole = dir.join("sample.toml");
    std::fs::write(&whole, SAMPLE).unwrap();
    let resolve = |path: &std::path::Path| {
        Cli::parse_from(["myconet-agent", "-c", path.to_str().unwrap()])
            .resolve()
            .map(|s| format!("{s:?}"))
    };
    let from_defaults = resolve(&uncommented)
        .unwrap_or_else(|e| panic!("the sample's defaults do not parse: {e:#}"));
    let none = Cli::parse_from(["myconet-agent"]).resolve().unwrap();
    assert_eq!(
        from_defaults,
        format!("{none:?}"),
        "a default in the sample is not the real one"
    );
    // As shipped (everything commented out) it is valid too.
    resolve(&whole).unwrap();
    // Each example parses when uncommented, on top of the defaults.
    let examples: String = SAMPLE
        .lines()
        .filter_map(|l| l.strip_prefix("# e.g. "))
        .collect::<Vec<_>>()
        .join("\n");
    let routes_and_lists: Vec<&str> = examples
        .lines()
        .filter(|l| !l.starts_with("listen"))
        .collect();
    let with_examples = dir.join("examples.toml");
    // Top-level examples replace the defaults of the same key; [[routes]] goes last.
    std::fs::write(
        &with_examples,
        format!(
            "{}\n[metrics]\nlisten = \"[::1]:9652\"\n",
            routes_and_lists.join("\n")
        ),
    )
    .unwrap();
    resolve(&with_examples).unwrap_or_else(|e| panic!("the sample's examples do not parse: {e:#}"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// docs/operations.md has a row for every key in its configuration table.
#[test]
fn the_operations_guide_documents_every_key() {
    for key in all_keys() {
        let row = format!("| `{key}` |");
        assert!(
            OPERATIONS.lines().any(|l| l.starts_with(&row)),
            "docs/operations.md has no table row starting {row}"
        );
    }
}
