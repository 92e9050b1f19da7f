//! Properties of the replay buffer under random traffic, on a real sled
//! store (proptest): group commits of new and repeated frames from a few
//! sources and episodes, evictions at capacity, and reopening, while a
//! sampler thread draws batches the whole time. After every step: the
//! bounds hold, no frame is held twice, every held frame is one committed
//! (pixels intact), the counters survive a reopen, and sampling never fails
//! or returns anything but committed pixels.

use proptest::prelude::*;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use wmvae::frames::{Frame, BYTES};
use wmvae::store::{compress_frames, BufferConfig, Split, Store};

/// A frame's identity: (source, episode, step).
type Key = (u8, u8, u16);

#[derive(Debug, Clone)]
enum Op {
    /// One group commit of these frames (repeats included).
    Commit(Vec<Key>),
    /// Close the store and open it again.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => prop::collection::vec((0u8..2, 0u8..4, 0u16..40), 1..24).prop_map(Op::Commit),
        1 => Just(Op::Reopen),
    ]
}

fn id(key: Key) -> u64 {
    u64::from(key.0) << 24 | u64::from(key.1) << 16 | u64::from(key.2)
}

/// Pixels that say whose they are: the id in the first 8 bytes, then a pattern of it.
fn pixels(key: Key) -> Vec<u8> {
    let id = id(key);
    let mut px: Vec<u8> = (0..BYTES).map(|i| (id as usize * 31 + i * 7) as u8).collect();
    px[..8].copy_from_slice(&id.to_le_bytes());
    px
}

/// Whether `px` are the pixels of a committed frame.
fn committed_pixels(px: &[u8], committed: &HashMap<u64, Key>) -> bool {
    let id = u64::from_le_bytes(px[..8].try_into().unwrap());
    committed.get(&id).is_some_and(|key| px == pixels(*key))
}

fn frame(key: Key) -> Frame {
    Frame {
        source: format!("s{}", key.0),
        episode: format!("e{}", key.1),
        step: u64::from(key.2),
        pixels: pixels(key).into(),
        action: None,
        reward: None,
        done: None,
    }
}

/// Draws batches from the train split until stopped; panics on a failed
/// draw or pixels that were never committed.
fn sampler(store: Store, committed: Arc<HashMap<u64, Key>>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut rng = rand::thread_rng();
        let mut draws = 0;
        while !stop.load(Ordering::Relaxed) {
            if let Some(batch) = store.sample(Split::Train, 8, &mut rng).expect("sampling failed") {
                assert!(
                    batch.chunks(BYTES).all(|px| committed_pixels(px, &committed)),
                    "sampled pixels never committed"
                );
                draws += 1;
            }
        }
        draws
    })
}

fn check(store: &Store, config: &BufferConfig, committed: &HashMap<u64, Key>) -> Result<(), TestCaseError> {
    let (train, validation) = (store.len(Split::Train), store.len(Split::Validation));
    prop_assert!(
        train + validation <= config.capacity,
        "{train} + {validation} frames held, capacity {}",
        config.capacity
    );
    let held: Vec<Frame> = store
        .frames_in_order(None, true)
        .collect::<anyhow::Result<_>>()
        .unwrap();
    prop_assert_eq!(held.len() as u64, train + validation);
    let keys: HashSet<(String, String, u64)> = held
        .iter()
        .map(|f| (f.source.clone(), f.episode.clone(), f.step))
        .collect();
    prop_assert_eq!(keys.len(), held.len(), "a frame is held twice");
    prop_assert!(
        held.iter().all(|f| committed_pixels(&f.pixels, committed)),
        "a held frame's pixels were never committed"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn commits_evictions_and_reopens_keep_the_buffer_sound(ops in prop::collection::vec(op(), 1..16), capacity in 20u64..120) {
        let dir = tempfile::tempdir().unwrap();
        let config = BufferConfig { capacity, validation_fraction: 0.25 };
        let every: HashMap<u64, Key> = (0u8..2).flat_map(|s| (0u8..4).flat_map(move |e| (0u16..40).map(move |t| (s, e, t)))).map(|k| (id(k), k)).collect();
        let every = Arc::new(every);
        let mut committed: HashMap<u64, Key> = HashMap::new();
        let mut store = Store::open(dir.path(), config).unwrap();
        let mut ingested = 0;
        let stop = Arc::new(AtomicBool::new(false));
        // The sampler checks against every possible frame (it runs ahead of
        // this thread's bookkeeping); `check` against those committed.
        let mut drawing = sampler(store.clone(), every.clone(), stop.clone());
        for op in ops {
            match op {
                Op::Commit(keys) => {
                    let frames: Vec<Frame> = keys.iter().map(|k| frame(*k)).collect();
                    let compressed = compress_frames(&frames);
                    store.commit(&frames, compressed, &[]).unwrap();
                    committed.extend(keys.iter().map(|k| (id(*k), *k)));
                }
                Op::Reopen => {
                    stop.store(true, Ordering::Relaxed);
                    drawing.join().unwrap();
                    let before = store.stats().unwrap();
                    drop(store);
                    store = Store::open(dir.path(), config).unwrap();
                    let after = store.stats().unwrap();
                    prop_assert_eq!((before.frames, before.frames_ingested, before.duplicates, before.evicted), (after.frames, after.frames_ingested, after.duplicates, after.evicted));
                    stop.store(false, Ordering::Relaxed);
                    drawing = sampler(store.clone(), every.clone(), stop.clone());
                }
            }
            prop_assert!(store.frames_ingested() >= ingested, "frames_ingested went down");
            ingested = store.frames_ingested();
            check(&store, &config, &committed)?;
        }
        stop.store(true, Ordering::Relaxed);
        drawing.join().unwrap();
    }
}
