//! The registry's unit tests, against real sled stores in temp dirs.

use super::*;
use crate::store::{BufferConfig, Store};

#[test]
fn announcement_is_tracked_per_entry() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path()).registry().clone();
    let (v1, v2) = (add(&s, 1.0), add(&s, 2.0));
    s.activate(v1, &Provenance::operator(Change::Rollback, "ops", None))
        .unwrap();
    let whys = |s: &Registry| {
        s.unannounced_history()
            .unwrap()
            .iter()
            .map(|h| (h.to, h.why))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        whys(&s),
        [(v1, Change::Trained), (v2, Change::Trained), (v1, Change::Rollback)]
    );
    // v2's announcement and the rollback's went out; v1's did not.
    s.mark_announced(v2, false).unwrap();
    s.mark_announced(v1, true).unwrap();
    assert_eq!(whys(&s), [(v1, Change::Trained)]);
    s.mark_history_announced().unwrap();
    assert!(whys(&s).is_empty());
    s.activate(v2, &Provenance::operator(Change::Rollback, "ops", None))
        .unwrap();
    assert_eq!(
        whys(&s),
        [(v2, Change::Rollback)],
        "marks from before do not hide a new entry"
    );
}

fn store(dir: &std::path::Path) -> Store {
    Store::open(
        dir,
        BufferConfig {
            capacity: 10,
            validation_fraction: 0.0,
        },
    )
    .unwrap()
}

fn add(s: &Registry, eval_loss: f64) -> u64 {
    let make = |version| {
        let metadata = Metadata {
            version,
            eval_loss: Some(eval_loss),
            ..Default::default()
        };
        Ok(Checkpoint::new(metadata, vec![version as u8; 8], vec![]))
    };
    s.add(None, make, &Provenance::daemon(Change::Trained))
        .unwrap()
        .metadata
        .version
}

#[test]
fn versions_grow_across_reopen_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let st = store(dir.path());
        let s = st.registry();
        assert_eq!((add(s, 5.0), add(s, 4.0)), (1, 2));
        s.activate(
            1,
            &Provenance::operator(Change::Rollback, "ops@host", Some("bad run".into())),
        )
        .unwrap();
        s.delete(2).unwrap();
    }
    let st = store(dir.path());
    let s = st.registry();
    assert_eq!(add(s, 3.0), 3, "a deleted version's number is never reused");
    let history: Vec<(Option<u64>, u64, Change)> = s
        .history()
        .unwrap()
        .into_iter()
        .map(|h| (h.from, h.to, h.why))
        .collect();
    assert_eq!(
        history,
        [
            (None, 1, Change::Trained),
            (Some(1), 2, Change::Trained),
            (Some(2), 1, Change::Rollback),
            (Some(1), 3, Change::Trained)
        ]
    );
    assert_eq!(s.get(3).unwrap().unwrap().weights, vec![3u8; 8]);
}

#[test]
fn a_damaged_version_is_never_made_active() {
    let dir = tempfile::tempdir().unwrap();
    let st = store(dir.path());
    let s = st.registry();
    assert_eq!((add(s, 5.0), add(s, 4.0)), (1, 2));
    // Flip the byte holding v1's weights (eight 1s: the envelope's last run of them).
    let (chunk, mut bytes) = s.tree.scan_prefix(key(b'V', 1)).next().unwrap().unwrap();
    let at = bytes.windows(8).rposition(|w| w == [1u8; 8]).unwrap();
    let mut damaged = bytes.to_vec();
    damaged[at] ^= 0xff;
    bytes = damaged.into();
    s.tree.insert(chunk, bytes).unwrap();
    let refused = s
        .activate(1, &Provenance::operator(Change::Rollback, "ops@host", None))
        .unwrap_err();
    assert!(format!("{refused:#}").contains("sha256"), "{refused:#}");
    assert_eq!(s.active_version().unwrap(), Some(2));
    assert!(matches!(
        s.activate(9, &Provenance::operator(Change::Rollback, "ops@host", None)),
        Err(Error::UnknownVersion(9))
    ));
}

