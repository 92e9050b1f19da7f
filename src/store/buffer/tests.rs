//! The buffer against a real sled store in a temporary directory: commit,
//! dedup, eviction, sampling, order, reopen.

use super::*;
use crate::store::Error;

fn commit(store: &Store, frames: &[Frame], rejected: &[Reason]) -> Result<Committed> {
    Ok(store.commit(frames, compress_frames(frames), rejected)?)
}

fn frame(source: &str, episode: &str, step: u64) -> Frame {
    Frame {
        source: source.into(),
        episode: episode.into(),
        step,
        pixels: vec![(step % 256) as u8; frames::BYTES].into(),
        action: Some(vec![step as f32]),
        reward: Some(1.0),
        done: Some(false),
    }
}

fn config(capacity: u64) -> BufferConfig {
    BufferConfig {
        capacity,
        validation_fraction: 0.0,
    }
}

#[test]
fn duplicates_are_stored_once_and_counters_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), config(100)).unwrap();
        let c = commit(
            &store,
            &[frame("a", "e1", 0), frame("a", "e1", 1), frame("a", "e1", 1)],
            &[Reason::BadPng],
        )
        .unwrap();
        assert_eq!((c.stored(), c.duplicates), (2, 1));
        let c = commit(&store, &[frame("a", "e1", 0), frame("b", "e2", 0)], &[]).unwrap();
        assert_eq!((c.stored(), c.duplicates), (1, 1));
    }
    let store = Store::open(dir.path(), config(100)).unwrap();
    let s = store.stats().unwrap();
    assert_eq!((s.frames, s.episodes, s.sources, s.duplicates), (3, 2, 2, 2));
    assert_eq!(s.rejected.get("bad_png"), Some(&1));
    let order: Vec<(String, u64)> = store
        .frames_in_order(None, true)
        .map(|f| f.unwrap())
        .map(|f| (f.episode, f.step))
        .collect();
    assert_eq!(
        order,
        [("e1".to_string(), 0), ("e1".to_string(), 1), ("e2".to_string(), 0)]
    );
}

#[test]
fn capacity_evicts_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config(3)).unwrap();
    commit(&store, &[frame("a", "old", 0), frame("a", "old", 1)], &[]).unwrap();
    let c = commit(&store, &[frame("a", "new", 0), frame("a", "new", 1)], &[]).unwrap();
    assert_eq!(c.evicted, 1);
    let held: Vec<(String, u64)> = store
        .frames_in_order(None, true)
        .map(|f| f.unwrap())
        .map(|f| (f.episode, f.step))
        .collect();
    assert_eq!(
        held,
        [("new".to_string(), 0), ("new".to_string(), 1), ("old".to_string(), 1)]
    );
    // More than the capacity in one batch: only the newest survive.
    commit(
        &store,
        &(10..20).map(|s| frame("b", "burst", s)).collect::<Vec<_>>(),
        &[],
    )
    .unwrap();
    let steps: Vec<u64> = store.frames_in_order(None, true).map(|f| f.unwrap().step).collect();
    assert_eq!(steps, [17, 18, 19]);
    let s = store.stats().unwrap();
    assert_eq!((s.frames, s.episodes, s.sources), (3, 1, 1));
}

#[test]
fn sampling_returns_stored_pixels_and_splits_by_episode() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = BufferConfig {
        capacity: 1000,
        validation_fraction: 0.5,
    };
    let store = Store::open(dir.path(), cfg).unwrap();
    let frames: Vec<Frame> = (0..40)
        .flat_map(|e| (0..3).map(move |s| frame("a", &format!("ep{e}"), s)))
        .collect();
    commit(&store, &frames, &[]).unwrap();
    let (train, validation) = (store.len(Split::Train), store.len(Split::Validation));
    assert_eq!(train + validation, 120);
    assert!(train > 0 && validation > 0, "{train} / {validation}");
    for f in store.frames_in_order(None, true) {
        let f = f.unwrap();
        assert_eq!(f.pixels, vec![(f.step % 256) as u8; frames::BYTES]);
    }
    let batch = store.sample(Split::Train, 5, &mut rand::thread_rng()).unwrap().unwrap();
    assert_eq!(batch.len(), 5 * frames::BYTES);
    assert!(batch
        .chunks(frames::BYTES)
        .all(|p| p.iter().all(|&b| b == p[0]) && p[0] < 3));
}

