//! Pauses between tries of work that needs NATS (a JetStream leader
//! election, a reconnect): doubling from 100 ms to 5 s, well under an
//! election's few seconds at first, then not hammering a lost server.
//! Deciding when to give up is the caller's, not this module's.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The first pause.
const FIRST: Duration = Duration::from_millis(100);
/// The longest pause: a server that comes back is noticed within this.
const LONGEST: Duration = Duration::from_secs(5);

pub struct Backoff {
    pub next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { next: FIRST }
    }
}

impl Backoff {
    /// Sleeps the next pause; false when `shutdown` came first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = self.sleep() => true,
        }
    }

    /// Sleeps the next pause.
    pub async fn sleep(&mut self) {
        let pause = self.next;
        self.next = (self.next * 2).min(LONGEST);
        tokio::time::sleep(pause).await;
    }
}
