//! Pooled, multiplexed mTLS between svidcar proxies (the HBONE idea): one mTLS connection
//! between two proxies carries many application connections, each as one HTTP/2 `CONNECT`
//! stream, so an application's short connections do not each pay a TLS handshake.
//!
//! - ALPN [`ALPN_SVIDCAR_MUX`] (`svidcar-mux/1`): the pooling client offers it before
//!   `svidcar/1`; a server that picks `svidcar/1` (an older proxy, or `--no-pool`) gets that one
//!   application connection the old way and the pool remembers "no mux" for the key for a while.
//! - One stream per application connection: `CONNECT` with `:authority` = the `ip:port` the
//!   outbound side dialled; the server answers `200` once the app is connected (or `403`
//!   denied, `502` app unreachable, `421` wrong destination, `405` not a `CONNECT`,
//!   `RST_STREAM(REFUSED_STREAM)` at the connection limit). App bytes are DATA frames, an app EOF
//!   is END_STREAM (half-close), an error on either side is `RST_STREAM` and the other side
//!   resets its TCP socket.
//! - [`client::Pool`] (outbound), [`server::serve`] (inbound), [`stream::H2Stream`] (a stream as
//!   `AsyncRead + AsyncWrite`, for the L7 server), [`pump::pump_until`] (socket ⇄ stream without
//!   an extra copy, for TCP ports and outbound).

pub mod client;
pub mod pump;
pub mod server;
pub mod stream;

use serde::{Deserialize, Serialize};
pub use svidcar_agent::tls::{ALPN_SVIDCAR, ALPN_SVIDCAR_MUX};

use crate::config::{ConfigError, Dur};

/// Initial per-stream flow-control window (bulk transfers must not stall on window updates).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Initial connection flow-control window.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest DATA frame we accept.
pub const MAX_FRAME: u32 = 256 * 1024;
/// Per-stream send buffer limit (backpressure towards the reading side).
pub const SEND_BUFFER: usize = 1024 * 1024;

/// The `pool` section: pooled, multiplexed mTLS connections to peer proxies.
///
/// ```yaml
/// pool:
///   enabled: true        # offer/accept svidcar-mux/1 (false = one handshake per connection)
///   max_streams: 100     # concurrent application connections per pooled mTLS connection
///   idle_timeout: 60s    # a pooled connection without streams for this long is closed
///   resumption: true     # TLS session resumption for new outbound connections
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Pool outbound mesh connections and accept multiplexed inbound connections.
    pub enabled: bool,
    /// Concurrent streams per pooled connection (outbound) and accepted per connection (inbound).
    pub max_streams: u32,
    /// A pooled connection without streams for this long is closed.
    pub idle_timeout: Dur,
    /// TLS session resumption on outbound connections (off: every handshake is a full one).
    pub resumption: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_streams: 100,
            idle_timeout: Dur(std::time::Duration::from_secs(60)),
            resumption: true,
        }
    }
}

impl PoolConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_streams == 0 {
            return Err(ConfigError::Value {
                what: "pool.max_streams",
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }

    /// ALPN ids an outbound client offers, in preference order.
    pub fn client_alpn(&self) -> Vec<Vec<u8>> {
        if self.enabled {
            vec![ALPN_SVIDCAR_MUX.to_vec(), ALPN_SVIDCAR.to_vec()]
        } else {
            vec![ALPN_SVIDCAR.to_vec()]
        }
    }

    /// What `/config` shows.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "enabled": self.enabled,
            "max_streams": self.max_streams,
            "idle_timeout_seconds": self.idle_timeout.0.as_secs(),
            "resumption": self.resumption,
            "alpn": if self.enabled { "svidcar-mux/1, svidcar/1" } else { "svidcar/1" },
            "stream_window": STREAM_WINDOW,
            "connection_window": CONNECTION_WINDOW,
            "max_frame_size": MAX_FRAME,
        })
    }
}

/// Turns an h2 error into an I/O error that keeps "the peer reset" distinguishable.
pub(crate) fn io_error(e: h2::Error) -> std::io::Error {
    use std::io::{Error, ErrorKind};
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| Error::other("h2 I/O error"));
    }
    let kind = if e.is_reset() || e.is_go_away() {
        ErrorKind::ConnectionReset
    } else {
        ErrorKind::Other
    };
    Error::new(kind, format!("mux: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_section_defaults_and_validation() {
        let d = PoolConfig::default();
        assert!(d.enabled && d.resumption);
        assert_eq!(d.max_streams, 100);
        assert_eq!(d.client_alpn()[0], ALPN_SVIDCAR_MUX.to_vec());
        let c: PoolConfig =
            serde_yaml_ng::from_str("enabled: false\nmax_streams: 7\nidle_timeout: 5s\n").unwrap();
        assert!(!c.enabled);
        assert_eq!(c.max_streams, 7);
        assert_eq!(c.client_alpn(), vec![ALPN_SVIDCAR.to_vec()]);
        assert!(serde_yaml_ng::from_str::<PoolConfig>("nope: 1\n").is_err());
        let zero = PoolConfig {
            max_streams: 0,
            ..PoolConfig::default()
        };
        assert!(zero.validate().is_err());
    }
}
