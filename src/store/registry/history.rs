//! The history of the active version in the registry's tree: entries
//! under `H` seq, read newest first in pages (never all at once where a
//! reply or a page is built from them), marked as announced on NATS, and
//! pruned past a retention once announced, so that it stays bounded
//! however many checkpoints a node makes.

use super::*;

/// History entries dropped by one [`Registry::prune_history`] at most: one
/// batch stays small even on a store that kept every entry before pruning
/// existed (the next checkpoint's pruning goes on).
const PRUNE_BATCH: usize = 10_000;

/// A page of the history: the entries before a sequence number, newest
/// page first (JSON keys pinned: `checkpoints.history` replies with it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistoryPage {
    /// Oldest first, as the whole history reads.
    pub entries: Vec<HistoryEntry>,
    /// Older entries are kept: ask for the page before `next_before`.
    pub more: bool,
    /// The `before` of the next (older) page: this page's oldest entry's
    /// sequence number; null when there is none.
    pub next_before: Option<u64>,
}

impl Registry {
    /// History entries not yet announced on NATS (made offline, before a
    /// crash, or while NATS was away), oldest first, with their sequence numbers.
    fn unannounced(&self) -> Result<Vec<(u64, HistoryEntry)>> {
        let from = self.counter(Counter::HistoryAnnounced)?.unwrap_or(0);
        let mut out = Vec::new();
        for entry in self.tree.range(key(b'H', from)..key(b'H', u64::MAX)) {
            let (k, v) = entry?;
            let seq = be_u64(&k[1..])?;
            if !self.tree.contains_key(key(b'A', seq))? {
                out.push((seq, rmp_serde::from_slice(&v).context("corrupt history entry")?));
            }
        }
        Ok(out)
    }

    /// History entries not yet announced on NATS, oldest first.
    pub fn unannounced_history(&self) -> Result<Vec<HistoryEntry>> {
        Ok(self.unannounced()?.into_iter().map(|(_, entry)| entry).collect())
    }

    /// Records that the oldest unannounced change to `version` has been
    /// announced (changes are announced in order): a rollback's when
    /// `rollback`, else the version's making; others stay unannounced.
    pub fn mark_announced(&self, version: u64, rollback: bool) -> Result<()> {
        let _guard = self.serialised();
        let matches = |entry: &HistoryEntry| entry.to == version && entry.why.is_rollback() == rollback;
        let Some((seq, _)) = self.unannounced()?.into_iter().find(|(_, entry)| matches(entry)) else {
            return Ok(());
        };
        // The mark, and `history_announced` moved past every entry now
        // announced in a row (their marks dropped), so the scan above stays
        // as short as what is still unannounced.
        let mut batch = sled::Batch::default();
        let mut watermark = self.counter(Counter::HistoryAnnounced)?.unwrap_or(0);
        if seq != watermark {
            batch.insert(key(b'A', seq), &[]);
        } else {
            watermark += 1;
            while self.tree.contains_key(key(b'A', watermark))? {
                batch.remove(key(b'A', watermark));
                watermark += 1;
            }
            batch.insert(meta(Counter::HistoryAnnounced), &watermark.to_be_bytes());
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Records that every history entry so far has been announced (or
    /// superseded by the cluster's active version).
    pub fn mark_history_announced(&self) -> Result<()> {
        let _guard = self.serialised();
        let next = self.counter(Counter::HistoryNext)?.unwrap_or(0);
        let mut batch = sled::Batch::default();
        batch.insert(meta(Counter::HistoryAnnounced), &next.to_be_bytes());
        for marked in self.tree.scan_prefix([b'A']).keys() {
            batch.remove(marked?);
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Every kept change of the active version, oldest first (all at
    /// once: for tests and tools; pages are [`Registry::history_page`]).
    pub fn history(&self) -> Result<Vec<HistoryEntry>> {
        self.tree
            .scan_prefix([b'H'])
            .map(|entry| rmp_serde::from_slice(&entry?.1).context("corrupt history entry"))
            .collect()
    }

    /// The newest `limit` entries (at least one) before sequence number
    /// `before` (None: the newest of all), fewer when their stored bytes
    /// pass `max_bytes` (never none when one is kept): read from the
    /// newest back, so a page costs its own entries, not the history's.
    pub fn history_page(&self, before: Option<u64>, limit: usize, max_bytes: usize) -> Result<HistoryPage> {
        let end = before.map_or_else(|| vec![b'H' + 1], |seq| key(b'H', seq));
        let mut page = HistoryPage::default();
        let mut bytes = 0;
        for entry in self.tree.range(key(b'H', 0)..end).rev() {
            let (k, v) = entry?;
            if !page.entries.is_empty() && (page.entries.len() >= limit || bytes + v.len() > max_bytes) {
                page.more = true;
                break;
            }
            bytes += v.len();
            page.next_before = Some(be_u64(&k[1..])?);
            page.entries
                .push(rmp_serde::from_slice(&v).context("corrupt history entry")?);
        }
        page.entries.reverse();
        if !page.more {
            page.next_before = None;
        }
        Ok(page)
    }

    /// Drops the oldest entries beyond the newest `keep`, of those already
    /// announced (below `history_announced`): an entry NATS has not heard
    /// of stays until it is announced. Returns how many went.
    pub fn prune_history(&self, keep: u64) -> Result<usize> {
        let _guard = self.serialised();
        let next = self.counter(Counter::HistoryNext)?.unwrap_or(0);
        let announced = self.counter(Counter::HistoryAnnounced)?.unwrap_or(0);
        let below = next.saturating_sub(keep).min(announced);
        let mut batch = sled::Batch::default();
        let mut dropped = 0;
        for k in self.tree.range(key(b'H', 0)..key(b'H', below)).keys().take(PRUNE_BATCH) {
            batch.remove(k?);
            dropped += 1;
        }
        if dropped > 0 {
            self.tree.apply_batch(batch)?;
        }
        Ok(dropped)
    }
}
