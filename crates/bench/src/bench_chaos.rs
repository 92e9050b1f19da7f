//! `wmvae bench chaos`: faults while frames stream in, then the books are
//! checked. One `wmvae serve` (the `wmvae` beside this binary) on one local nats-server; frames
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
use anyhow::{Context, Result};
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use wmvae::bus::messages::LatentMessage;
use wmvae::bus::{Bus, StoredMessage};
use wmvae::config::Config;
use wmvae::frames::identity::{message_id, MAX_EPISODE_BYTES};
use wmvae::frames::wire::{FrameMessage, MAX_ACTION_LEN, MAX_SIDE, MAX_STEP};
use wmvae::store::{BufferConfig, Store};

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

/// What must become of a hostile frame.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    /// Dead-lettered with a reason starting with this code.
    DeadLetter(&'static str),
    /// Valid, however odd its identity: stored, and a latent for it under
    /// its own id (two such frames must not share one).
    Encoded,
}

/// A hostile frame: where it is published, its bytes, and its fate.
struct Hostile {
    source: String,
    payload: Vec<u8>,
    fate: Fate,
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
    let episode = |e: &str| with(&[("episode", Some(V::S(e.into())))]);
    kinds.extend([
        ("invalid_field", with(&[("step", Some(V::S("one".into())))])),
        ("invalid_field", with(&[("height", Some(V::I(-1)))])),
        // A string where bytes belong is read as its bytes: too few of them.
        ("size_mismatch", with(&[("pixels", Some(V::S("pixels".into())))])),
        ("invalid_field", with(&[("episode", Some(V::U(5)))])),
        ("bad_episode", episode("")),
        ("bad_episode", episode(&"e".repeat(MAX_EPISODE_BYTES + 1))),
        // Identities that once reached a header unchecked (a CR or LF made
        // async-nats panic in a worker: no latent after them).
        ("bad_episode", episode("a\nb")),
        ("bad_episode", episode("a\rb")),
        ("bad_episode", episode("a\0b")),
        ("bad_episode", episode("tab\there")),
        ("bad_episode", episode("c1\u{85}")),
        ("bad_step", with(&[("step", Some(V::U(MAX_STEP + 1)))])),
        ("bad_transition", with(&[("action", Some(V::A(vec![V::F(f64::NAN)])))])),
        (
            "bad_transition",
            with(&[("action", Some(V::A(vec![V::F(f64::INFINITY)])))]),
        ),
        (
            "bad_transition",
            with(&[("action", Some(V::A(vec![V::F(0.0); MAX_ACTION_LEN + 1])))]),
        ),
        ("bad_transition", with(&[("reward", Some(V::F(f64::NAN)))])),
        ("bad_transition", with(&[("reward", Some(V::F(f64::NEG_INFINITY)))])),
        ("bad_dimensions", with(&[("height", Some(V::U(0)))])),
        ("bad_dimensions", with(&[("width", Some(V::U(0)))])),
        (
            "bad_dimensions",
            with(&[("height", Some(V::U(u64::from(MAX_SIDE) + 1)))]),
        ),
        ("wrong_channels", with(&[("channels", Some(V::U(1)))])),
        ("wrong_channels", with(&[("channels", Some(V::U(4)))])),
        (
            "size_mismatch",
            with(&[("pixels", Some(V::B(vec![7; 64 * 64 * 3 - 1])))]),
        ),
        (
            "size_mismatch",
            with(&[("pixels", Some(V::B(vec![7; 64 * 64 * 3 + 1])))]),
        ),
        ("size_mismatch", with(&[("pixels", Some(V::B(Vec::new())))])),
        ("unknown_encoding", with(&[("encoding", Some(V::S("jpeg".into())))])),
        ("unknown_encoding", with(&[("encoding", Some(V::S(String::new())))])),
        (
            "bad_png",
            with(&[
                ("encoding", Some(V::S("png".into()))),
                ("pixels", Some(V::B(b"\x89PNG not really".to_vec()))),
            ]),
        ),
        (
            "bad_png",
            with(&[
                ("encoding", Some(V::S("png".into()))),
                ("pixels", Some(V::B(vec![0; 100]))),
            ]),
        ),
        (
            "unsupported_size",
            with(&[
                ("height", Some(V::U(32))),
                ("width", Some(V::U(32))),
                ("pixels", Some(V::B(vec![7; 32 * 32 * 3]))),
            ]),
        ),
        (
            "unsupported_size",
            with(&[
                ("height", Some(V::U(100))),
                ("width", Some(V::U(80))),
                ("pixels", Some(V::B(vec![7; 100 * 80 * 3]))),
            ]),
        ),
    ]);
    kinds
}

/// Every hostile frame: the malformed kinds from [`BAD_SOURCE`]; a source
/// with a control character; and valid frames whose identities would have
/// shared one message id (`/` in a source or an episode) or need escaping,
/// which must each get their own latent.
fn hostile() -> Vec<Hostile> {
    let mut all: Vec<Hostile> = malformed()
        .into_iter()
        .map(|(code, payload)| Hostile {
            source: BAD_SOURCE.into(),
            payload,
            fate: Fate::DeadLetter(code),
        })
        .collect();
    let episode = |e: &str| with(&[("episode", Some(V::S(e.into())))]);
    all.push(Hostile {
        source: format!("{BAD_SOURCE}\u{1}x"),
        payload: with(&[]),
        fate: Fate::DeadLetter("bad_subject"),
    });
    for (source, episode_name) in [
        (format!("{BAD_SOURCE}/a"), "1"),
        (BAD_SOURCE.to_string(), "a/1"),
        (BAD_SOURCE.to_string(), "run 5%/x é"),
    ] {
        all.push(Hostile {
            source,
            payload: episode(episode_name),
            fate: Fate::Encoded,
        });
    }
    all
}

