//! `wmvae bench chaos`: faults while frames stream in, then the books are
//! checked. One `wmvae serve` (this binary) on one local nats-server; frames
//! published at a steady rate, each awaited until stored (retried by the
//! next one through outages); every few seconds either the daemon is
//! SIGKILLed and started again, or the nats-server is SIGKILLed and
//! restarted on its port and store; malformed frames of every kind listed
//! in [`malformed`] are published alongside. Then the stream is drained,
//! the daemon stopped with SIGTERM, and its store read: every acked frame
//! stored (`lost`), none twice (`duplicates`), every malformed kind
//! dead-lettered with a reason. Figures for BENCHMARKS.md; decides nothing.

use super::bench_daemon::{frame_name, status};
use super::bench_failover::{publish, wait_at_most, Acks, Nodes};
use super::nats_server::LocalNats;
use crate::bus::Bus;
use crate::config::Config;
use crate::frames::wire::{MAX_ACTION_LEN, MAX_EPISODE_BYTES, MAX_SIDE, MAX_STEP};
use crate::store::{BufferConfig, Store};
use anyhow::{Context, Result};
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The node id, so its data is in `<dir>/d`.
const NODE: &str = "d";
/// The source malformed frames come from (good ones come from `bench`).
const BAD_SOURCE: &str = "chaos";
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

/// A MessagePack value for building malformed frames field by field.
#[derive(Serialize, Clone)]
#[serde(untagged)]
enum V {
    U(u64),
    I(i64),
    F(f64),
    S(String),
    B(#[serde(with = "serde_bytes")] Vec<u8>),
    A(Vec<V>),
}

fn pack(map: &BTreeMap<&str, V>) -> Vec<u8> {
    rmp_serde::to_vec_named(map).expect("a map of plain values serialises")
}

/// A valid 64x64 raw frame's fields.
fn good_fields() -> BTreeMap<&'static str, V> {
    BTreeMap::from([
        ("episode", V::S("bad".into())),
        ("step", V::U(1)),
        ("height", V::U(64)),
        ("width", V::U(64)),
        ("channels", V::U(3)),
        ("pixels", V::B(vec![7; 64 * 64 * 3])),
    ])
}