/// A damaged version is found as such, and made whole by `repair`
/// from a good copy; listing metadata that no longer decodes is rebuilt
/// from the envelope when the store opens, and a version damaged in
/// both stays out of listings.
#[test]
fn damaged_versions_are_found_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let (v1, v2, v3) = {
        let st = store(dir.path());
        let s = st.registry();
        let (v1, v2, v3) = (add(s, 5.0), add(s, 4.0), add(s, 3.0));
        let good = s.get(v1).unwrap().unwrap();
        let (chunk, bytes) = s.tree.scan_prefix(key(b'V', v1)).next().unwrap().unwrap();
        let mut damaged = bytes.to_vec();
        let last = damaged.len() - 1;
        damaged[last] ^= 0xff;
        s.tree.insert(&chunk, damaged.clone()).unwrap();
        let found = s.get(v1).unwrap_err();
        assert!(matches!(found, Error::Damaged { .. }), "{found:#}");
        s.repair(&good).unwrap();
        assert_eq!(s.get(v1).unwrap().unwrap().weights, good.weights);
        // v2: its listing damaged; v3: its listing and its envelope.
        s.tree.insert(key(b'D', v2), &b"\xc1garbage"[..]).unwrap();
        s.tree.insert(key(b'D', v3), &b"\xc1garbage"[..]).unwrap();
        let (chunk, _) = s.tree.scan_prefix(key(b'V', v3)).next().unwrap().unwrap();
        s.tree.insert(&chunk, damaged).unwrap();
        st.flush().unwrap();
        (v1, v2, v3)
    };
    let st = store(dir.path());
    let listed: Vec<(u64, Option<f64>)> = st
        .registry()
        .list()
        .unwrap()
        .iter()
        .map(|m| (m.version, m.eval_loss))
        .collect();
    assert_eq!(
        listed,
        vec![(v1, Some(5.0)), (v2, Some(4.0))],
        "v{v3} is damaged throughout"
    );
}

/// A pending checkpoint survives a reopen until cleared, and is no version.
#[test]
fn a_pending_checkpoint_is_kept_until_cleared() {
    let dir = tempfile::tempdir().unwrap();
    {
        let st = store(dir.path());
        let s = st.registry();
        assert!(s.pending().unwrap().is_none());
        let parent = add(s, 5.0);
        let pending = Checkpoint::new(
            Metadata {
                parent: Some(parent),
                step: 7,
                ..Default::default()
            },
            vec![9u8; 200_000],
            vec![1u8; 100_000],
        );
        s.set_pending(&pending).unwrap();
    }
    let st = store(dir.path());
    let s = st.registry();
    let pending = s.pending().unwrap().unwrap();
    assert_eq!(
        (pending.metadata.parent, pending.metadata.step, pending.weights.len()),
        (Some(1), 7, 200_000)
    );
    assert_eq!(s.list().unwrap().len(), 1);
    s.clear_pending().unwrap();
    assert!(s.pending().unwrap().is_none());
}

#[test]
fn retention_keeps_newest_pinned_best_and_active() {
    let dir = tempfile::tempdir().unwrap();
    let st = store(dir.path());
    let s = st.registry();
    for loss in [9.0, 1.0, 8.0, 7.0, 6.0, 5.0] {
        add(s, loss);
    }
    s.set_pinned(3, true).unwrap();
    // Newest 2 (5, 6), pinned 3, best 2 (loss 1.0), active 6.
    assert_eq!(s.retention_victims(2).unwrap(), [1, 4]);
    assert!(s.delete(6).unwrap_err().to_string().contains("active"));
    assert!(s
        .activate(42, &Provenance::operator(Change::Rollback, "me", None))
        .is_err());
}

