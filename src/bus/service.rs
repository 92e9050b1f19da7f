//! The `wmvae` NATS micro service (`$SRV.PING` finds it): one endpoint per
//! name under `<prefix>.ctl.`, each request handed to a [`Handler`], and the
//! client side of a request. Errors travel as a [`ServiceError`] with an
//! HTTP-like code. What each endpoint does is `daemon::control`'s.

use super::Bus;
use crate::config::Roles;
use anyhow::Context;
use anyhow::{anyhow, Result};
use async_nats::Request;
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The micro service's name, as `$SRV.PING` discovery shows it.
pub const SERVICE_NAME: &str = "wmvae";
/// How long the CLI waits for a request's reply: async-nats's default.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the CLI waits for an import's reply: the daemon answers once the
/// new version is published (uploads of tens of MB), or after a minute.
pub const IMPORT_TIMEOUT: Duration = Duration::from_secs(90);
/// A service error: an HTTP-like code (404 unknown, 400 refused request,
/// 500 our fault) and a message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ServiceError {
    pub code: usize,
    pub message: String,
}

/// The endpoints this build serves (names pinned by PROTOCOL.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Status,
    Encode,
    Decode,
    BufferStats,
    List,
    Show,
    History,
    Recon,
    Rollback,
    Pin,
    Unpin,
    Delete,
    Import,
    SeriesEpisodes,
    SeriesPage,
}

impl Endpoint {
    pub const ALL: [Endpoint; 15] = [
        Endpoint::Status,
        Endpoint::Encode,
        Endpoint::Decode,
        Endpoint::BufferStats,
        Endpoint::List,
        Endpoint::Show,
        Endpoint::History,
        Endpoint::Recon,
        Endpoint::Rollback,
        Endpoint::Pin,
        Endpoint::Unpin,
        Endpoint::Delete,
        Endpoint::Import,
        Endpoint::SeriesEpisodes,
        Endpoint::SeriesPage,
    ];

    /// Whether an encoder serves it (every encoder replica: one answers).
    fn encoders(self) -> bool {
        matches!(self, Endpoint::Encode | Endpoint::Decode)
    }

    /// The endpoints every node with `roles` serves: `status`, and `encode`
    /// and `decode` on an encoder.
    pub fn served_by(roles: Roles) -> Vec<Endpoint> {
        Endpoint::ALL
            .into_iter()
            .filter(|e| *e == Endpoint::Status || (e.encoders() && roles.encoder))
            .collect()
    }

    /// The endpoints only the leading trainer serves: the buffer's, the
    /// checkpoints' and the series' (made from the buffer it holds).
    pub fn leader_only() -> Vec<Endpoint> {
        Endpoint::ALL
            .into_iter()
            .filter(|e| *e != Endpoint::Status && !e.encoders())
            .collect()
    }

    /// How long a caller waits for the reply.
    fn timeout(self) -> Duration {
        match self {
            Endpoint::Import => IMPORT_TIMEOUT,
            _ => REQUEST_TIMEOUT,
        }
    }

    /// The name under `<prefix>.ctl.`.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Status => "status",
            Endpoint::Encode => "encode",
            Endpoint::Decode => "decode",
            Endpoint::BufferStats => "buffer.stats",
            Endpoint::List => "checkpoints.list",
            Endpoint::Show => "checkpoints.show",
            Endpoint::History => "checkpoints.history",
            Endpoint::Recon => "checkpoints.recon",
            Endpoint::Rollback => "checkpoints.rollback",
            Endpoint::Pin => "checkpoints.pin",
            Endpoint::Unpin => "checkpoints.unpin",
            Endpoint::Delete => "checkpoints.delete",
            Endpoint::Import => "checkpoints.import",
            Endpoint::SeriesEpisodes => "series.episodes",
            Endpoint::SeriesPage => "series.page",
        }
    }
}

/// Service metadata keys naming a node.
const NODE_ID_KEY: &str = "node_id";
const ROLES_KEY: &str = "roles";
/// How long [`Bus::service_nodes`] listens for pongs: a local or LAN
/// server answers in milliseconds.
const DISCOVERY_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// A node as the service's metadata names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub roles: Roles,
}

