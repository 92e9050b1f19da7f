//! What each control endpoint does, free of NATS (`bus::service` carries
//! requests and replies). Under `<prefix>.ctl.`:
//!
//! - `status`: JSON (step, active version, buffer frames, images/s, losses, device)
//! - `encode`: a frame message in, a latent message out
//! - `buffer.stats`: the replay buffer's figures
//! - `checkpoints.list|show|history|recon`: read the store (JSON; PNG for
//!   recon); `history` a page at a time, newest first
//! - `checkpoints.rollback|pin|unpin|delete|import`: carried out by the
//!   trainer between two steps
//! - `series.episodes`, `series.page`: a version's series of the buffer,
//!   a page at a time (`crate::series`), for `wmvae series` while the daemon runs
//!
//! Checkpoint requests are JSON [`CheckpointRequest`]s (`bus::messages`). Errors map to codes
//! in one place, [`service_error`]: 404 for an unknown version, 400 for a
//! request we refuse, 500 for our own failures.

use super::encoder::EncoderHandle;
use super::status::StatusBoard;
use super::Error::{self, BadRequest, NotHere};
use crate::bus::messages::{CheckpointRequest, DecodeRequest, PinnedVersion, IMPORTS_PREFIX};
use crate::bus::service::{Caller, Endpoint, Handler, Reply, ServiceError};
use crate::bus::Bus;
use crate::config::Config;
use crate::frames::wire;
use crate::series::{self, Budget, PageRequest, PAGE_FRAMES};
use crate::store::{self, Change, Provenance, Scope, Store};
use crate::vae::checkpoint::Metadata;
use crate::versions;
use anyhow::anyhow;
use futures::TryFutureExt;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The largest upload `checkpoints.import` reads: the World Models VAE's
/// weights are ~17 MB in f32; this leaves room for a wider z or f64 and
/// bounds what one request makes the leader hold in memory.
const MAX_IMPORT_BYTES: u64 = 256 << 20;
/// How long an import's reply waits for the new version to be published
/// (its weights and full checkpoint uploaded, announced, active): an operator
/// who imports and then encodes with it must find it in the object store. A
/// ~17 MB model and its ~52 MB checkpoint take well under a second on a quiet
/// server; this leaves room for a loaded one, under the CLI's
/// [`crate::bus::service::IMPORT_TIMEOUT`].
const IMPORT_PUBLISH_WAIT: Duration = Duration::from_secs(60);

/// An imported version and where the announcer says it is published
/// (dropped unsent if it never is: this node stopped leading).
pub type Imported = (Metadata, oneshot::Receiver<()>);

/// A request for the trainer, carried out between two steps
/// (`commands.rs`), with where its answer goes.
pub enum Command {
    Rollback {
        version: u64,
        provenance: Provenance,
        reply: oneshot::Sender<Result<Option<u64>, Error>>,
    },
    Import {
        weights: Vec<u8>,
        origin: String,
        provenance: Provenance,
        reply: oneshot::Sender<Result<Imported, Error>>,
    },
    Pin {
        version: u64,
        pinned: bool,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Delete {
        version: u64,
        reply: oneshot::Sender<Result<Metadata, Error>>,
    },
}

/// The one mapping of errors to service codes.
pub fn service_error(e: Error) -> ServiceError {
    let code = match &e {
        Error::Store(store::Error::UnknownVersion(_)) | NotHere(_) => 404,
        BadRequest(_) | Error::Store(store::Error::InUse(_)) => 400,
        _ => 500,
    };
    ServiceError {
        code,
        message: format!("{e:#}"),
    }
}

/// What the trainer's endpoints reach.
#[derive(Clone)]
pub struct TrainerSide {
    pub store: Store,
    pub commands: mpsc::Sender<Command>,
}

/// What the endpoints reach; a role's part is there on a node with that role.
#[derive(Clone)]
pub struct Context {
    pub status: StatusBoard,
    pub bus: Bus,
    pub config: Config,
    pub encoder: Option<EncoderHandle>,
    pub trainer: Option<TrainerSide>,
}

fn json(value: &impl Serialize) -> Result<Vec<u8>, Error> {
    Ok(serde_json::to_vec(value).map_err(anyhow::Error::from)?)
}

/// Runs a store read off the runtime.
async fn blocking<T: Send + 'static, E: Into<Error> + Send + 'static>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(anyhow::Error::from)?
        .map_err(Into::into)
}

