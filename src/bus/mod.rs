//! Everything NATS, the only folder that touches async-nats: the
//! connection ([`Bus`], `connection.rs`), the migrations of streams,
//! consumers and buckets (`migrate.rs`), the frame feed and dead letters
//! (`feed.rs`), the KV buckets nodes agree through (`kv`), publishing
//! frames, latents and announcements (`publish.rs`),
//! the checkpoint object bucket (`objects.rs`), the control service
//! (`service.rs`), the messages' schemas ([`messages`]), and reading
//! streams whole from outside for benches and tests (`inspect.rs`).
//!
//! It moves bytes and acks; it does not decode frames (`frames`), store
//! them (`store`) or decide what an endpoint answers (`daemon`).

mod connection;
mod error;
mod feed;
pub mod headers;
mod inspect;
pub mod kv;
pub mod messages;
mod migrate;
mod objects;
mod publish;
mod relay;
pub mod service;

pub use error::Error;
pub use feed::{Delivery, FrameFeed, Undeliverable};
pub use inspect::StoredMessage;
pub use migrate::{latest_store_schema, BusLimits, FrameConsumer, MigrationReport};
pub use objects::CHECKPOINT_BUCKET;
pub use publish::FramePublisher;
pub use publish::LatentPublisher;
pub use relay::RELAY_BYTES;

use crate::config::{Config, NatsConfig};
use anyhow::{bail, Context, Result};
use async_nats::{jetstream, ConnectOptions};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Longest wait for buffered publishes to reach the server.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests queued per control endpoint (and discovery subject) on the
/// control connection; past it the client drops them (the requester times
/// out). Endpoints answer one request at a time and a request may be up to
/// the server's `max_payload` (4 MiB in config/nats-server.conf), so this
/// bounds what a flood of requests can make the daemon hold: 16 MiB an
/// endpoint, about 22 subscriptions x 4 x 4 MiB at the very most.
/// Operators and scrapers send a handful at a time.
const CONTROL_QUEUE: usize = 4;
/// How often dropped control requests are logged, at most.
const SLOW_CONTROL_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// A connected client with its JetStream context.
#[derive(Clone)]
pub struct Bus {
    limits: BusLimits,
    /// Disconnections seen since connecting (each is followed by a reconnect attempt).
    disconnects: Arc<AtomicU64>,
    /// Connections made, the first included: a new value is a reconnect.
    connects: tokio::sync::watch::Receiver<u64>,
    client: async_nats::Client,
    /// The connection the control service runs on: the daemon's own, with a
    /// short request queue, as `[nats] control_user` when set; the CLI's
    /// `client`.
    control: async_nats::Client,
    js: jetstream::Context,
    prefix: String,
}

impl Bus {
    /// Connects, waiting up to [`connection::STARTUP_PATIENCE`] for a server
    /// that is still starting (for the daemon); reconnects for ever after.
    pub async fn connect(config: &Config) -> Result<Bus> {
        Self::open(
            &config.nats,
            BusLimits::from_config(config),
            connection::STARTUP_PATIENCE,
            false,
        )
        .await
    }

    /// Connects once, failing fast when no server answers (for the CLI).
    pub async fn connect_once(config: &Config) -> Result<Bus> {
        Self::open(&config.nats, BusLimits::from_config(config), Duration::ZERO, true).await
    }

    async fn open(config: &NatsConfig, limits: BusLimits, patience: Duration, once: bool) -> Result<Bus> {
        let disconnects = Arc::new(AtomicU64::new(0));
        let (connected, connects) = watch::channel(0u64);
        let connected = Arc::new(connected);
        let make = || client_options(config, disconnects.clone(), connected.clone(), once);
        let client = connection::connect(config, patience, make).await?;
        tracing::debug!(url = %config.url, auth = config.auth_kind(), "NATS connected");
        // The daemon's control service on its own connection (never for the
        // CLI): as `[nats] control_user` when configured, else as the main
        // user; either way with a short request queue ([`CONTROL_QUEUE`]).
        let control = match once {
            false => connection::connect(config, patience, || control_client_options(config))
                .await
                .context("the control service's connection")?,
            true => client.clone(),
        };
        let js = jetstream::new(client.clone());
        Ok(Bus {
            limits,
            disconnects,
            connects,
            client,
            control,
            js,
            prefix: config.prefix.clone(),
        })
    }

