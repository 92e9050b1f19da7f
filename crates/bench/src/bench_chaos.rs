//! `wmvae bench chaos`: faults while frames stream in, then the books are
//! checked. One `wmvae serve` (the `wmvae` beside this binary) on one local nats-server; frames
//! published at a steady rate, each awaited until stored (retried by the
//! next one through outages); every few seconds either the daemon is
//! SIGKILLed and started again, or the nats-server is SIGKILLed and
//! restarted on its port and store; malformed frames of every kind listed
//! in [`hostile`] are published alongside. Then the stream is drained,
//! the daemon stopped with SIGTERM, and its store read: every acked frame
//! stored (`lost`), none twice (`duplicates`), every malformed kind
//! dead-lettered with a reason. Figures for BENCHMARKS.md; decides nothing.

use super::bench_daemon::{frame_name, status};
use super::bench_failover::{publish, wait_at_most, Acks, Nodes};
use super::nats_server::LocalNats;
use anyhow::{Context, Result};
use hostile::{hostile, settled, Fate, Hostile};
use rand::Rng;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use wmvae::bus::{Bus, StoredMessage};
use wmvae::config::Config;
use wmvae::store::{BufferConfig, Store};

mod hostile;

/// The node id, so its data is in `<dir>/d`.
const NODE: &str = "d";
/// Time between two faults: long enough for the daemon to start and
/// ingest between them (~1 s to start on this box).
const FAULT_EVERY: Duration = Duration::from_secs(4);
/// How long a killed nats-server stays down.
const SERVER_DOWN: Duration = Duration::from_secs(1);
/// Redelivery of frames a killed daemon held unacked (default 30 s).
const ACK_WAIT_SECS: u64 = 3;
/// The longest the final drain may take.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// How long faults are injected.
    pub seconds: u64,
    /// Good frames published per second.
    pub rate: f64,
    pub nats_server: PathBuf,
}