/// Hands a command to the trainer and waits for its answer.
async fn ask_trainer<T>(
    commands: &mpsc::Sender<Command>,
    make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Command,
) -> Result<T, Error> {
    let (reply, answer) = oneshot::channel();
    commands
        .send(make(reply))
        .await
        .map_err(|_| anyhow!("the trainer has stopped"))?;
    answer.await.map_err(|_| anyhow!("the trainer has stopped"))?
}

/// Latents decoded by one request, at most: a batch the decoder takes at once.
pub const MAX_DECODE_LATENTS: usize = 256;
/// Frames in a row of a decode reply's PNG grid.
const DECODE_GRID_COLUMNS: usize = 16;

/// A `decode` request, checked: 1..=[`MAX_DECODE_LATENTS`] latents of
/// `z_size` finite numbers, whose frames fit in a reply under the server's
/// `max_payload` (a default server's 1 MiB holds 85 frames).
fn decode_request(payload: &[u8], z_size: usize, max_payload: usize) -> Result<DecodeRequest, Error> {
    let request: DecodeRequest =
        rmp_serde::from_slice(payload).map_err(|e| BadRequest(format!("bad decode request: {e}")))?;
    if request.format.as_deref().is_some_and(|f| f != "png" && f != "raw") {
        return Err(BadRequest("format is \"raw\" (the default) or \"png\"".into()));
    }
    let n = request.z.len();
    if n == 0 || n > MAX_DECODE_LATENTS {
        return Err(BadRequest(format!(
            "{n} latents: a decode request takes 1..={MAX_DECODE_LATENTS}"
        )));
    }
    if let Some(bad) = request
        .z
        .iter()
        .find(|z| z.len() != z_size || !z.iter().all(|x| x.is_finite()))
    {
        return Err(BadRequest(format!(
            "a latent of {} numbers: each must be {z_size} finite numbers",
            bad.len()
        )));
    }
    // The reply's frames plus room for its map and the version.
    let fits = max_payload.saturating_sub(64) / crate::frames::BYTES;
    if n > fits {
        return Err(BadRequest(format!(
            "{n} frames do not fit in one reply under this server's max_payload of \
            {max_payload} bytes: send at most {fits} latents a request"
        )));
    }
    Ok(request)
}

fn checkpoint_request(payload: &[u8]) -> Result<CheckpointRequest, Error> {
    if payload.is_empty() {
        return Ok(CheckpointRequest::default());
    }
    serde_json::from_slice(payload).map_err(|e| BadRequest(format!("bad request: {e}")))
}

/// Answers one request to `endpoint`.
async fn answer(ctx: Context, endpoint: Endpoint, payload: bytes::Bytes, caller: Caller) -> Result<Vec<u8>, Error> {
    match endpoint {
        Endpoint::Status => json(&ctx.status.snapshot()),
        Endpoint::Encode => {
            let encoder = ctx.encoder.as_ref().ok_or(NotHere("encoder"))?;
            let frame = wire::decode_frame("request", &payload, ctx.config.ingest.preprocess)
                .map_err(|r| BadRequest(r.to_string()))?;
            let pinned: PinnedVersion = rmp_serde::from_slice(&payload).unwrap_or_default();
            Ok(encoder.encode(frame, pinned.version).await?.to_msgpack())
        }
        Endpoint::Decode => {
            let encoder = ctx.encoder.as_ref().ok_or(NotHere("encoder"))?;
            let request = decode_request(&payload, ctx.config.model.z_size as usize, ctx.bus.max_payload())?;
            let mut reply = encoder.decode(request.z.concat(), request.version).await?;
            if request.format.as_deref() == Some("png") {
                let frames = std::mem::take(&mut reply.frames);
                let rows: Vec<&[u8]> = frames.chunks(DECODE_GRID_COLUMNS * crate::frames::BYTES).collect();
                reply.png = Some(crate::frames::grid::png_grid(
                    &rows,
                    request.z.len().min(DECODE_GRID_COLUMNS),
                )?);
            }
            Ok(rmp_serde::to_vec_named(&reply).map_err(anyhow::Error::from)?)
        }
        Endpoint::SeriesEpisodes | Endpoint::SeriesPage => {
            let trainer = ctx.trainer.as_ref().ok_or(NotHere("trainer"))?;
            answer_series(&ctx, trainer.store.clone(), endpoint, &payload).await
        }
        _ => {
            let trainer = ctx.trainer.clone().ok_or(NotHere("trainer"))?;
            answer_trainer(&ctx, trainer, endpoint, &payload, caller).await
        }
    }
}