fn keys_under(store: &Store, prefix: &[u8]) -> Vec<sled::IVec> {
    store.tree.scan_prefix(prefix).keys().map(|k| k.unwrap()).collect()
}

/// Evictions cut through chunks: a chunk goes once its last frame does.
#[test]
fn eviction_removes_chunks_once_all_their_frames_are_gone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config(50)).unwrap();
    for group in 0..3 {
        let frames: Vec<Frame> = (group * 40..(group + 1) * 40).map(|s| frame("a", "e", s)).collect();
        assert_eq!(commit(&store, &frames, &[]).unwrap().stored(), 40);
    }
    let steps: Vec<u64> = store
        .frames_in_order(None, true)
        .map(|f| f.unwrap())
        .map(|f| f.step)
        .collect();
    assert_eq!(steps, (70..120).collect::<Vec<_>>());
    // Each group of 40 is cut into chunks from its first seq on; a chunk stays while it holds a frame from 70 on.
    let firsts: Vec<u64> = keys_under(&store, b"C\0")
        .iter()
        .map(|k| be_u64(&k[2..]).unwrap())
        .collect();
    let expected: Vec<u64> = (0..3u64)
        .flat_map(|g| {
            (g * 40..(g + 1) * 40)
                .step_by(CHUNK_FRAMES)
                .filter(move |&first| (first + CHUNK_FRAMES as u64).min((g + 1) * 40) > 70)
        })
        .collect();
    assert_eq!(firsts, expected);
    let batch = store
        .sample(Split::Train, 200, &mut rand::thread_rng())
        .unwrap()
        .unwrap();
    assert!(batch
        .chunks(frames::BYTES)
        .all(|p| (70..120).any(|s| p == vec![(s % 256) as u8; frames::BYTES].as_slice())));
    assert_eq!(
        commit(&store, &[frame("a", "e", 69), frame("a", "e", 70)], &[])
            .unwrap()
            .duplicates,
        1,
        "69 was evicted, 70 is held"
    );
}

/// `frames` as a schema 2 store held them, at seqs from `first_seq` of
/// the train split: a value per frame under `F` (pixels zlib), an index
/// entry per step under `K`.
fn schema_2_entries(frames: &[Frame], first_seq: u64) -> sled::Batch {
    let mut batch = sled::Batch::default();
    for (seq, f) in (first_seq..).zip(frames) {
        let zpixels = crate::store::upgrade::tests::zlib(&f.pixels);
        batch.insert(
            [&b"F\0"[..], &seq.to_be_bytes()].concat(),
            rmp_serde::to_vec_named(&StoredFrame::of(f, &zpixels)).unwrap(),
        );
        let index = [
            b"K",
            f.source.as_bytes(),
            b"\0",
            f.episode.as_bytes(),
            b"\0",
            &f.step.to_be_bytes(),
        ]
        .concat();
        batch.insert(index, [&[0u8][..], &seq.to_be_bytes()].concat());
    }
    batch
}

/// Writes `batch` with the counters of `frames` held in all, and marks
/// the store schema 2.
fn write_as_schema_2(store: &Store, mut batch: sled::Batch, frames: &[Frame]) {
    let mut counts: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    for f in frames {
        *counts.entry(episode_key(&f.source, &f.episode)).or_default() += 1;
        *counts.entry(source_key(&f.source)).or_default() += 1;
    }
    let episodes = counts.keys().filter(|k| k[0] == b'E').count() as u64;
    let n = frames.len() as u64;
    let counters = Counters {
        head: [n, 0],
        episodes,
        sources: counts.len() as u64 - episodes,
        ingested: n,
        ..Default::default()
    };
    Store::write_counters(&counters, &mut batch);
    for (key, count) in counts {
        batch.insert(key, &count.to_be_bytes());
    }
    batch.insert(meta_key("schema_version"), &2u64.to_be_bytes());
    store.tree.apply_batch(batch).unwrap();
    store.flush().unwrap();
}