pub async fn chaos(options: &ChaosOptions) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let result = run(options, dir.path()).await;
    result.with_context(|| {
        let log = std::fs::read_to_string(dir.path().join(format!("{NODE}.log"))).unwrap_or_default();
        format!(
            "the daemon's last words:\n{}",
            log.lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

async fn run(options: &ChaosOptions, dir: &std::path::Path) -> Result<Value> {
    let mut server = LocalNats::start(&options.nats_server)?;
    let mut config = Config::load(None)?;
    config.nats.url = server.url.clone();
    let bus = Bus::connect(&config).await?;
    bus.migrate().await?;
    let mut nodes = Nodes::new();
    nodes.start(NODE, &server.url, dir, &node_env())?;
    wait_at_most(Duration::from_secs(60), "the daemon to serve", || async {
        status(&bus).await.ok()
    })
    .await?;

    let acks = Arc::new(Mutex::new(Acks::default()));
    let stop = CancellationToken::new();
    let publisher = tokio::spawn(publish(bus.clone(), options.rate, acks.clone(), stop.clone()));
    let kinds = hostile();
    let faults = inject_faults(options, &bus, &mut server, &mut nodes, dir, &kinds).await?;
    stop.cancel();
    publisher.await?;
    // Malformed kinds not yet sent (a fault took their turn) go now.
    let mut next_bad = faults.hostile_sent;
    while next_bad < kinds.len() {
        next_bad += usize::from(send_hostile(&bus, &kinds, next_bad).await);
    }
    let acked: HashSet<(String, u64)> = acks
        .lock()
        .unwrap()
        .stored
        .iter()
        .map(|(i, _)| frame_name(*i))
        .collect();
    let publishes_failed = acks.lock().unwrap().failed;
    drain(&bus, &kinds, acked.len()).await;
    let dead_letters = bus.stream_messages("WM_DLQ").await?;
    let latents = bus.stream_messages("WM_LATENTS").await?;
    let exited_cleanly = nodes.terminate(NODE)?;

    let books = read_store(&config, dir, &acked)?;
    let (dead_lettered, encoded) = fates_met(&bus, &kinds, &dead_letters, &latents);
    let expected_letters = kinds.iter().filter(|k| matches!(k.fate, Fate::DeadLetter(_))).count();
    Ok(json!({
        "bench": "chaos",
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "seconds": options.seconds,
        "rate": options.rate,
        "daemon_kills": faults.daemon_kills,
        "server_kills": faults.server_kills,
        "frames_acked": acked.len(),
        "publishes_failed": publishes_failed,
        "frames_stored": books.stored,
        "lost": books.lost,
        "duplicates": books.duplicates,
        "malformed_kinds": expected_letters,
        "malformed_dead_lettered": dead_lettered,
        "odd_identities": kinds.len() - expected_letters,
        "odd_identities_encoded": encoded,
        "daemon_exited_cleanly": exited_cleanly,
    }))
}

/// The daemon's settings: frames redelivered soon after a kill, training
/// and checkpoints early.
fn node_env() -> [(&'static str, String); 3] {
    [
        ("WMVAE_INGEST__ACK_WAIT_SECS", ACK_WAIT_SECS.to_string()),
        ("WMVAE_TRAIN__MIN_FRAMES", "200".to_string()),
        ("WMVAE_TRAIN__CHECKPOINT_EVERY_STEPS", "50".to_string()),
    ]
}

/// Publishes hostile frame `i` until stored; whether it was.
async fn send_hostile(bus: &Bus, kinds: &[Hostile], i: usize) -> bool {
    let kind = &kinds[i];
    bus.publish_frame_bytes(&kind.source, &format!("chaos-bad-{i}"), kind.payload.clone())
        .await
        .is_ok()
}

/// What the fault loop did.
struct Faults {
    daemon_kills: u64,
    server_kills: u64,
    /// Hostile frames sent (the first ones of the list).
    hostile_sent: usize,
}

/// For `options.seconds`: every [`FAULT_EVERY`], a few hostile frames, then
/// the daemon or the nats-server SIGKILLed and started again, at random.
async fn inject_faults(
    options: &ChaosOptions,
    bus: &Bus,
    server: &mut LocalNats,
    nodes: &mut Nodes,
    dir: &std::path::Path,
    kinds: &[Hostile],
) -> Result<Faults> {
    let mut faults = Faults {
        daemon_kills: 0,
        server_kills: 0,
        hostile_sent: 0,
    };
    let per_fault = kinds
        .len()
        .div_ceil((options.seconds / FAULT_EVERY.as_secs()).max(1) as usize);
    let end = Instant::now() + Duration::from_secs(options.seconds);
    while Instant::now() < end {
        tokio::time::sleep(FAULT_EVERY).await;
        // A few malformed kinds between two faults, each awaited until stored.
        for _ in 0..per_fault {
            if faults.hostile_sent < kinds.len() && send_hostile(bus, kinds, faults.hostile_sent).await {
                faults.hostile_sent += 1;
            }
        }
        if rand::thread_rng().gen_bool(0.5) {
            nodes.kill(NODE)?;
            faults.daemon_kills += 1;
            nodes.start(NODE, &server.url, dir, &node_env())?;
        } else {
            server.kill();
            faults.server_kills += 1;
            tokio::time::sleep(SERVER_DOWN).await;
            server.restart()?;
        }
    }
    Ok(faults)
}

/// Waits until the buffer holds every frame acked, the DLQ a letter for
/// every malformed kind and WM_LATENTS a latent for every odd valid one
/// (the last ones were sent just now), or gives up: the books say then
/// what is missing.
async fn drain(bus: &Bus, kinds: &[Hostile], acked: usize) {
    let _ = wait_at_most(
        DRAIN_TIMEOUT,
        "every acked frame in the buffer, every hostile one dead-lettered or encoded",
        || async {
            let s = status(bus).await.ok()?;
            let (letters, latents) = (
                bus.stream_messages("WM_DLQ").await.ok()?,
                bus.stream_messages("WM_LATENTS").await.ok()?,
            );
            let settled = kinds
                .iter()
                .all(|kind| settled(kind, &letters, &latents, bus.subject("latents.")).is_some());
            (s.buffer_frames >= acked as u64 && settled).then_some(())
        },
    )
    .await;
}

/// The good frames' books, from the stopped daemon's store.
struct Books {
    stored: usize,
    /// Acked, not stored.
    lost: usize,
    /// Ingested more than once: ingested beyond those held.
    duplicates: u64,
}

fn read_store(config: &Config, dir: &std::path::Path, acked: &HashSet<(String, u64)>) -> Result<Books> {
    let store = Store::open(
        &dir.join(NODE),
        BufferConfig {
            capacity: config.buffer.capacity,
            validation_fraction: config.buffer.validation_fraction,
        },
    )?;
    let stats = store.stats()?;
    let stored: HashSet<(String, u64)> = store
        .frames_in_order(Some(super::bench_failover::SOURCE), false)
        .map(|f| f.map(|f| (f.episode, f.step)))
        .collect::<Result<_>>()?;
    let lost = acked.iter().filter(|k| !stored.contains(*k)).count();
    let held = store.frames_in_order(None, false).count() as u64;
    Ok(Books {
        stored: stored.len(),
        lost,
        duplicates: stats.frames_ingested.saturating_sub(held),
    })
}

/// Hostile kinds that met their fate: (dead-lettered, encoded); each one
/// that did not is logged.
fn fates_met(bus: &Bus, kinds: &[Hostile], letters: &[StoredMessage], latents: &[StoredMessage]) -> (usize, usize) {
    let (mut dead_lettered, mut encoded) = (0, 0);
    for (i, kind) in kinds.iter().enumerate() {
        match (kind.fate, settled(kind, letters, latents, bus.subject("latents."))) {
            (Fate::DeadLetter(_), Some(true)) => dead_lettered += 1,
            (Fate::Encoded, Some(true)) => encoded += 1,
            (fate, _) => tracing::warn!(
                source = kind.source,
                "hostile kind {i} ({fate:?}) did not meet its fate"
            ),
        }
    }
    (dead_lettered, encoded)
}