/// Whether `kind` met its fate: None while nothing is there yet, Some(false)
/// when something else became of it (a letter with another reason, a
/// latent under another episode), Some(true) when it did.
fn settled(
    kind: &Hostile,
    letters: &[StoredMessage],
    latents: &[StoredMessage],
    latent_prefix: String,
) -> Option<bool> {
    match kind.fate {
        Fate::DeadLetter(code) => {
            let letter = letters.iter().find(|m| m.payload.as_ref() == kind.payload.as_slice())?;
            Some(letter.reason.as_deref().is_some_and(|r| r.starts_with(code)))
        }
        Fate::Encoded => {
            let frame: FrameMessage = rmp_serde::from_slice(&kind.payload).ok()?;
            let subject = format!("{latent_prefix}{}", kind.source);
            let of_frame = |m: &&StoredMessage| {
                m.subject == subject
                    && rmp_serde::from_slice::<LatentMessage>(&m.payload)
                        .is_ok_and(|l| l.episode == frame.episode && l.step == frame.step)
            };
            let latent = latents.iter().find(of_frame)?;
            Some(latent.id.as_deref() == Some(message_id(&kind.source, &frame.episode, frame.step).as_str()))
        }
    }
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
    let env = [
        ("WMVAE_INGEST__ACK_WAIT_SECS", ACK_WAIT_SECS.to_string()),
        ("WMVAE_TRAIN__MIN_FRAMES", "200".to_string()),
        ("WMVAE_TRAIN__CHECKPOINT_EVERY_STEPS", "50".to_string()),
    ];
    let mut nodes = Nodes::new();
    nodes.start(NODE, &server.url, dir, &env)?;
    wait_at_most(Duration::from_secs(60), "the daemon to serve", || async {
        status(&bus).await.ok()
    })
    .await?;

    let acks = Arc::new(Mutex::new(Acks::default()));
    let stop = CancellationToken::new();
    let publisher = tokio::spawn(publish(bus.clone(), options.rate, acks.clone(), stop.clone()));
    let kinds = hostile();
    let (mut daemon_kills, mut server_kills) = (0u64, 0u64);
    let mut next_bad = 0;
    let end = Instant::now() + Duration::from_secs(options.seconds);
    while Instant::now() < end {
        tokio::time::sleep(FAULT_EVERY).await;
        // A few malformed kinds between two faults, each awaited until stored.
        for _ in 0..kinds
            .len()
            .div_ceil((options.seconds / FAULT_EVERY.as_secs()).max(1) as usize)
        {
            if let Some(kind) = kinds.get(next_bad) {
                if bus
                    .publish_frame_bytes(&kind.source, &format!("chaos-bad-{next_bad}"), kind.payload.clone())
                    .await
                    .is_ok()
                {
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
        let kind = &kinds[next_bad];
        let sent = bus
            .publish_frame_bytes(&kind.source, &format!("chaos-bad-{next_bad}"), kind.payload.clone())
            .await;
        next_bad += usize::from(sent.is_ok());
    }
    let acked: HashSet<(String, u64)> = acks
        .lock()
        .unwrap()
        .stored
        .iter()
        .map(|(i, _)| frame_name(*i))
        .collect();
    let publishes_failed = acks.lock().unwrap().failed;
    // Drained: the buffer holds every frame acked, the DLQ a letter for
    // every malformed kind and WM_LATENTS a latent for every odd valid one
    // (the last ones were sent just now), or the wait gave up and the books
    // below say what is missing.
    let _ = wait_at_most(
        DRAIN_TIMEOUT,
        "every acked frame in the buffer, every hostile one dead-lettered or encoded",
        || async {
            let s = status(&bus).await.ok()?;
            let (letters, latents) = (
                bus.stream_messages("WM_DLQ").await.ok()?,
                bus.stream_messages("WM_LATENTS").await.ok()?,
            );
            let settled = kinds
                .iter()
                .all(|kind| settled(kind, &letters, &latents, bus.subject("latents.")).is_some());
            (s.buffer_frames >= acked.len() as u64 && settled).then_some(())
        },
    )
    .await;
    let dead_letters = bus.stream_messages("WM_DLQ").await?;
    let latents = bus.stream_messages("WM_LATENTS").await?;
    let exited_cleanly = nodes.terminate(NODE)?;

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
    // Frames ingested more than once show as ingested beyond those held.
    let held = store.frames_in_order(None, false).count() as u64;
    let (mut dead_lettered, mut encoded) = (0, 0);
    for (i, kind) in kinds.iter().enumerate() {
        match (
            kind.fate,
            settled(kind, &dead_letters, &latents, bus.subject("latents.")),
        ) {
            (Fate::DeadLetter(_), Some(true)) => dead_lettered += 1,
            (Fate::Encoded, Some(true)) => encoded += 1,
            (fate, _) => tracing::warn!(
                source = kind.source,
                "hostile kind {i} ({fate:?}) did not meet its fate"
            ),
        }
    }
    let expected_letters = kinds.iter().filter(|k| matches!(k.fate, Fate::DeadLetter(_))).count();
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
        "duplicates": stats.frames_ingested.saturating_sub(held),
        "malformed_kinds": expected_letters,
        "malformed_dead_lettered": dead_lettered,
        "odd_identities": kinds.len() - expected_letters,
        "odd_identities_encoded": encoded,
        "daemon_exited_cleanly": exited_cleanly,
    }))
}