/// A checkpoint larger than a chunk is stored in pieces, read back
/// whole, and deleted without leaving a piece behind.
#[test]
fn big_checkpoints_round_trip_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let st = store(dir.path());
    let s = st.registry();
    let weights: Vec<u8> = (0..3 * CHUNK_BYTES + 17).map(|i| (i % 251) as u8).collect();
    let make = |version| {
        Ok(Checkpoint::new(
            Metadata {
                version,
                ..Default::default()
            },
            weights.clone(),
            vec![1, 2, 3],
        ))
    };
    assert_eq!(
        s.add(None, make, &Provenance::daemon(Change::Trained))
            .unwrap()
            .metadata
            .version,
        1
    );
    add(s, 1.0);
    assert!(s.tree.scan_prefix(key(b'V', 1)).count() > 3);
    let back = s.get(1).unwrap().unwrap();
    assert_eq!((back.weights, back.optimizer), (weights, vec![1, 2, 3]));
    s.delete(1).unwrap();
    assert_eq!(s.tree.scan_prefix(key(b'V', 1)).count(), 0);
    assert!(s.get(1).unwrap().is_none());
}

/// A schema 1 store (each envelope whole under `V` version) still reads,
/// and is marked current so that older builds refuse it from now on.
#[test]
fn schema_1_stores_are_read_and_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    {
        let st = store(dir.path());
        let s = st.registry();
        let old = Checkpoint::new(
            Metadata {
                version: 1,
                ..Default::default()
            },
            vec![9; 100],
            vec![],
        );
        s.tree.insert(key(b'V', 1), old.to_bytes().unwrap()).unwrap();
        s.tree
            .insert(key(b'D', 1), rmp_serde::to_vec_named(&old.metadata).unwrap())
            .unwrap();
        s.tree.insert(meta(Counter::NextVersion), &2u64.to_be_bytes()).unwrap();
        st.tree
            .insert(crate::store::layout::meta_key("schema_version"), &1u64.to_be_bytes())
            .unwrap();
        st.flush().unwrap();
    }
    let st = store(dir.path());
    let s = st.registry();
    assert_eq!(s.get(1).unwrap().unwrap().weights, vec![9; 100]);
    assert_eq!(
        st.tree
            .get(crate::store::layout::meta_key("schema_version"))
            .unwrap()
            .unwrap()
            .as_ref(),
        crate::store::SCHEMA_VERSION.to_be_bytes()
    );
    s.delete(1).unwrap();
    assert!(s.get(1).unwrap().is_none());
}

/// A checkpoint as `version` with `weights_bytes` of weights.
fn big(version: u64, weights_bytes: usize) -> Checkpoint {
    let weights: Vec<u8> = (0..weights_bytes).map(|i| (i % 249) as u8 ^ version as u8).collect();
    Checkpoint::new(
        Metadata {
            version,
            eval_loss: Some(1.0),
            ..Default::default()
        },
        weights,
        vec![7; 100],
    )
}

fn chunk_keys(s: &Registry, version: u64) -> Vec<sled::IVec> {
    s.tree
        .scan_prefix(key(b'V', version))
        .keys()
        .map(Result::unwrap)
        .collect()
}

/// Weights that make an envelope of exactly `n` whole chunks.
fn exact_chunks(version: u64, n: usize) -> Checkpoint {
    let overhead = big(version, 0).to_bytes().unwrap().len();
    // The weights' length is in their bin header and the metadata's sha256 is fixed-size: one fit-up is exact.
    let first = big(version, n * CHUNK_BYTES - overhead);
    let extra = first.to_bytes().unwrap().len() - n * CHUNK_BYTES;
    let c = big(version, n * CHUNK_BYTES - overhead - extra);
    assert_eq!(c.to_bytes().unwrap().len(), n * CHUNK_BYTES);
    c
}