    /// The largest message the server takes (its `max_payload`).
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    /// Whether the connection to the server is up now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Messages stream `name` holds now.
    pub async fn stream_len(&self, name: &str) -> Result<u64> {
        Ok(self.stream_info(name).await?.state.messages)
    }

    /// Stream `name`'s configuration and state as the server holds them now.
    async fn stream_info(&self, name: &str) -> Result<async_nats::jetstream::stream::Info> {
        let mut stream = self
            .js
            .get_stream(name)
            .await
            .with_context(|| format!("stream {name}"))?;
        Ok(stream
            .info()
            .await
            .with_context(|| format!("reading stream {name}"))?
            .clone())
    }

    /// Disconnections since the daemon connected (each one reconnects).
    pub fn disconnects(&self) -> u64 {
        self.disconnects.load(Ordering::Relaxed)
    }

    /// Waits for the next reconnect after this call (for ever when the
    /// client is gone).
    pub async fn reconnected(&self) {
        let mut connects = self.connects.clone();
        connects.mark_unchanged();
        if connects.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    pub fn subject(&self, rest: &str) -> String {
        format!("{}.{rest}", self.prefix)
    }

    /// Pushes buffered core-NATS publishes to the server; gives up after
    /// [`FLUSH_TIMEOUT`] so a lost server never wedges a caller (or shutdown).
    pub async fn flush(&self) -> Result<()> {
        match tokio::time::timeout(FLUSH_TIMEOUT, self.client.flush()).await {
            Ok(result) => result.context("flushing to NATS"),
            Err(_) => bail!("flushing to NATS timed out after {FLUSH_TIMEOUT:?} (server unreachable?)"),
        }
    }
}

/// The main connection's options: it counts disconnections and connections; no reconnects when `once`.
async fn client_options(
    config: &NatsConfig,
    disconnects: Arc<AtomicU64>,
    connected: Arc<watch::Sender<u64>>,
    once: bool,
) -> Result<ConnectOptions> {
    let options = connection::options(config)
        .await?
        .event_callback(move |event| client_event(event, disconnects.clone(), connected.clone()));
    Ok(if once { options.max_reconnects(0) } else { options })
}

/// Counts a disconnection or a connection of the main connection; logs the server's errors.
async fn client_event(event: async_nats::Event, disconnects: Arc<AtomicU64>, connected: Arc<watch::Sender<u64>>) {
    match event {
        async_nats::Event::Disconnected => {
            disconnects.fetch_add(1, Ordering::Relaxed);
        }
        async_nats::Event::Connected => connected.send_modify(|n| *n += 1),
        // Permission violations and the like: the server's words.
        async_nats::Event::ServerError(e) => tracing::warn!("NATS server: {e}"),
        _ => {}
    }
}

/// The control connection's options: as `[nats] control_user` when set, else as the main user, with a short
/// request queue ([`CONTROL_QUEUE`]).
async fn control_client_options(config: &NatsConfig) -> Result<ConnectOptions> {
    let options = match connection::control_options(config) {
        Some(options) => options,
        None => connection::options(config).await?.name("wmvae-control"),
    };
    // A flood would log a line per dropped request: one a minute.
    let last_said = Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
    Ok(options
        .subscription_capacity(CONTROL_QUEUE)
        .event_callback(move |event| control_event(event, last_said.clone())))
}

/// Logs the control connection's server errors, and that requests are dropped (at most once a
/// [`SLOW_CONTROL_LOG_INTERVAL`]).
async fn control_event(event: async_nats::Event, last_said: Arc<std::sync::Mutex<Option<std::time::Instant>>>) {
    match event {
        async_nats::Event::ServerError(e) => tracing::warn!("NATS server (control connection): {e}"),
        async_nats::Event::SlowConsumer(_) => {
            let mut last = last_said.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_none_or(|at| at.elapsed() >= SLOW_CONTROL_LOG_INTERVAL) {
                *last = Some(std::time::Instant::now());
                tracing::warn!("control requests arrive faster than they are answered; the excess is dropped");
            }
        }
        _ => {}
    }
}
