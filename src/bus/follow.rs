//! Following the checkpoint announcements (WM_CHECKPOINTS) as an encoder
//! does: from the newest announcement that made a version active (`created`
//! or `rollback`) on, then each new one as it is stored. An ordered
//! consumer, so none is missed or seen twice. Which version to use is the
//! follower's decision, not this module's.

use super::messages::{Announcement, CheckpointEvent};
use super::migrate::CHECKPOINTS_STREAM;
use super::Bus;
use anyhow::{anyhow, Context, Result};
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use futures::StreamExt;

/// Announcements in stream order.
pub struct AnnouncementFeed {
    messages: pull::Ordered,
}

impl Bus {
    /// The announcements from the one that named the active version on.
    pub async fn follow_announcements(&self) -> Result<AnnouncementFeed> {
        let mut stream = self.js.get_stream(CHECKPOINTS_STREAM).await.with_context(|| format!("stream {CHECKPOINTS_STREAM} (run wmvae migrate)"))?;
        let state = stream.info().await.with_context(|| format!("reading stream {CHECKPOINTS_STREAM}"))?.state.clone();
        // Newest first: the last created or rollback names the active version.
        let mut start = state.last_sequence + 1;
        for sequence in (state.first_sequence.max(1)..=state.last_sequence).rev() {
            let Ok(message) = stream.get_raw_message(sequence).await else { continue };
            let Ok(announcement) = rmp_serde::from_slice::<Announcement>(&message.payload) else { continue };
            if matches!(announcement.event, CheckpointEvent::Created | CheckpointEvent::Rollback) {
                start = sequence;
                break;
            }
        }
        let config = pull::OrderedConfig { deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: start }, ..Default::default() };
        let consumer = stream.create_consumer(config).await.map_err(|e| anyhow!("following {CHECKPOINTS_STREAM}: {e}"))?;
        let messages = consumer.messages().await.map_err(|e| anyhow!("following {CHECKPOINTS_STREAM}: {e}"))?;
        Ok(AnnouncementFeed { messages })
    }
}

impl AnnouncementFeed {
    /// The next announcement that makes a version active (`created` or
    /// `rollback`), waiting for one. When several are already stored, only
    /// the newest is returned: a follower that fell behind skips the
    /// versions superseded meanwhile instead of loading each. None when the
    /// feed ends. An announcement that does not decode is logged and passed over.
    pub async fn next_activation(&mut self) -> Result<Option<Announcement>> {
        let mut newest = None;
        while let Some(message) = self.messages.next().await {
            let message = message.map_err(|e| anyhow!("following {CHECKPOINTS_STREAM}: {e}"))?;
            let pending = message.info().map(|info| info.pending).unwrap_or(0);
            match rmp_serde::from_slice::<Announcement>(&message.payload) {
                Ok(a) if matches!(a.event, CheckpointEvent::Created | CheckpointEvent::Rollback) => newest = Some(a),
                Ok(_) => {}
                Err(e) => tracing::warn!("an announcement on {} does not decode: {e}", message.subject),
            }
            if pending == 0 && newest.is_some() {
                return Ok(newest);
            }
        }
        Ok(newest)
    }
}