/// What sled 0.34 left of batches that failed part way on a full disk,
/// built by hand: the active version without its listing and its last
/// chunks; a version listed but missing a chunk in the middle; one listed
/// whose envelope is exactly whole chunks and lost its last; chunks of a
/// version never listed; a listing whose envelope is gone; the counters
/// behind. Reopened, each such version is forgotten (never half there),
/// `active` still names the active one, an intact one and a whole one
/// without its listing are kept (the listing rebuilt), the counters move
/// past what is stored, and the active one can be written back from a copy.
#[test]
fn versions_left_half_there_are_forgotten_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let copy = {
        let st = store(dir.path());
        let s = st.registry();
        for c in [
            big(1, 5 * CHUNK_BYTES),
            big(2, 5 * CHUNK_BYTES),
            exact_chunks(3, 4),
            big(4, 3 * CHUNK_BYTES),
            big(5, 2 * CHUNK_BYTES),
            big(6, 2 * CHUNK_BYTES),
            big(7, 5 * CHUNK_BYTES),
        ] {
            let version = c.metadata.version;
            s.add(Some(version), move |_| Ok(c), &Provenance::daemon(Change::Trained))
                .unwrap();
        }
        s.set_pinned(2, true).unwrap();
        let copy = s.get(7).unwrap().unwrap();
        // v7 (active): no listing, half its chunks.
        let v7 = chunk_keys(s, 7);
        for k in &v7[v7.len() / 2..] {
            s.tree.remove(k).unwrap();
        }
        s.tree.remove(key(b'D', 7)).unwrap();
        // v2: a chunk gone from the middle; v3: its last (full) chunk gone.
        s.tree.remove(&chunk_keys(s, 2)[2]).unwrap();
        s.tree.remove(chunk_keys(s, 3).last().unwrap()).unwrap();
        // v4: whole but unlisted; v5: listed, envelope gone; v9: chunks only, torn.
        s.tree.remove(key(b'D', 4)).unwrap();
        for k in chunk_keys(s, 5) {
            s.tree.remove(k).unwrap();
        }
        s.tree
            .insert([&key(b'V', 9)[..], &1u32.to_be_bytes()].concat(), vec![1u8; 10])
            .unwrap();
        let last_history = s.counter(Counter::HistoryNext).unwrap().unwrap() - 1;
        s.tree.insert(meta(Counter::NextVersion), &3u64.to_be_bytes()).unwrap();
        s.tree.insert(meta(Counter::HistoryNext), &1u64.to_be_bytes()).unwrap();
        st.flush().unwrap();
        assert_eq!(last_history, 6);
        copy
    };
    let st = store(dir.path());
    let s = st.registry();
    let listed: Vec<u64> = s.list().unwrap().iter().map(|m| m.version).collect();
    assert_eq!(
        listed,
        [1, 4, 6],
        "1 and 6 intact, 4's listing rebuilt; the rest forgotten"
    );
    for gone in [2, 3, 5, 7, 9] {
        assert!(
            chunk_keys(s, gone).is_empty() && s.metadata(gone).unwrap().is_none(),
            "v{gone} is half there"
        );
        assert!(s.get(gone).unwrap().is_none());
    }
    assert!(s.pinned().unwrap().is_empty(), "a forgotten version's pin goes with it");
    assert_eq!(
        s.active_version().unwrap(),
        Some(7),
        "active still names the version to fetch again"
    );
    assert_eq!(
        (s.next_free().unwrap(), s.counter(Counter::HistoryNext).unwrap()),
        (10, Some(7)),
        "counters past what is stored"
    );
    // The active version written back from a good copy; a number never handed out is not.
    s.repair(&copy).unwrap();
    assert_eq!(s.get(7).unwrap().unwrap(), copy);
    assert!(matches!(s.repair(&big(10, 10)), Err(Error::UnknownVersion(10))));
    drop(st);
    let listed: Vec<u64> = store(dir.path())
        .registry()
        .list()
        .unwrap()
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(listed, [1, 4, 6, 7], "nothing else goes at the next open");
}

