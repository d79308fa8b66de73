//! The agent's TOML configuration file, through the same resolution `--config` uses.

use myconet_agent::config::{Cli, FileConfig, LINK_COST_RANGE};

/// Parses `data` as a config file and resolves it without flags. Whatever resolves
/// satisfies the invariants the agent relies on without re-checking.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = FileConfig::from_toml(text) else {
        return;
    };
    let Ok(settings) = Cli::without_flags().resolve_with(file) else {
        return;
    };
    assert_ne!(settings.port, 0);
    assert!(settings.socket_mode <= 0o777);
    let hello = settings.peer_config.hello_interval.as_millis();
    assert!((100..=60_000).contains(&hello), "hello interval {hello} ms");
    for peer in &settings.peers {
        if let Some(cost) = peer.cost {
            assert!(LINK_COST_RANGE.contains(&cost), "cost {cost}");
        }
    }
    if let Some(name) = &settings.tun_name {
        assert!(!name.is_empty() && name.len() <= 15 && !name.contains(['/', ' ', '\0']));
    }
    for (prefix, _) in &settings.routes {
        assert!(prefix.prefix_len() <= 128);
        // A route's prefix holds no host bits: its address is inside itself.
        assert!(prefix.contains(prefix.addr()));
    }
}