/// The series endpoints: JSON requests; the episodes in JSON, a page in
/// MessagePack, each under the server's `max_payload`. A page is encoded
/// here, on the trainer's device, by the requested version's stored weights.
async fn answer_series(ctx: &Context, store: Store, endpoint: Endpoint, payload: &[u8]) -> Result<Vec<u8>, Error> {
    let max_bytes = ctx.bus.max_payload();
    let bad = |e: serde_json::Error| BadRequest(format!("bad {} request: {e}", endpoint.name()));
    if endpoint == Endpoint::SeriesEpisodes {
        let scope: Scope = serde_json::from_slice(payload).map_err(bad)?;
        return json(&blocking(move || series::episodes_page(&store, &scope, max_bytes)).await?);
    }
    let request: PageRequest = serde_json::from_slice(payload).map_err(bad)?;
    let budget = Budget {
        frames: request.limit.unwrap_or(PAGE_FRAMES).clamp(1, PAGE_FRAMES),
        bytes: max_bytes,
    };
    let (device, vae) = (ctx.config.train.device, ctx.config.vae());
    let page = blocking(move || -> Result<_, Error> {
        let net = versions::network(&store, request.version, device.resolve()?, vae)?;
        Ok(series::page(&store, &net, request.version, request.scope, budget)?)
    })
    .await?;
    Ok(rmp_serde::to_vec_named(&page).map_err(anyhow::Error::from)?)
}

/// The trainer's endpoints: the buffer's figures and the checkpoints.
/// A change is recorded as by the `caller` the server authenticated; the
/// request's own `by` only where no server vouches for anyone.
async fn answer_trainer(
    ctx: &Context,
    trainer: TrainerSide,
    endpoint: Endpoint,
    payload: &[u8],
    caller: Caller,
) -> Result<Vec<u8>, Error> {
    let request = checkpoint_request(payload)?;
    let version = || {
        request
            .version
            .ok_or_else(|| BadRequest("request lacks \"version\"".into()))
    };
    let by = caller
        .0
        .or_else(|| request.by.clone())
        .unwrap_or_else(|| "unknown".into());
    let TrainerSide { store, commands } = trainer;
    match endpoint {
        Endpoint::BufferStats => json(&blocking(move || store.stats()).await?),
        Endpoint::List => json(&blocking(move || versions::list(&store)).await?),
        Endpoint::Show => {
            let v = version()?;
            json(&blocking(move || versions::show(&store, v)).await?)
        }
        Endpoint::History => {
            let (before, limit) = (request.before, request.limit);
            let page = blocking(move || versions::history_page(&store, before, limit)).await?;
            match before.is_some() || limit.is_some() {
                true => json(&page),
                // The request from before pages: the newest page, as the bare list it was.
                false => json(&page.entries),
            }
        }
        Endpoint::Recon => {
            let (v, config) = (version()?, ctx.config.clone());
            blocking(move || versions::recon_png(&store, v, &config)).await
        }
        Endpoint::Rollback | Endpoint::Pin | Endpoint::Unpin | Endpoint::Delete => {
            change(&commands, endpoint, version()?, by, request.reason.clone()).await
        }
        Endpoint::Import => import(ctx, &commands, &request, by).await,
        Endpoint::Status | Endpoint::Encode | Endpoint::Decode | Endpoint::SeriesEpisodes | Endpoint::SeriesPage => {
            Err(anyhow!("{} is not a trainer endpoint", endpoint.name()).into())
        }
    }
}

