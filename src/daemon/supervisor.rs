//! One supervisor for every task and thread of the daemon's parts: each is
//! started through it ([`Supervisor::spawn`], [`Supervisor::thread`]), so a
//! part that fails (an error) or dies (a panic) is never silent: the first
//! such end is kept as the daemon's reason and stops the whole daemon
//! (the parts' token), which then exits non-zero saying why. It also knows
//! which parts still run, for the shutdown [`Watchdog`] that ends a shutdown
//! outliving its grace.
//!
//! It decides nothing about what the parts do, and restarts nothing: a part
//! that can wait a fault out (NATS away, a full disk) does so itself.

use anyhow::{anyhow, Result};
use futures::FutureExt;
use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Parts of the daemon, started and watched; clones share them.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    /// Cancelled by the first part to fail.
    shutdown: CancellationToken,
    /// The first failure: the daemon's reason to stop.
    failure: Mutex<Option<anyhow::Error>>,
    /// The parts running now, by id.
    running: Mutex<BTreeMap<u64, &'static str>>,
    next_id: AtomicU64,
    /// When `shutdown` was cancelled, once it was: a part that notices
    /// late (a thread in the middle of a step) still knows how much of the
    /// grace is left.
    shutdown_at: Arc<std::sync::OnceLock<std::time::Instant>>,
}

/// A panic's message, when it carries one.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

impl Supervisor {
    /// A supervisor whose parts stop on `shutdown`, which the first to fail
    /// cancels. Made inside the runtime: a task notes when the shutdown came.
    pub fn new(shutdown: CancellationToken) -> Supervisor {
        let shutdown_at = Arc::new(std::sync::OnceLock::new());
        let (token, at) = (shutdown.clone(), shutdown_at.clone());
        tokio::spawn(async move {
            token.cancelled().await;
            let _ = at.set(std::time::Instant::now());
        });
        Supervisor {
            inner: Arc::new(Inner {
                shutdown,
                failure: Mutex::default(),
                running: Mutex::default(),
                next_id: AtomicU64::new(0),
                shutdown_at,
            }),
        }
    }

    /// How long ago the shutdown came; None before it has.
    pub fn since_shutdown(&self) -> Option<std::time::Duration> {
        self.inner.shutdown_at.get().map(|at| at.elapsed())
    }

    /// The token the parts stop on.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// Registers `name` as running until the returned guard drops.
    fn enter(&self, name: &'static str) -> Running {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, name);
        Running {
            id,
            supervisor: self.clone(),
        }
    }

    /// How part `name` ended: an error or a panic is recorded (the first one
    /// is the daemon's reason) and stops every part; the part's handle gets
    /// its text.
    fn ended(&self, name: &'static str, outcome: std::thread::Result<Result<()>>) -> Result<()> {
        let result =
            outcome.unwrap_or_else(|panic| Err(anyhow!("the {name} panicked: {}", panic_message(panic.as_ref()))));
        let Err(e) = result else { return Ok(()) };
        let e = e.context(name);
        let text = format!("{e:#}");
        tracing::error!("{text}; the daemon stops");
        self.inner
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
        self.inner.shutdown.cancel();
        Err(anyhow!(text))
    }

    /// Runs `part` on the runtime as `name`.
    pub fn spawn<F>(&self, name: &'static str, part: F) -> JoinHandle<Result<()>>
    where
        F: Future<Output = Result<()>> + Send + 'static,
    {
        let supervisor = self.clone();
        tokio::spawn(async move {
            let _running = supervisor.enter(name);
            let outcome = AssertUnwindSafe(part).catch_unwind().await;
            supervisor.ended(name, outcome)
        })
    }

    /// Runs `part` on a thread of its own named `wmvae-<name>`.
    pub fn thread<F>(&self, name: &'static str, part: F) -> Result<std::thread::JoinHandle<Result<()>>>
    where
        F: FnOnce() -> Result<()> + Send + 'static,
    {
        let supervisor = self.clone();
        let thread_name = format!("wmvae-{}", name.replace(' ', "-"));
        let handle = std::thread::Builder::new().name(thread_name).spawn(move || {
            let _running = supervisor.enter(name);
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(part));
            supervisor.ended(name, outcome)
        })?;
        Ok(handle)
    }

    /// Why the daemon stops, when a part failed (taken: asked once).
    pub fn take_failure(&self) -> Option<anyhow::Error> {
        self.inner.failure.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The names of the parts running now.
    pub fn running(&self) -> Vec<&'static str> {
        self.inner
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .copied()
            .collect()
    }
}

/// A part counted as running while this lives.
struct Running {
    id: u64,
    supervisor: Supervisor,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.supervisor
            .inner
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// Ends the process (exit 1, saying where the shutdown was and which
/// parts still ran) when a shutdown outlives its `limit`: whatever a part
/// waits on (a server gone mid-request, a blocking call), the first signal
/// is bounded. Disarmed when dropped.
pub struct Watchdog {
    _disarm: std::sync::mpsc::Sender<()>,
    /// The step of the shutdown under way.
    stage: Arc<Mutex<&'static str>>,
}

impl Watchdog {
    pub fn arm(limit: Duration, supervisor: Supervisor) -> Result<Watchdog> {
        let (disarm, disarmed) = std::sync::mpsc::channel::<()>();
        let stage = Arc::new(Mutex::new("starting the shutdown"));
        let at = stage.clone();
        std::thread::Builder::new()
            .name("wmvae-watchdog".into())
            .spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = disarmed.recv_timeout(limit) {
                    let stage = *at.lock().unwrap_or_else(|p| p.into_inner());
                    let running = supervisor.running();
                    eprintln!(
                    "error: the shutdown did not finish within {limit:?} ([serve] shutdown_grace_secs and a margin): \
                        it was {stage}; parts still running: {}; exiting. Acked frames are in the store, unacked ones \
                        are redelivered, unannounced versions go out at the next start",
                    if running.is_empty() { "none".to_string() } else { running.join(", ") }
                );
                    // SAFETY: _exit only ends the process (no destructors run
                    // under threads that may be inside libtorch or sled).
                    unsafe { libc::_exit(1) }
                }
            })?;
        Ok(Watchdog { _disarm: disarm, stage })
    }

    /// The shutdown is now at `stage` (said if the watchdog fires).
    pub fn at(&self, stage: &'static str) {
        *self.stage.lock().unwrap_or_else(|p| p.into_inner()) = stage;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failing_or_panicking_part_stops_the_others_and_says_why() {
        let supervisor = Supervisor::new(CancellationToken::new());
        let quiet = supervisor.spawn("quiet task", async { Ok(()) });
        assert!(quiet.await.unwrap().is_ok());
        assert!(!supervisor.shutdown().is_cancelled());
        let thread = supervisor.thread("doomed thread", || panic!("out of memory")).unwrap();
        assert!(thread.join().unwrap().is_err());
        assert!(supervisor.shutdown().is_cancelled());
        let failing = supervisor.spawn("second task", async { Err(anyhow!("later")) });
        assert_eq!(
            format!("{:#}", failing.await.unwrap().unwrap_err()),
            "second task: later"
        );
        let reason = supervisor.take_failure().map(|e| format!("{e:#}"));
        assert_eq!(
            reason.as_deref(),
            Some("doomed thread: the doomed thread panicked: out of memory"),
            "the first failure is the reason"
        );
        assert!(supervisor.running().is_empty());
    }
}
