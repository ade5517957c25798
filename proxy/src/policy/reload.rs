//! Hot reload (POLICY.md §6): poll the file or directory every second and reload on SIGHUP;
//! parse and compile off the async threads; on any error keep the old set and count the error;
//! on success swap atomically. Readers take the current set with [`PolicyWatcher::current`]
//! (lock-free) or follow changes with [`PolicyWatcher::subscribe`] (to re-evaluate open
//! connections).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use svidcar_agent::SpiffeId;
use tokio::sync::watch;

use super::load::policy_files;
use super::{CompiledPolicy, PolicyLoadError, PolicySet};

/// Default poll interval.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// A running policy watcher. Dropping it stops the background task.
pub struct PolicyWatcher {
    current: Arc<ArcSwap<CompiledPolicy>>,
    rx: watch::Receiver<Arc<CompiledPolicy>>,
    errors: Arc<AtomicU64>,
    reloads: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl PolicyWatcher {
    /// The policy in force (cheap, lock-free).
    pub fn current(&self) -> Arc<CompiledPolicy> {
        self.current.load_full()
    }

    /// The shared handle the proxy's data path can hold.
    pub fn handle(&self) -> Arc<ArcSwap<CompiledPolicy>> {
        self.current.clone()
    }

    /// A receiver that changes on every successful reload.
    pub fn subscribe(&self) -> watch::Receiver<Arc<CompiledPolicy>> {
        self.rx.clone()
    }

    /// `svidcar_policy_reload_errors_total`.
    pub fn reload_errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The counter behind [`Self::reload_errors`], for a metrics registry.
    pub fn reload_errors_counter(&self) -> Arc<AtomicU64> {
        self.errors.clone()
    }

    /// Successful reloads since start (not counting the initial load).
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }
}

impl Drop for PolicyWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

fn fingerprint(path: &Path) -> Fingerprint {
    let files = policy_files(path).unwrap_or_default();
    let mut fp: Fingerprint = files
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let mtime = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map_or(0, |m| m.len());
            (f, mtime, len)
        })
        .collect();
    if let Ok(m) = std::fs::metadata(path) {
        fp.push((path.to_path_buf(), m.modified().ok(), m.len()));
    }
    fp
}

/// Loads `path` for `local_id` (the initial load must succeed), then watches it: polls every
/// [`POLL_INTERVAL`] and reloads on SIGHUP. Must be called inside a tokio runtime.
pub fn spawn_watcher(path: PathBuf, local_id: SpiffeId) -> Result<PolicyWatcher, PolicyLoadError> {
    spawn_watcher_with(path, local_id, POLL_INTERVAL)
}

/// [`spawn_watcher`] with a chosen poll interval.
pub fn spawn_watcher_with(
    path: PathBuf,
    local_id: SpiffeId,
    poll: Duration,
) -> Result<PolicyWatcher, PolicyLoadError> {
    let mut last = fingerprint(&path);
    let first = Arc::new(PolicySet::load(&path)?.compile(&local_id));
    tracing::info!(path = %path.display(), policies = first.summary.len(), "policy loaded");
    let current = Arc::new(ArcSwap::new(first.clone()));
    let (tx, rx) = watch::channel(first);
    let errors = Arc::new(AtomicU64::new(0));
    let reloads = Arc::new(AtomicU64::new(0));
    let (cur, errs, oks) = (current.clone(), errors.clone(), reloads.clone());
    // Registered before returning, so a SIGHUP sent right after never hits the default action.
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; policy reload by file polling only");
            None
        }
    };
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + poll, poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = tick.tick() => false,
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            };
            let fp = fingerprint(&path);
            if !forced && fp == last {
                continue;
            }
            last = fp;
            let (p, id) = (path.clone(), local_id.clone());
            let result =
                tokio::task::spawn_blocking(move || PolicySet::load(&p).map(|s| s.compile(&id)))
                    .await;
            match result {
                Ok(Ok(mut compiled)) => {
                    // Counters of unchanged limits carry over (docs/policy-limits.md).
                    compiled.adopt_limits(&cur.load());
                    let compiled = Arc::new(compiled);
                    cur.store(compiled.clone());
                    oks.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.send(compiled);
                    tracing::info!(path = %path.display(), sighup = forced, "policy reloaded");
                }
                Ok(Err(e)) => {
                    errs.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(path = %path.display(), error = %e, "policy reload rejected; the previous policy stays in force");
                }
                Err(e) => {
                    errs.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "policy reload task failed; the previous policy stays in force");
                }
            }
        }
    });
    Ok(PolicyWatcher {
        current,
        rx,
        errors,
        reloads,
        task,
    })
}