/// `good_fields` with `changes` applied (None removes the field).
fn with(changes: &[(&'static str, Option<V>)]) -> Vec<u8> {
    let mut map = good_fields();
    for (key, value) in changes {
        match value {
            Some(v) => map.insert(key, v.clone()),
            None => map.remove(key),
        };
    }
    pack(&map)
}

/// Every kind of malformed frame tried, each with the reason it must be
/// dead-lettered with.
fn malformed() -> Vec<(&'static str, Vec<u8>)> {
    let valid = with(&[]);
    let mut kinds: Vec<(&'static str, Vec<u8>)> = vec![
        ("malformed_msgpack", vec![]),
        ("malformed_msgpack", vec![0xc1]),
        ("malformed_msgpack", valid[..5].to_vec()),
        ("malformed_msgpack", valid[..valid.len() / 2].to_vec()),
        ("malformed_msgpack", valid[..valid.len() - 1].to_vec()),
        // Valid MessagePack, but no frame map: JSON's `{` is the integer 123.
        ("invalid_field", b"{\"episode\": \"json\"}".to_vec()),
        ("invalid_field", vec![0x93, 1, 2, 3]),
        ("invalid_field", vec![0x2a]),
        ("invalid_field", vec![0xff; 64]),
        ("invalid_field", vec![0x00; 64]),
    ];
    for field in ["episode", "step", "height", "width", "channels", "pixels"] {
        kinds.push(("invalid_field", with(&[(field, None)])));
    }
    kinds.extend([
        ("invalid_field", with(&[("step", Some(V::S("one".into())))])),
        ("invalid_field", with(&[("height", Some(V::I(-1)))])),
        // A string where bytes belong is read as its bytes: too few of them.
        ("size_mismatch", with(&[("pixels", Some(V::S("pixels".into())))])),
        ("invalid_field", with(&[("episode", Some(V::U(5)))])),
        ("bad_episode", with(&[("episode", Some(V::S(String::new())))])),
        ("bad_episode", with(&[("episode", Some(V::S("e".repeat(MAX_EPISODE_BYTES + 1))))])),
        ("bad_step", with(&[("step", Some(V::U(MAX_STEP + 1)))])),
        ("bad_transition", with(&[("action", Some(V::A(vec![V::F(f64::NAN)])))])),
        ("bad_transition", with(&[("action", Some(V::A(vec![V::F(f64::INFINITY)])))])),
        ("bad_transition", with(&[("action", Some(V::A(vec![V::F(0.0); MAX_ACTION_LEN + 1])))])),
        ("bad_transition", with(&[("reward", Some(V::F(f64::NAN)))])),
        ("bad_transition", with(&[("reward", Some(V::F(f64::NEG_INFINITY)))])),
        ("bad_dimensions", with(&[("height", Some(V::U(0)))])),
        ("bad_dimensions", with(&[("width", Some(V::U(0)))])),
        ("bad_dimensions", with(&[("height", Some(V::U(u64::from(MAX_SIDE) + 1)))])),
        ("wrong_channels", with(&[("channels", Some(V::U(1)))])),
        ("wrong_channels", with(&[("channels", Some(V::U(4)))])),
        ("size_mismatch", with(&[("pixels", Some(V::B(vec![7; 64 * 64 * 3 - 1])))])),
        ("size_mismatch", with(&[("pixels", Some(V::B(vec![7; 64 * 64 * 3 + 1])))])),
        ("size_mismatch", with(&[("pixels", Some(V::B(Vec::new())))])),
        ("unknown_encoding", with(&[("encoding", Some(V::S("jpeg".into())))])),
        ("unknown_encoding", with(&[("encoding", Some(V::S(String::new())))])),
        ("bad_png", with(&[("encoding", Some(V::S("png".into()))), ("pixels", Some(V::B(b"\x89PNG not really".to_vec())))])),
        ("bad_png", with(&[("encoding", Some(V::S("png".into()))), ("pixels", Some(V::B(vec![0; 100])))])),
        ("unsupported_size", with(&[("height", Some(V::U(32))), ("width", Some(V::U(32))), ("pixels", Some(V::B(vec![7; 32 * 32 * 3])))])),
        ("unsupported_size", with(&[("height", Some(V::U(100))), ("width", Some(V::U(80))), ("pixels", Some(V::B(vec![7; 100 * 80 * 3])))])),
    ]);
    kinds
}

pub async fn chaos(options: &ChaosOptions) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let result = run(options, dir.path()).await;
    result.with_context(|| {
        let log = std::fs::read_to_string(dir.path().join(format!("{NODE}.log"))).unwrap_or_default();
        format!("the daemon's last words:\n{}", log.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"))
    })
}

async fn run(options: &ChaosOptions, dir: &std::path::Path) -> Result<Value> {
    let mut server = LocalNats::start(&options.nats_server)?;
    let mut config = Config::load(None)?;
    config.nats.url = server.url.clone();
    let bus = Bus::connect(&config).await?;
    bus.migrate().await?;
    let env = [("WMVAE_INGEST__ACK_WAIT_SECS", ACK_WAIT_SECS.to_string()), ("WMVAE_TRAIN__MIN_FRAMES", "200".to_string()), ("WMVAE_TRAIN__CHECKPOINT_EVERY_STEPS", "50".to_string())];
    let mut nodes = Nodes::new();
    nodes.start(NODE, &server.url, dir, &env)?;
    wait_at_most(Duration::from_secs(60), "the daemon to serve", || async { status(&bus).await.ok() }).await?;

    let acks = Arc::new(Mutex::new(Acks::default()));
    let stop = CancellationToken::new();
    let publisher = tokio::spawn(publish(bus.clone(), options.rate, acks.clone(), stop.clone()));
    let kinds = malformed();
    let (mut daemon_kills, mut server_kills) = (0u64, 0u64);
    let mut next_bad = 0;
    let end = Instant::now() + Duration::from_secs(options.seconds);
    while Instant::now() < end {
        tokio::time::sleep(FAULT_EVERY).await;
        // A few malformed kinds between two faults, each awaited until stored.
        for _ in 0..kinds.len().div_ceil((options.seconds / FAULT_EVERY.as_secs()).max(1) as usize) {
            if let Some((_, payload)) = kinds.get(next_bad) {
                if bus.publish_frame_bytes(BAD_SOURCE, &format!("chaos-bad-{next_bad}"), payload.clone()).await.is_ok() {
                    next_bad += 1;
                }
            }
        }
        if rand::thread_rng().gen_bool(0.5) {
            nodes.kill(NODE)?;
            daemon_kills += 1;
            nodes.start(NODE, &server.url, dir, &env)?;
        } else {
            server.kill();
            server_kills += 1;
            tokio::time::sleep(SERVER_DOWN).await;
            server.restart()?;
        }
    }
    stop.cancel();
    publisher.await?;
    // Malformed kinds not yet sent (a fault took their turn) go now.
    while next_bad < kinds.len() {
        let sent = bus.publish_frame_bytes(BAD_SOURCE, &format!("chaos-bad-{next_bad}"), kinds[next_bad].1.clone()).await;
        next_bad += usize::from(sent.is_ok());
    }
    let acked: HashSet<(String, u64)> = acks.lock().unwrap().stored.iter().map(|(i, _)| frame_name(*i)).collect();
    let publishes_failed = acks.lock().unwrap().failed;
    // Drained: the buffer holds every frame acked and the DLQ a letter for
    // every malformed kind (the last ones were sent just now), or the wait
    // gave up and the books below say what is missing.
    let _ = wait_at_most(DRAIN_TIMEOUT, "every acked frame in the buffer, every malformed one dead-lettered", || async {
        let s = status(&bus).await.ok()?;
        let letters = bus.stream_messages("WM_DLQ").await.ok()?;
        let all_lettered = kinds.iter().all(|(_, payload)| letters.iter().any(|m| m.payload.as_ref() == payload.as_slice()));
        (s.buffer_frames >= acked.len() as u64 && all_lettered).then_some(())
    })
    .await;
    let dead_letters = bus.stream_messages("WM_DLQ").await?;
    let exited_cleanly = nodes.terminate(NODE)?;

    let store = Store::open(&dir.join(NODE), BufferConfig { capacity: config.buffer.capacity, validation_fraction: config.buffer.validation_fraction })?;
    let stats = store.stats()?;
    let stored: HashSet<(String, u64)> = store.frames_in_order(Some(super::bench_failover::SOURCE), false).map(|f| f.map(|f| (f.episode, f.step))).collect::<Result<_>>()?;
    let lost = acked.iter().filter(|k| !stored.contains(*k)).count();
    let good_stored = stats.frames_ingested;
    let reason_of = |payload: &[u8]| dead_letters.iter().find(|m| m.payload.as_ref() == payload).and_then(|m| m.reason.clone());
    let mut dead_lettered = 0;
    for (i, (expected, payload)) in kinds.iter().enumerate() {
        match reason_of(payload) {
            Some(reason) if reason.starts_with(expected) => dead_lettered += 1,
            other => tracing::warn!("malformed kind {i} ({expected}) dead-lettered as {other:?}"),
        }
    }
    Ok(json!({
        "bench": "chaos",
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "seconds": options.seconds,
        "rate": options.rate,
        "daemon_kills": daemon_kills,
        "server_kills": server_kills,
        "frames_acked": acked.len(),
        "publishes_failed": publishes_failed,
        "frames_stored": stored.len(),
        "lost": lost,
        "duplicates": good_stored.saturating_sub(stored.len() as u64),
        "malformed_kinds": kinds.len(),
        "malformed_dead_lettered": dead_lettered,
        "daemon_exited_cleanly": exited_cleanly,
    }))
}