fn assert_holds_exactly(store: &Store, frames: &[Frame]) {
    assert!(
        keys_under(store, b"F").is_empty() && keys_under(store, b"K").is_empty(),
        "old keys left"
    );
    assert_eq!(
        store.tree.get(meta_key("schema_version")).unwrap().unwrap().as_ref(),
        crate::store::SCHEMA_VERSION.to_be_bytes()
    );
    let held: Vec<Frame> = store.frames_in_order(None, true).map(|f| f.unwrap()).collect();
    assert_eq!(held.len(), frames.len());
    for (got, want) in held.iter().zip(frames) {
        assert_eq!(
            (&got.source, &got.episode, got.step, &got.pixels, &got.action),
            (&want.source, &want.episode, want.step, &want.pixels, &want.action)
        );
    }
}

/// A schema 2 store is rewritten into chunks and blocks at open, and
/// holds the same frames afterwards.
#[test]
fn schema_2_buffers_are_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let frames: Vec<Frame> = (0..40)
        .map(|s| frame("a", "old", s))
        .chain((0..5).map(|s| frame("b", "other", 100 + s)))
        .collect();
    {
        let store = Store::open(dir.path(), config(1000)).unwrap();
        write_as_schema_2(&store, schema_2_entries(&frames, 0), &frames);
    }
    let store = Store::open(dir.path(), config(1000)).unwrap();
    assert_holds_exactly(&store, &frames);
    let c = commit(&store, &[frame("a", "old", 39), frame("a", "old", 40)], &[]).unwrap();
    assert_eq!((c.stored(), c.duplicates), (1, 1));
    let s = store.stats().unwrap();
    assert_eq!((s.frames, s.episodes, s.sources), (46, 2, 2));
    assert_eq!(
        store
            .sample(Split::Train, 10, &mut rand::thread_rng())
            .unwrap()
            .unwrap()
            .len(),
        10 * frames::BYTES
    );
}

/// An upgrade cut short, with some frames already in chunks and some
/// steps already in index blocks, finishes at the next open, merging
/// the rest into the same blocks.
#[test]
fn an_interrupted_upgrade_finishes_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let frames: Vec<Frame> = (0..45).map(|s| frame("a", "old", s)).collect();
    {
        let store = Store::open(dir.path(), config(1000)).unwrap();
        // Frames 0..20 already moved: a chunk at seq 0, steps 0..20 in block 0.
        commit(&store, &frames[..20], &[]).unwrap();
        write_as_schema_2(&store, schema_2_entries(&frames[20..], 20), &frames);
    }
    let store = Store::open(dir.path(), config(1000)).unwrap();
    assert_holds_exactly(&store, &frames);
    assert_eq!(commit(&store, &[frame("a", "old", 30)], &[]).unwrap().duplicates, 1);
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), config(10)).unwrap();
        store
            .tree
            .insert(meta_key("schema_version"), &99u64.to_be_bytes())
            .unwrap();
        store.flush().unwrap();
    }
    let err = Store::open(dir.path(), config(10)).err().unwrap().to_string();
    assert!(
        err.contains("schema version 99") && err.contains("newer wmvae"),
        "{err}"
    );
}

#[test]
fn a_write_failure_on_a_disk_that_takes_writes_latches_a_reopen_for_every_clone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config(100)).unwrap();
    let clone = store.clone();
    // Refused for room: nothing latched, the write is tried again.
    let no_room = Error::NoRoom {
        what: "a batch".into(),
        needed: 1,
        free: 0,
    };
    assert!(store.check_write_failure(&no_room).is_ok());
    assert!(clone.needs_reopen().is_none());
    // Any other failure while the disk takes writes: sled keeps it, so the store must be reopened.
    let latched = Error::Other(anyhow::anyhow!("sled: io error"));
    assert!(matches!(
        store.check_write_failure(&latched),
        Err(Error::NeedsReopen { .. })
    ));
    match clone.needs_reopen() {
        Some(Error::NeedsReopen { dir: d, failed }) => {
            assert_eq!(d, dir.path());
            assert!(failed.contains("sled: io error"), "{failed}");
        }
        other => panic!("not latched: {other:?}"),
    }
}