/// A handler's answer: the reply's bytes or a service error.
pub type Reply = Pin<Box<dyn Future<Output = Result<Vec<u8>, ServiceError>> + Send>>;
/// (endpoint, request payload, who asked) to a reply.
pub type Handler = Arc<dyn Fn(Endpoint, Bytes, Caller) -> Reply + Send + Sync>;

/// Who sent a request, as the server authenticated them: the user named by
/// the `Nats-Request-Info` header, which a server adds to a request that
/// crossed a service import with `share` (the control service in its own
/// account, config/nats-permissions.conf). None without one: nobody vouches
/// for the caller then.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller(pub Option<String>);

impl Caller {
    fn of(message: &async_nats::Message) -> Caller {
        let info = message.headers.as_ref().and_then(|h| h.get("Nats-Request-Info"));
        let user = info
            .and_then(|i| serde_json::from_str::<serde_json::Value>(i.as_str()).ok())
            .and_then(|i| i["user"].as_str().map(str::to_string));
        Caller(user.filter(|u| !u.is_empty()))
    }
}
/// This node's status as JSON, for `$SRV.STATS` (answered synchronously).
pub type StatusProbe = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Answers `which`'s requests through `handler` until `shutdown` (or the endpoint ends).
async fn answer_requests(
    mut endpoint: async_nats::service::endpoint::Endpoint,
    which: Endpoint,
    handler: Handler,
    shutdown: CancellationToken,
) {
    let name = which.name();
    loop {
        let request = tokio::select! {
            _ = shutdown.cancelled() => break,
            request = endpoint.next() => match request { Some(r) => r, None => break },
        };
        let reply = handler(which, request.message.payload.clone(), Caller::of(&request.message)).await;
        // The error's text may quote the request: through the one header-value function.
        let reply = reply.map(Bytes::from).map_err(|e| async_nats::service::error::Error {
            status: super::headers::value(&e.message).to_string(),
            code: e.code,
        });
        if let Err(e) = request.respond(reply).await {
            tracing::warn!("control {name}: reply failed: {e}");
        }
    }
}

