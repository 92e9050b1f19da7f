//! Reading what the cluster holds, from outside, for the benches and tests
//! that check it: a stream's messages whole (an ordered consumer, no
//! durable state left behind) which server leads a stream's replicas and how they and a consumer stand.
//! Not on the daemon's paths: those consume through `feed`.

use super::Bus;
use anyhow::{bail, Context, Result};
use async_nats::jetstream;
use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use futures::StreamExt;
use std::time::Duration;

/// Longest read of a whole stream before giving up.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// One message as a stream stored it.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// Its stream sequence.
    pub sequence: u64,
    pub subject: String,
    /// Its `Nats-Msg-Id`, when it was published with one.
    pub id: Option<String>,
    /// A dead letter's reason (its `Wmvae-Reason` header).
    pub reason: Option<String>,
    pub payload: bytes::Bytes,
}

impl Bus {
    /// The `server_name` of the server leading stream `name`'s replicas
    /// now; None while it has no leader (an election) or is not clustered.
    pub async fn stream_leader(&self, name: &str) -> Result<Option<String>> {
        let info = self.stream_info(name).await?;
        Ok(info.cluster.as_ref().and_then(|c| c.leader.clone()))
    }

    /// How stream `name`'s replicas stand now, in one line: its leader,
    /// then each other replica (current or not, offline, its lag), for a
    /// history that must say why a stream stopped taking publishes.
    pub async fn stream_replicas(&self, name: &str) -> Result<String> {
        let info = self.stream_info(name).await?;
        let Some(cluster) = &info.cluster else {
            return Ok("not clustered".to_string());
        };
        let replicas: Vec<String> = cluster
            .replicas
            .iter()
            .map(|r| {
                let state = match (r.offline, r.current) {
                    (true, _) => "offline",
                    (false, true) => "current",
                    (false, false) => "behind",
                };
                format!("{} {state} lag {}", r.name, r.lag.unwrap_or(0))
            })
            .collect();
        Ok(format!(
            "leader {}, {}",
            cluster.leader.as_deref().unwrap_or("none"),
            replicas.join(", ")
        ))
    }

    /// How consumer `durable` of stream `stream` stands now, in one line:
    /// its leader, messages not yet delivered, delivered and not acked,
    /// pull requests waiting, redeliveries: a consumer that stopped
    /// delivering shows there.
    pub async fn consumer_state(&self, stream: &str, durable: &str) -> Result<String> {
        let mut consumer: jetstream::consumer::PullConsumer =
            self.js
                .get_consumer_from_stream(durable, stream)
                .await
                .map_err(|e| anyhow::anyhow!("consumer {durable}: {e}"))?;
        let info = consumer
            .info()
            .await
            .map_err(|e| anyhow::anyhow!("reading consumer {durable}: {e}"))?;
        Ok(format!(
            "leader {}, pending {}, ack pending {}, waiting pulls {}, redelivered {}, ack floor {}",
            info.cluster
                .as_ref()
                .and_then(|c| c.leader.as_deref())
                .unwrap_or("none"),
            info.num_pending,
            info.num_ack_pending,
            info.num_waiting,
            info.num_redelivered,
            info.ack_floor.stream_sequence
        ))
    }

    /// Every message stream `name` holds now, oldest first.
    pub async fn stream_messages(&self, name: &str) -> Result<Vec<StoredMessage>> {
        let mut stream = self
            .js
            .get_stream(name)
            .await
            .with_context(|| format!("stream {name}"))?;
        let (messages, last) = {
            let state = &stream
                .info()
                .await
                .with_context(|| format!("reading stream {name}"))?
                .state;
            (state.messages, state.last_sequence)
        };
        if messages == 0 {
            return Ok(Vec::new());
        }
        let consumer = stream
            .create_consumer(OrderedConfig {
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .with_context(|| format!("reading stream {name}"))?;
        let mut stored = consumer
            .messages()
            .await
            .with_context(|| format!("reading stream {name}"))?;
        let mut out = Vec::with_capacity(messages as usize);
        let read = async {
            while let Some(message) = stored.next().await {
                let message = message.with_context(|| format!("reading stream {name}"))?;
                let sequence = message.info().map_err(|e| anyhow::anyhow!("{e}"))?.stream_sequence;
                let header = |name: &str| {
                    message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(name))
                        .map(|v| v.to_string())
                };
                let (id, reason) = (header(super::headers::MSG_ID), header(super::headers::REASON));
                out.push(StoredMessage {
                    sequence,
                    subject: message.subject.to_string(),
                    id,
                    reason,
                    payload: message.payload.clone(),
                });
                if sequence >= last {
                    return Ok(());
                }
            }
            bail!("stream {name} ended early")
        };
        tokio::time::timeout(READ_TIMEOUT, read)
            .await
            .with_context(|| format!("reading stream {name} took over {READ_TIMEOUT:?}"))??;
        Ok(out)
    }
}