/// A change of one version the trainer makes between two steps: roll
/// back to it, pin or unpin it, delete it.
async fn change(
    commands: &mpsc::Sender<Command>,
    endpoint: Endpoint,
    v: u64,
    by: String,
    reason: Option<String>,
) -> Result<Vec<u8>, Error> {
    match endpoint {
        Endpoint::Rollback => {
            let provenance = Provenance::operator(Change::Rollback, by, reason);
            let from = ask_trainer(commands, |reply| Command::Rollback {
                version: v,
                provenance,
                reply,
            })
            .await?;
            json(&serde_json::json!({ "from": from, "to": v }))
        }
        Endpoint::Pin | Endpoint::Unpin => {
            let pinned = endpoint == Endpoint::Pin;
            ask_trainer(commands, |reply| Command::Pin {
                version: v,
                pinned,
                reply,
            })
            .await?;
            json(&serde_json::json!({ "version": v, "pinned": pinned }))
        }
        Endpoint::Delete => json(&ask_trainer(commands, |reply| Command::Delete { version: v, reply }).await?),
        _ => Err(anyhow!("{} changes no version", endpoint.name()).into()),
    }
}

/// An upload under [`IMPORTS_PREFIX`] made a version by the trainer, then
/// deleted (a refused one stays for the operator to look at).
async fn import(
    ctx: &Context,
    commands: &mpsc::Sender<Command>,
    request: &CheckpointRequest,
    by: String,
) -> Result<Vec<u8>, Error> {
    let object = request
        .object
        .clone()
        .ok_or_else(|| BadRequest("request lacks \"object\"".into()))?;
    if !object.starts_with(IMPORTS_PREFIX) {
        return Err(BadRequest(format!(
            "only uploads under {IMPORTS_PREFIX} can be imported, not {object}"
        )));
    }
    let weights = match ctx.bus.get_object_at_most(&object, MAX_IMPORT_BYTES).await {
        Ok(Some(weights)) => weights,
        Ok(None) => return Err(BadRequest(format!("no uploaded object {object}"))),
        Err(e @ crate::bus::Error::TooLarge { .. }) => return Err(BadRequest(format!("{e:#}"))),
        Err(e) => return Err(e.into()),
    };
    versions::check_weights(&weights, &object, &ctx.config).map_err(|e| BadRequest(format!("{e:#}")))?;
    let (origin, reason) = (object.clone(), request.reason.clone());
    let provenance = Provenance::operator(Change::Import, by, reason);
    let (imported, published) = ask_trainer(commands, |reply| Command::Import {
        weights,
        origin,
        provenance,
        reply,
    })
    .await?;
    // The upload is gone only once it is a version; a refused one stays for the operator to look at.
    ctx.bus.delete_object(&object).await?;
    let version = imported.version;
    match tokio::time::timeout(IMPORT_PUBLISH_WAIT, published).await {
        Ok(Ok(())) => json(&imported),
        Ok(Err(_)) => Err(anyhow!(
            "v{version} is imported and active in this node's store, but not published: this node stopped leading"
        )
        .into()),
        Err(_) => Err(anyhow!(
            "v{version} is imported and active, but still not published after {IMPORT_PUBLISH_WAIT:?}; see the daemon's log"
        )
        .into()),
    }
}

/// The handler for every [`Endpoint`].
pub fn handler(ctx: Context) -> Handler {
    Arc::new(move |endpoint: Endpoint, payload: bytes::Bytes, caller: Caller| {
        Box::pin(answer(ctx.clone(), endpoint, payload, caller).map_err(service_error)) as Reply
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_404_400_and_500() {
        assert_eq!(service_error(store::Error::UnknownVersion(7).into()).code, 404);
        let message = service_error(store::Error::UnknownVersion(7).into()).message;
        assert_eq!(message, "no checkpoint version 7 (unknown or deleted)");
        assert_eq!(service_error(BadRequest("request lacks \"version\"".into())).code, 400);
        assert_eq!(service_error(store::Error::InUse(3).into()).code, 400);
        assert_eq!(service_error(NotHere("encoder")).code, 404);
        let ours = service_error(anyhow!("sled: I/O error").into());
        assert_eq!(service_error(store::Error::Other(anyhow!("sled")).into()).code, 500);
        assert_eq!((ours.code, ours.message.as_str()), (500, "sled: I/O error"));
    }

    #[test]
    fn checkpoint_requests_parse_or_are_bad_requests() {
        assert_eq!(checkpoint_request(b"").unwrap().version, None);
        assert_eq!(
            checkpoint_request(br#"{"version": 4, "reason": "r"}"#).unwrap().version,
            Some(4)
        );
        let refused = service_error(checkpoint_request(b"{not json").unwrap_err());
        assert_eq!(refused.code, 400);
        assert!(refused.message.starts_with("bad request"), "{}", refused.message);
    }
}
