//! Pauses between tries of work that may fail for a while (NATS electing
//! a leader or reconnecting, a full disk): doubling from a first pause to a
//! longest one, short at first, then not hammering what is down. The one
//! retry pause of the crate, and its one retry loop ([`Backoff::retry`]);
//! deciding when to give up is the caller's.

use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The defaults, for work that needs NATS: 100 ms, well under an
/// election's few seconds, doubling to 5 s, within which a server that
/// comes back is noticed.
const FIRST: Duration = Duration::from_millis(100);
const LONGEST: Duration = Duration::from_secs(5);

pub struct Backoff {
    /// The pause the next wait takes.
    pub next: Duration,
    first: Duration,
    longest: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new(FIRST, LONGEST)
    }
}

impl Backoff {
    pub fn new(first: Duration, longest: Duration) -> Backoff {
        Backoff {
            next: first,
            first,
            longest,
        }
    }

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
        self.next = (self.next * 2).min(self.longest);
        tokio::time::sleep(pause).await;
    }

    /// Whether the pauses have grown to the longest: failing for a while.
    pub fn at_longest(&self) -> bool {
        self.next == self.longest
    }

    /// Tries `attempt` until it succeeds, pausing between failures (each
    /// handed to `failed` with the pause that follows, to say so); after
    /// the success the pauses start over. None when `shutdown` came first.
    pub async fn retry<T, Fut>(
        &mut self,
        shutdown: &CancellationToken,
        mut attempt: impl FnMut() -> Fut,
        mut failed: impl FnMut(&anyhow::Error, Duration),
    ) -> Option<T>
    where
        Fut: Future<Output = anyhow::Result<T>>,
    {
        while !shutdown.is_cancelled() {
            match attempt().await {
                Ok(done) => {
                    self.reset();
                    return Some(done);
                }
                Err(e) => {
                    failed(&e, self.next);
                    if !self.wait(shutdown).await {
                        break;
                    }
                }
            }
        }
        None
    }

    /// After a success: the next failure starts from the first pause.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}
