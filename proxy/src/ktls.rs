//! Kernel TLS (kTLS): detected once at start, reported in the log and in `/config`.
//!
//! The probe attaches the `tls` upper-layer protocol (`setsockopt(TCP_ULP, "tls")`, the first
//! step of kTLS) to one end of a loopback TCP pair. On a kernel without it (`CONFIG_TLS` off or
//! the `tls` module absent) the kernel answers `ENOENT`, and that is the expected, clean
//! outcome: every TLS record is encrypted and decrypted in user space by rustls, as always.
//! svidcar does not yet hand keys to the kernel even where it offers kTLS (that path needs a
//! kTLS kernel to be exercised; the benchmark machine has none), so the probe only tells the
//! operator what the kernel could do.

use std::net::{TcpListener, TcpStream};

use serde_json::{json, Value};

/// What the kernel offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ktls {
    /// The kernel accepted the `tls` ULP.
    Available,
    /// It did not, and why.
    Unavailable(String),
}

impl Ktls {
    /// Probes the kernel (a loopback socket pair, closed again at once).
    pub fn probe() -> Self {
        let pair = TcpListener::bind(("127.0.0.1", 0)).and_then(|l| {
            let client = TcpStream::connect(l.local_addr()?)?;
            let (server, _) = l.accept()?;
            Ok((client, server))
        });
        let (client, _server) = match pair {
            Ok(p) => p,
            Err(e) => return Self::Unavailable(format!("cannot probe: {e}")),
        };
        match crate::sys::set_tcp_ulp(&client, "tls") {
            Ok(()) => Self::Available,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Self::Unavailable(
                "the kernel has no `tls` module (CONFIG_TLS off or not loaded)".into(),
            ),
            Err(e) => Self::Unavailable(e.to_string()),
        }
    }

    /// Logs the outcome once.
    pub fn log(&self) {
        match self {
            Self::Available => tracing::info!(
                "kTLS: the kernel offers it; svidcar does not offload to it yet — TLS stays in \
                 user space (rustls)"
            ),
            Self::Unavailable(reason) => tracing::info!(reason = %reason,
                "kTLS: unavailable; TLS records are encrypted in user space (rustls)"),
        }
    }

    /// For `/config`.
    pub fn describe(&self) -> Value {
        match self {
            Self::Available => json!({"kernel": "available", "offload": false}),
            Self::Unavailable(reason) => {
                json!({"kernel": "unavailable", "reason": reason, "offload": false})
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe's answer matches what the kernel says about the module: available exactly
    /// when `/proc/sys/net/ipv4/tcp_available_ulp` lists `tls` after the probe (the probe
    /// itself loads the module where it can).
    #[test]
    fn the_probe_agrees_with_the_kernel() {
        let k = Ktls::probe();
        let ulps =
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap_or_default();
        let listed = ulps.split_whitespace().any(|u| u == "tls");
        assert_eq!(
            k == Ktls::Available,
            listed,
            "{k:?} vs tcp_available_ulp {ulps:?}"
        );
        if let Ktls::Unavailable(reason) = &k {
            assert!(!reason.is_empty());
            assert_eq!(k.describe()["kernel"], "unavailable");
        }
    }
}
