//! Frames a consumer gave up on. Each durable consumer of WM_FRAMES has a
//! `max_deliver` (`[ingest] max_deliver`): a frame delivered that many times
//! without an ack is not delivered again, and the server says so in an
//! advisory. [`forward`] copies each such frame to WM_DLQ with the reason
//! `undeliverable` and the last error this node saw for it ([`Failures`],
//! filled by ingest and the encoder), so a message that keeps failing
//! leaves, with its story, and the consumer moves on.
//!
//! It decides nothing about why frames fail: ingest and the encoder record
//! that; it never acks or terminates (the server already gave up).

use crate::backoff::Backoff;
use crate::bus::{Bus, FrameConsumer, Undeliverable};
use anyhow::Result;
use futures::StreamExt;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// Frames whose last error is remembered, at most (the oldest forgotten):
/// far more than `max_ack_pending` frames are ever in flight at once.
const REMEMBERED: usize = 4096;
/// Longest error text kept per frame: a dead letter's header, not a log.
const ERROR_BYTES: usize = 512;

/// The last error seen for each frame (by WM_FRAMES sequence), bounded.
/// Clones share it.
#[derive(Clone, Default)]
pub struct Failures {
    inner: Arc<Mutex<Remembered>>,
}

/// Each frame's last error, and the frames in the order first seen.
type Remembered = (HashMap<u64, String>, VecDeque<u64>);

impl Failures {
    /// Records `error` as the last failure of frame `stream_sequence`.
    pub fn record(&self, stream_sequence: u64, error: &anyhow::Error) {
        let mut text = format!("{error:#}");
        if text.len() > ERROR_BYTES {
            let cut = (0..=ERROR_BYTES).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
            text.truncate(cut);
        }
        let mut guard = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (errors, order) = &mut *guard;
        if errors.insert(stream_sequence, text).is_none() {
            order.push_back(stream_sequence);
        }
        while order.len() > REMEMBERED {
            if let Some(oldest) = order.pop_front() {
                errors.remove(&oldest);
            }
        }
    }

    /// The last failure recorded for `stream_sequence`, forgotten as it is read.
    fn take(&self, stream_sequence: u64) -> Option<String> {
        let mut guard = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (errors, order) = &mut *guard;
        order.retain(|s| *s != stream_sequence);
        errors.remove(&stream_sequence)
    }
}

/// The dead letter's reason for a frame `consumer` gave up on.
fn reason(consumer: &FrameConsumer, gave_up: Undeliverable, last_error: Option<String>) -> String {
    let last = last_error.unwrap_or_else(|| "none seen by this node (a node may have stopped while holding it)".into());
    format!(
        "undeliverable: delivered {} times on {} without success; last error: {last}",
        gave_up.deliveries,
        consumer.durable_name()
    )
}

/// Copies every frame `consumer` gives up on to WM_DLQ, until `shutdown`.
/// NATS failing under it is waited out: the subscription is made again, a
/// dead letter retried.
pub async fn forward(bus: Bus, consumer: FrameConsumer, failures: Failures, shutdown: CancellationToken) -> Result<()> {
    let mut pause = Backoff::default();
    let failed = |e: &anyhow::Error, next| tracing::warn!("{e:#}; trying again in {next:?}");
    let Some(mut advisories) = pause.retry(&shutdown, || bus.undeliverable(&consumer), failed).await else {
        return Ok(());
    };
    loop {
        let gave_up = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            next = advisories.next() => match next {
                Some(gave_up) => gave_up,
                None => return Ok(()),
            },
        };
        let (sequence, why) = (
            gave_up.stream_sequence,
            reason(&consumer, gave_up, failures.take(gave_up.stream_sequence)),
        );
        let failed = |e: &anyhow::Error, next| {
            tracing::warn!(
                sequence,
                "dead-lettering an undeliverable frame: {e:#}; trying again in {next:?}"
            )
        };
        match pause
            .retry(&shutdown, || bus.dead_letter_sequence(sequence, &why), failed)
            .await
        {
            Some(true) => tracing::warn!(sequence, "frame dead-lettered: {why}"),
            Some(false) => tracing::warn!(sequence, "{why}; the stream no longer holds it"),
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_keep_the_last_error_and_stay_bounded() {
        let failures = Failures::default();
        failures.record(7, &anyhow::anyhow!("first"));
        failures.record(7, &anyhow::anyhow!("second: {}", "é".repeat(400)));
        let last = failures.take(7).unwrap();
        assert!(last.starts_with("second") && last.len() <= ERROR_BYTES, "{last}");
        assert_eq!(failures.take(7), None);
        for seq in 0..(REMEMBERED as u64 + 10) {
            failures.record(seq, &anyhow::anyhow!("e"));
        }
        assert_eq!(failures.take(0), None, "the oldest are forgotten");
        assert!(failures.take(REMEMBERED as u64 + 9).is_some());
    }
}