impl Bus {
    /// Runs the `wmvae` micro service (`$SRV.PING` finds it) with one
    /// endpoint of `endpoints` under `<prefix>.ctl.`, until `shutdown`.
    /// Each request's payload goes to `handler` with its endpoint; errors
    /// become service errors carrying their code and text.
    /// `node` (this node's id and roles) is the instance's metadata, so
    /// [`Bus::service_nodes`] finds it. With `probe`, the `status`
    /// endpoint's stats carry this node's status as their `data`, so
    /// [`Bus::node_statuses`] reaches every node (a request reaches one).
    pub async fn serve_control(
        &self,
        handler: Handler,
        endpoints: &[Endpoint],
        node: &NodeInfo,
        probe: Option<StatusProbe>,
        shutdown: CancellationToken,
    ) -> Result<()> {
        use async_nats::service::ServiceExt;
        let metadata = HashMap::from([
            (NODE_ID_KEY.to_string(), node.id.clone()),
            (ROLES_KEY.to_string(), node.roles.to_string()),
        ]);
        let mut builder = self
            .control
            .service_builder()
            .description("World Models VAE trainer: status, encode, checkpoints")
            .metadata(metadata);
        if let Some(probe) = probe {
            let status_subject = self.subject(&format!("ctl.{}", Endpoint::Status.name()));
            builder = builder.stats_handler(move |_, stats| {
                if stats.subject == status_subject {
                    probe()
                } else {
                    serde_json::Value::Null
                }
            });
        }
        let service = builder
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|e| anyhow!("starting the {SERVICE_NAME} service: {e}"))?;
        let group = service.group(self.subject("ctl"));
        let mut tasks = tokio::task::JoinSet::new();
        for &which in endpoints {
            let name = which.name();
            let endpoint = group
                .endpoint(name)
                .await
                .map_err(|e| anyhow!("endpoint {name}: {e}"))?;
            tasks.spawn(answer_requests(endpoint, which, handler.clone(), shutdown.clone()));
        }
        while tasks.join_next().await.is_some() {}
        service.stop().await.map_err(|e| anyhow!("stopping the service: {e}"))?;
        Ok(())
    }

    /// The running `wmvae` service instances that answer a ping within
    /// [`DISCOVERY_WAIT`], each with its node's id and roles.
    pub async fn service_nodes(&self) -> Result<Vec<NodeInfo>> {
        let pongs = self.gather("PING").await?;
        Ok(pongs
            .iter()
            .filter_map(|reply| serde_json::from_slice::<async_nats::service::PingResponse>(reply).ok())
            .filter_map(|pong| {
                let roles = pong.metadata.get(ROLES_KEY).and_then(|r| r.parse().ok())?;
                Some(NodeInfo {
                    id: pong.metadata.get(NODE_ID_KEY).cloned().unwrap_or_default(),
                    roles,
                })
            })
            .collect())
    }

    /// Every node's status (as `<prefix>.ctl.status` answers it), from the
    /// `$SRV.STATS` replies within [`DISCOVERY_WAIT`]: in a cluster a status
    /// request reaches one node, the nearest, while this reaches each.
    pub async fn node_statuses(&self) -> Result<Vec<serde_json::Value>> {
        let replies = self.gather("STATS").await?;
        Ok(replies
            .iter()
            .filter_map(|reply| serde_json::from_slice::<async_nats::service::Stats>(reply).ok())
            .flat_map(|stats| {
                stats
                    .endpoints
                    .into_iter()
                    .filter_map(|e| e.data.filter(|d| !d.is_null()))
            })
            .collect())
    }

    /// The replies to `$SRV.<verb>.wmvae` within [`DISCOVERY_WAIT`].
    async fn gather(&self, verb: &str) -> Result<Vec<Bytes>> {
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .with_context(|| format!("subscribing for service {verb} replies"))?;
        self.client
            .publish_with_reply(format!("$SRV.{verb}.{SERVICE_NAME}"), inbox, Bytes::new())
            .await
            .with_context(|| format!("sending the service {verb}"))?;
        let mut gathered = Vec::new();
        let deadline = tokio::time::sleep(DISCOVERY_WAIT);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return Ok(gathered),
                reply = replies.next() => match reply {
                    Some(reply) => gathered.push(reply.payload),
                    None => return Ok(gathered),
                },
            }
        }
    }

    /// A request to a control endpoint (`<prefix>.ctl.<endpoint>`); a
    /// service error comes back as [`super::Error::Service`].
    pub async fn control_request(&self, endpoint: Endpoint, payload: Vec<u8>) -> Result<Bytes, super::Error> {
        let subject = self.subject(&format!("ctl.{}", endpoint.name()));
        let reply = self
            .client
            .send_request(
                subject.clone(),
                Request::new().payload(payload.into()).timeout(Some(endpoint.timeout())),
            )
            .await
            .map_err(|e| anyhow!("{subject}: {e}"))?;
        if let Some(headers) = reply.headers.as_ref() {
            if let Some(error) = headers.get(async_nats::service::NATS_SERVICE_ERROR) {
                let code = headers
                    .get(async_nats::service::NATS_SERVICE_ERROR_CODE)
                    .and_then(|c| c.as_str().parse().ok())
                    .unwrap_or(500);
                return Err(ServiceError {
                    code,
                    message: error.to_string(),
                }
                .into());
            }
        }
        Ok(reply.payload)
    }
}

#[cfg(test)]
mod tests {
    use super::Endpoint;

    /// Each endpoint has its own name, and the names are PROTOCOL.md's.
    #[test]
    fn endpoint_names_are_distinct_and_pinned() {
        let names: Vec<&str> = Endpoint::ALL.iter().map(|e| e.name()).collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        let protocol = include_str!("../../PROTOCOL.md");
        for name in names {
            // PROTOCOL.md lists siblings as `wm.ctl.checkpoints.list`, `.show`, ...
            let sibling = format!("`.{}`", name.rsplit('.').next().unwrap_or(name));
            assert!(
                protocol.contains(&format!("ctl.{name}")) || protocol.contains(&sibling),
                "PROTOCOL.md does not name ctl.{name}"
            );
        }
    }
}