/// Writes `n` history entries (rollbacks to v1, reason "r<i>") after the
/// ones there, as if made one by one, in one batch.
fn many_entries(s: &Registry, n: u64, reason_bytes: usize) {
    let first = s.counter(Counter::HistoryNext).unwrap().unwrap_or(0);
    let mut batch = sled::Batch::default();
    for i in 0..n {
        let reason = format!("r{i}{}", "x".repeat(reason_bytes));
        let entry = HistoryEntry {
            at: now_rfc3339(),
            from: Some(1),
            to: 1,
            why: Change::Rollback,
            by: "ops".into(),
            reason: Some(reason),
        };
        batch.insert(key(b'H', first + i), rmp_serde::to_vec_named(&entry).unwrap());
    }
    batch.insert(meta(Counter::HistoryNext), &(first + n).to_be_bytes());
    s.tree.apply_batch(batch).unwrap();
}

fn reasons(entries: &[HistoryEntry]) -> Vec<String> {
    entries.iter().map(|h| h.reason.clone().unwrap_or_default()).collect()
}

/// Thousands of entries: read in pages from the newest back (each page
/// oldest first, `more` and `next_before` leading to the one before), a
/// page bounded by its bytes too; pruned to the newest `keep` only once
/// announced, numbering going on after.
#[test]
fn history_is_read_in_pages_and_pruned_once_announced() {
    let dir = tempfile::tempdir().unwrap();
    let st = store(dir.path());
    let s = st.registry();
    add(s, 1.0);
    many_entries(s, 5000, 0);
    let all = s.history().unwrap();
    assert_eq!(all.len(), 5001);
    let newest = s.history_page(None, 300, usize::MAX).unwrap();
    assert_eq!(
        (newest.entries.len(), newest.more, newest.next_before),
        (300, true, Some(4701))
    );
    assert_eq!(newest.entries, all[4701..], "the newest page, oldest first");
    let mut pages = vec![newest.entries];
    let mut before = newest.next_before;
    while let Some(seq) = before {
        let page = s.history_page(Some(seq), 300, usize::MAX).unwrap();
        assert!(page.entries.len() <= 300 && !page.entries.is_empty());
        before = page.next_before;
        assert_eq!(page.more, before.is_some());
        pages.push(page.entries);
    }
    pages.reverse();
    assert_eq!(pages.concat(), all, "the pages make the whole history");
    assert_eq!(
        s.history_page(Some(0), 300, usize::MAX).unwrap(),
        HistoryPage::default()
    );
    // Big entries: fewer to a page, never none.
    many_entries(s, 3, 100_000);
    let page = s.history_page(None, 300, 250_000).unwrap();
    assert_eq!(
        (
            reasons(&page.entries).iter().map(|r| r.len()).sum::<usize>() > 190_000,
            page.entries.len(),
            page.more
        ),
        (true, 2, true)
    );
    assert_eq!(s.history_page(None, 300, 10).unwrap().entries.len(), 1);
    // Nothing announced: nothing pruned. Announced: down to the newest 1000.
    assert_eq!(s.prune_history(1000).unwrap(), 0);
    s.mark_history_announced().unwrap();
    assert_eq!(s.prune_history(1000).unwrap(), 4004);
    let kept = s.history().unwrap();
    assert_eq!(
        (kept.len(), kept.first().unwrap().reason.as_deref()),
        (1000, Some("r4003"))
    );
    assert!(!s.history_page(None, 2000, usize::MAX).unwrap().more);
    // An entry not yet announced stays, however old it gets.
    s.activate(
        1,
        &Provenance::operator(Change::Rollback, "ops", Some("unannounced".into())),
    )
    .unwrap();
    many_entries(s, 2000, 0);
    s.prune_history(10).unwrap();
    assert!(reasons(&s.history().unwrap()).contains(&"unannounced".to_string()));
    drop(st);
    let st = store(dir.path());
    st.registry()
        .activate(1, &Provenance::operator(Change::Rollback, "ops", Some("after".into())))
        .unwrap();
    assert_eq!(
        st.registry().history().unwrap().last().unwrap().reason.as_deref(),
        Some("after"),
        "numbering goes on past what was pruned"
    );
}
