//! The control service's endpoints, free of NATS: `bus` carries requests
//! and replies, this module says what each endpoint does. Under
//! `<prefix>.ctl.`:
//!
//! - `status`: JSON (step, active version, buffer frames, images/s, losses, device)
//! - `encode`: a frame message in, a latent message out
//! - `checkpoints.list|show|history|recon`: read the store (JSON; PNG for recon)
//! - `checkpoints.rollback|pin|unpin|delete|import`: carried out by the
//!   trainer between two steps
//!
//! Checkpoint requests are JSON [`CheckpointRequest`]s. Errors carry a code:
//! 404 for an unknown version, 400 for a refused request, 500 otherwise.

use crate::bus::Bus;
use crate::config::Config;
use crate::latents::LatentWorker;
use crate::ops::{self, UnknownVersion};
use crate::status::StatusBoard;
use crate::store::Store;
use crate::trainer::Command;
use crate::wire;
use anyhow::anyhow;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// A service error: an HTTP-like code and a message.
#[derive(Debug, Clone)]
pub struct ControlError {
    pub code: usize,
    pub message: String,
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ControlError {}

impl From<anyhow::Error> for ControlError {
    fn from(e: anyhow::Error) -> ControlError {
        let code = if e.downcast_ref::<UnknownVersion>().is_some() { 404 } else { 400 };
        ControlError { code, message: format!("{e:#}") }
    }
}

/// The body of every `checkpoints.*` request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckpointRequest {
    #[serde(default)]
    pub version: Option<u64>,
    #[serde(default)]
    pub reason: Option<String>,
    /// Who asks: a NATS user or user@host.
    #[serde(default)]
    pub by: Option<String>,
    /// `checkpoints.import`: the uploaded weights' object name in the bucket.
    #[serde(default)]
    pub object: Option<String>,
}

pub type Reply = Pin<Box<dyn Future<Output = Result<Vec<u8>, ControlError>> + Send>>;
/// (endpoint name, request payload) to a reply.
pub type Handler = Arc<dyn Fn(String, bytes::Bytes) -> Reply + Send + Sync>;

/// The endpoints this build serves.
pub const ENDPOINTS: &[&str] = &[
    "status",
    "encode",
    "buffer.stats",
    "checkpoints.list",
    "checkpoints.show",
    "checkpoints.history",
    "checkpoints.recon",
    "checkpoints.rollback",
    "checkpoints.pin",
    "checkpoints.unpin",
    "checkpoints.delete",
    "checkpoints.import",
];

/// What the endpoints reach.
#[derive(Clone)]
pub struct Context {
    pub status: StatusBoard,
    pub latents: LatentWorker,
    pub store: Store,
    pub bus: Bus,
    pub commands: mpsc::Sender<Command>,
    pub config: Config,
}

fn json(value: &impl Serialize) -> Result<Vec<u8>, ControlError> {
    serde_json::to_vec(value).map_err(|e| ControlError { code: 500, message: e.to_string() })
}

/// Runs a store read off the runtime.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> Result<T, ControlError> {
    Ok(tokio::task::spawn_blocking(work).await.map_err(|e| ControlError { code: 500, message: e.to_string() })??)
}

/// Hands a command to the trainer and waits for its answer.
async fn ask_trainer<T>(commands: &mpsc::Sender<Command>, make: impl FnOnce(oneshot::Sender<anyhow::Result<T>>) -> Command) -> Result<T, ControlError> {
    let (reply, answer) = oneshot::channel();
    commands.send(make(reply)).await.map_err(|_| anyhow!("the trainer has stopped"))?;
    Ok(answer.await.map_err(|_| anyhow!("the trainer has stopped"))??)
}

async fn checkpoints(ctx: Context, action: &str, request: CheckpointRequest) -> Result<Vec<u8>, ControlError> {
    let version = || request.version.ok_or_else(|| ControlError { code: 400, message: "request lacks \"version\"".into() });
    let by = request.by.clone().unwrap_or_else(|| "unknown".into());
    let store = ctx.store.clone();
    match action {
        "list" => json(&blocking(move || ops::list(&store)).await?),
        "show" => {
            let v = version()?;
            json(&blocking(move || ops::show(&store, v)).await?)
        }
        "history" => json(&blocking(move || ops::history(&store)).await?),
        "recon" => {
            let (v, config) = (version()?, ctx.config.clone());
            blocking(move || ops::recon_png(&store, v, &config)).await
        }
        "rollback" => {
            let (v, reason) = (version()?, request.reason.clone());
            let from = ask_trainer(&ctx.commands, |reply| Command::Rollback { version: v, by, reason, reply }).await?;
            json(&serde_json::json!({ "from": from, "to": v }))
        }
        "pin" | "unpin" => {
            let (v, pinned) = (version()?, action == "pin");
            ask_trainer(&ctx.commands, |reply| Command::Pin { version: v, pinned, reply }).await?;
            json(&serde_json::json!({ "version": v, "pinned": pinned }))
        }
        "delete" => {
            let v = version()?;
            json(&ask_trainer(&ctx.commands, |reply| Command::Delete { version: v, reply }).await?)
        }
        "import" => {
            let object = request.object.clone().ok_or_else(|| ControlError { code: 400, message: "request lacks \"object\"".into() })?;
            let weights = ctx.bus.get_object(&object).await?.ok_or_else(|| ControlError { code: 400, message: format!("no uploaded object {object}") })?;
            let (origin, reason) = (object.clone(), request.reason.clone());
            let imported = ask_trainer(&ctx.commands, |reply| Command::Import { weights, origin, by, reason, reply }).await;
            ctx.bus.delete_object(&object).await?;
            json(&imported?)
        }
        other => Err(ControlError { code: 404, message: format!("unknown endpoint checkpoints.{other}") }),
    }
}

/// The handler for [`ENDPOINTS`].
pub fn handler(ctx: Context) -> Handler {
    Arc::new(move |endpoint: String, payload: bytes::Bytes| {
        let ctx = ctx.clone();
        Box::pin(async move {
            match endpoint.as_str() {
                "status" => json(&ctx.status.snapshot()),
                "buffer.stats" => {
                    let store = ctx.store.clone();
                    json(&blocking(move || store.stats()).await?)
                }
                "encode" => {
                    let frame = wire::decode_frame("request", &payload, ctx.config.ingest.preprocess)
                        .map_err(|r| ControlError { code: 400, message: r.to_string() })?;
                    Ok(ctx.latents.encode(frame).await?.to_msgpack())
                }
                other => match other.strip_prefix("checkpoints.") {
                    Some(action) => {
                        let request: CheckpointRequest = if payload.is_empty() {
                            CheckpointRequest::default()
                        } else {
                            serde_json::from_slice(&payload).map_err(|e| ControlError { code: 400, message: format!("bad request: {e}") })?
                        };
                        checkpoints(ctx, action, request).await
                    }
                    None => Err(ControlError { code: 404, message: format!("unknown endpoint {other}") }),
                },
            }
        }) as Reply
    })
}
