//! The proxy's YAML configuration and flag parsers (`ProxyConfig::from_yaml`, `validate`,
//! `--inbound`/`--outbound` flag forms, durations, transparent-mode destinations).
//! Invariant: a configuration we accept and print (`--print-config`) is accepted again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use svidcar_proxy::config::{DstMatch, Dur, InboundListener, OutboundRoute, ProxyConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = ProxyConfig::from_yaml(text) {
        if config.validate().is_ok() {
            for d in &config.transparent.destinations {
                let m = DstMatch::compile(d).expect("validated");
                let _ = m.matches(&"10.1.2.3:8080".parse().expect("addr"));
                let _ = m.matches(&"[fd00::1]:443".parse().expect("addr"));
            }
            let printed = serde_yaml_ng::to_string(&config).expect("serialize");
            let again = ProxyConfig::from_yaml(&printed).expect("printed config parses");
            assert_eq!(again.limits.max_connections, config.limits.max_connections);
            assert_eq!(again.inbound, config.inbound);
            assert_eq!(again.outbound, config.outbound);
        }
    }
    for line in text.lines().take(8) {
        let _ = InboundListener::parse_flag(line);
        let _ = OutboundRoute::parse_flag(line);
        let _ = Dur::parse(line);
    }
});
