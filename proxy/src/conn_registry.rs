//! Open non-HTTP connections, for re-evaluation when the policy changes (POLICY.md §6,
//! `settings.onPolicyChange: reevaluate`).
//!
//! A connection registers **before** it is decided and stays registered (through the
//! [`OpenConn`] guard) until it ends. When a new policy set is swapped in, the authorizer walks
//! the registry and re-decides every entry once with its original attributes; an entry now
//! denied is signalled, and its copy loop ([`OpenConn::revoked`], selected on by
//! [`crate::copy::copy_bidirectional_until`]) ends and resets both sides.
//!
//! Why registration comes first: the policy is swapped (stored) before the walk starts, and the
//! walk snapshots the registry under its lock. A connection registered before the snapshot is
//! re-evaluated by the walk; one registered after it was registered after the swap, so its own
//! decision already loads the new policy. No change can race past an open connection. (An entry
//! signalled while its own decision is still running is harmless: a denied connection never
//! looks at the signal; an allowed one is reset as soon as it starts copying.)

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use svidcar_agent::SpiffeId;
use tokio::sync::Notify;

/// The attributes a connection was decided on, owned so it can be re-decided later.
#[derive(Debug, Clone)]
pub enum OpenAttrs {
    /// An inbound TCP or mTLS connection on a `tcp` port.
    Inbound {
        /// The peer's verified SPIFFE ID (`None` = plaintext).
        peer: Option<SpiffeId>,
        /// The connecting socket address.
        src: SocketAddr,
        /// The destination as the peer saw it.
        dst: SocketAddr,
        /// The application port.
        app_port: u16,
    },
    /// An outbound connection (mesh or passthrough egress).
    Egress {
        /// The application's socket address.
        src: SocketAddr,
        /// Destination IP, when known.
        dst_ip: Option<IpAddr>,
        /// Destination port.
        dst_port: u16,
        /// Mesh destination: the SPIFFE ID the server must present.
        destination_id: Option<SpiffeId>,
        /// TLS SNI seen in the application's ClientHello.
        sni: Option<String>,
        /// Explicit-proxy `CONNECT` authority host.
        connect: Option<String>,
    },
}

impl OpenAttrs {
    /// The owned copy of an inbound connection's attributes.
    pub fn inbound(conn: &crate::authz::ConnAttrs<'_>) -> Self {
        Self::Inbound {
            peer: conn.peer.cloned(),
            src: conn.src,
            dst: conn.dst,
            app_port: conn.app_port,
        }
    }

    /// The owned copy of an outbound connection's attributes (a byte stream: plaintext HTTP
    /// egress is decided per request and never registered).
    pub fn egress(conn: &crate::authz::EgressAttrs<'_>) -> Self {
        Self::Egress {
            src: conn.src,
            dst_ip: conn.dst_ip,
            dst_port: conn.dst_port,
            destination_id: conn.destination_id.cloned(),
            sni: conn.sni.map(str::to_string),
            connect: conn.connect.map(str::to_string),
        }
    }

    /// `inbound` | `egress` (metric label).
    pub fn direction(&self) -> &'static str {
        match self {
            Self::Inbound { .. } => "inbound",
            Self::Egress { .. } => "egress",
        }
    }
}

/// One registered connection.
#[derive(Debug)]
struct Entry {
    attrs: OpenAttrs,
    /// The rule or default that denies it under a newer policy (set once).
    denied_by: OnceLock<String>,
    /// Wakes the connection's copy loop (`notify_one` keeps a permit if it is not waiting yet).
    wake: Notify,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Entry>>>,
}

/// The open connections of one authorizer (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct ConnRegistry {
    inner: Arc<Inner>,
}

impl ConnRegistry {
    /// Registers a connection before it is decided; it stays registered until the guard drops.
    pub fn register(&self, attrs: OpenAttrs) -> OpenConn {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            attrs,
            denied_by: OnceLock::new(),
            wake: Notify::new(),
        });
        self.lock().insert(id, entry.clone());
        OpenConn {
            registry: self.inner.clone(),
            id,
            entry,
        }
    }

    /// Number of registered connections.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-decides every registered connection with `decide` (called after the new policy is in
    /// force) and signals those now denied (`decide` returns the denying rule); returns how many
    /// were signalled. Decisions run outside the registry lock.
    pub fn reevaluate<F>(&self, mut decide: F) -> usize
    where
        F: FnMut(&OpenAttrs) -> Option<String>,
    {
        let snapshot: Vec<Arc<Entry>> = self.lock().values().cloned().collect();
        let mut denied = 0;
        for entry in snapshot {
            if entry.denied_by.get().is_some() {
                continue;
            }
            if let Some(rule) = decide(&entry.attrs) {
                if entry.denied_by.set(rule).is_ok() {
                    entry.wake.notify_one();
                    denied += 1;
                }
            }
        }
        denied
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
        lock(&self.inner)
    }
}

fn lock(inner: &Inner) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
    // A panic while holding the lock cannot leave the map inconsistent (single inserts/removes).
    inner.open.lock().unwrap_or_else(|e| e.into_inner())
}

/// A registered connection; unregisters on drop.
#[derive(Debug)]
pub struct OpenConn {
    registry: Arc<Inner>,
    id: u64,
    entry: Arc<Entry>,
}

impl OpenConn {
    /// Resolves (with the denying rule) when a new policy denies this connection; pending
    /// forever otherwise.
    pub async fn revoked(&self) -> String {
        loop {
            if let Some(rule) = self.entry.denied_by.get() {
                return rule.clone();
            }
            self.entry.wake.notified().await;
        }
    }

    /// The attributes the connection was registered with.
    pub fn attrs(&self) -> &OpenAttrs {
        &self.entry.attrs
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        lock(&self.registry).remove(&self.id);
    }
}

/// Resolves with the denying rule when `conn` is revoked; never when there is no guard (the
/// authorizer does not re-evaluate, e.g. the built-in policy).
pub async fn revoked(conn: Option<&OpenConn>) -> String {
    match conn {
        Some(c) => c.revoked().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound(port: u16) -> OpenAttrs {
        let a: SocketAddr = ([127, 0, 0, 1], port).into();
        OpenAttrs::Inbound {
            peer: None,
            src: a,
            dst: a,
            app_port: port,
        }
    }

    #[tokio::test]
    async fn denied_entries_are_signalled_once_and_guards_unregister() {
        let reg = ConnRegistry::default();
        let keep = reg.register(inbound(1));
        let deny = reg.register(inbound(2));
        assert_eq!(reg.len(), 2);
        let deny_port_2 = |a: &OpenAttrs| match a {
            OpenAttrs::Inbound { app_port: 2, .. } => Some("p/rules[0]".to_string()),
            _ => None,
        };
        assert_eq!(reg.reevaluate(deny_port_2), 1);
        // Signalled before anyone waited: the stored permit wakes the later wait.
        assert_eq!(deny.revoked().await, "p/rules[0]");
        // Once: a second change does not signal it again.
        assert_eq!(reg.reevaluate(deny_port_2), 0);
        let still = tokio::time::timeout(std::time::Duration::from_millis(50), keep.revoked());
        assert!(still.await.is_err(), "an allowed connection is not revoked");
        drop(deny);
        assert_eq!(reg.len(), 1);
        drop(keep);
        assert!(reg.is_empty());
    }
}
