//! The control service's requests and replies, free of NATS: `bus` carries
//! them, this module says what each endpoint does.
//!
//! Endpoints (under `<prefix>.ctl.`): `status` (JSON) and `encode` (a frame
//! message in, a latent message out).

use crate::latents::LatentWorker;
use crate::preprocess::Policy;
use crate::status::StatusBoard;
use crate::wire;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A service error: an HTTP-like code and a message.
#[derive(Debug, Clone)]
pub struct ControlError {
    pub code: usize,
    pub message: String,
}

impl ControlError {
    pub fn bad_request(message: impl Into<String>) -> ControlError {
        ControlError { code: 400, message: message.into() }
    }
    pub fn internal(message: impl Into<String>) -> ControlError {
        ControlError { code: 500, message: message.into() }
    }
}

pub type Reply = Pin<Box<dyn Future<Output = Result<Vec<u8>, ControlError>> + Send>>;
/// (endpoint name, request payload) to a reply.
pub type Handler = Arc<dyn Fn(String, bytes::Bytes) -> Reply + Send + Sync>;

/// The endpoints this build serves.
pub const ENDPOINTS: &[&str] = &["status", "encode"];

/// The handler for [`ENDPOINTS`].
pub fn handler(status: StatusBoard, latents: LatentWorker, policy: Policy) -> Handler {
    Arc::new(move |endpoint: String, payload: bytes::Bytes| {
        let (status, latents) = (status.clone(), latents.clone());
        Box::pin(async move {
            match endpoint.as_str() {
                "status" => serde_json::to_vec(&status.snapshot()).map_err(|e| ControlError::internal(e.to_string())),
                "encode" => {
                    let frame = wire::decode_frame("request", &payload, policy).map_err(|r| ControlError::bad_request(r.to_string()))?;
                    let latent = latents.encode(frame).await.map_err(|e| ControlError::internal(format!("{e:#}")))?;
                    Ok(latent.to_msgpack())
                }
                other => Err(ControlError::bad_request(format!("unknown endpoint {other}"))),
            }
        }) as Reply
    })
}
