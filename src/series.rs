//! Series of one version (`wmvae series`, issue #27): the stored frames of
//! a [`Scope`] encoded by one network, a page at a time, as rows of (mu,
//! logvar, action, reward, done, step) grouped by episode. The one way a
//! page is made, for the CLI on a store ([`page`] directly) and for the
//! leading trainer's `series.page` endpoint (the same call, its reply in
//! MessagePack bounded below the server's `max_payload`).
//!
//! It writes no files (`tools::series` does) and moves no bytes over NATS
//! (`bus`); it reads the store and runs `vae::learner::Network`'s encode.

use crate::frames::Frame;
use crate::store::{Cursor, EpisodeCount, Scope, Store};
use crate::vae::learner::Network;
use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use std::sync::mpsc::SyncSender;

/// Frames encoded at once: `bench encode`'s batch, whose rate is the target.
pub const ENCODE_BATCH: usize = 256;
/// Frames in one page at most: about a second of encoding on a CPU, well
/// inside a request's timeout, and a bounded amount held by the leader.
pub const PAGE_FRAMES: usize = 2048;
/// MessagePack bytes a row takes besides its numbers, at most: its map,
/// the field names, the step, reward and done, array headers.
const ROW_OVERHEAD_BYTES: usize = 80;
/// An episode group's bytes besides its names and rows, at most.
const GROUP_OVERHEAD_BYTES: usize = 48;
/// A page's bytes besides its groups, at most: its map, the version and
/// `next` (whose names are bounded like every identity's).
pub const PAGE_OVERHEAD_BYTES: usize =
    128 + crate::frames::identity::MAX_SOURCE_BYTES + crate::frames::identity::MAX_EPISODE_BYTES;
/// A MessagePack float32 (marker + 4 bytes).
const F32_BYTES: usize = 5;

/// One frame of a series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub step: u64,
    pub mu: Vec<f32>,
    pub logvar: Vec<f32>,
    pub action: Option<Vec<f32>>,
    pub reward: Option<f64>,
    pub done: Option<bool>,
}

/// Consecutive rows of one episode, in step order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeRows {
    pub source: String,
    pub episode: String,
    pub rows: Vec<Row>,
}

/// One page of a scope's series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Page {
    /// The version that encoded it.
    pub version: u64,
    pub episodes: Vec<EpisodeRows>,
    /// Where the next page starts (the scope's `after`); None once the scope is done.
    pub next: Option<Cursor>,
}

/// The `series.page` request (JSON): one page of `scope` by `version`,
/// of at most `limit` frames (and [`PAGE_FRAMES`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PageRequest {
    pub version: u64,
    #[serde(flatten)]
    pub scope: Scope,
    #[serde(default)]
    pub limit: Option<usize>,
}

/// How big a page may grow: frames, and MessagePack bytes (an upper bound
/// counted per row before it is encoded).
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub frames: usize,
    pub bytes: usize,
}

/// The episodes of `scope` (its source and episode range; `after` skips
/// the episodes up to and including the cursor's), in (source, episode) order.
pub fn episodes(store: &Store, scope: &Scope) -> Result<Vec<EpisodeCount>> {
    let after = scope.after.as_ref().map(|c| (c.source.as_str(), c.episode.as_str()));
    Ok(store
        .episodes(scope.source.as_deref())?
        .into_iter()
        .filter(|e| scope.holds_episode(&e.episode))
        .filter(|e| after.is_none_or(|a| (e.source.as_str(), e.episode.as_str()) > a))
        .collect())
}

/// A `series.episodes` reply: a scope's episodes from its `after` on, as
/// many as fit in a reply; `more` when the rest needs another request
/// (`after` the last one here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodesPage {
    pub episodes: Vec<EpisodeCount>,
    pub more: bool,
}

/// JSON bytes of an episode entry besides its names (each escaped at most
/// twice its length), at most.
const EPISODE_ENTRY_BYTES: usize = 64;

/// [`episodes`], as many as fit in `max_bytes` of JSON (one at least).
pub fn episodes_page(store: &Store, scope: &Scope, max_bytes: usize) -> Result<EpisodesPage> {
    let mut out = EpisodesPage {
        episodes: Vec::new(),
        more: false,
    };
    let mut bytes = EPISODE_ENTRY_BYTES;
    for episode in episodes(store, scope)? {
        bytes += EPISODE_ENTRY_BYTES + 2 * (episode.source.len() + episode.episode.len());
        if bytes > max_bytes && !out.episodes.is_empty() {
            out.more = true;
            break;
        }
        out.episodes.push(episode);
    }
    Ok(out)
}

/// An upper bound of a frame's row in MessagePack, z numbers per latent.
fn row_bytes(frame: &Frame, z_size: usize) -> usize {
    ROW_OVERHEAD_BYTES + F32_BYTES * (2 * z_size + frame.action.as_ref().map_or(0, Vec::len))
}

/// Batches read ahead of the encoder: one encoding, two waiting keeps it
/// fed (the store reads ~5x faster than a CPU encodes) in ~10 MB.
const READ_AHEAD_BATCHES: usize = 2;

/// The next page of `scope` encoded by `net` (`version`'s weights): the
/// frames after `scope.after`, as many as `budget` holds (one at least).
/// A thread reads and decompresses the next batches while this one encodes.
pub fn page(store: &Store, net: &Network, version: u64, scope: Scope, budget: Budget) -> Result<Page> {
    let z_size = net.model().config().z_size as usize;
    let mut out = Page {
        version,
        episodes: Vec::new(),
        next: None,
    };
    std::thread::scope(|threads| {
        let (batches, to_encode) = std::sync::mpsc::sync_channel(READ_AHEAD_BATCHES);
        let reader = threads.spawn(move || read_batches(store, scope, budget, z_size, batches));
        for batch in to_encode {
            out.encode(net, batch)?;
        }
        out.next = reader.join().map_err(|_| anyhow!("the store reader panicked"))??;
        Ok(out)
    })
}

/// Sends the frames of a page to `batches`, [`ENCODE_BATCH`] at a time;
/// returns where the next page starts. Stops early when the encoder is gone.
fn read_batches(
    store: &Store,
    scope: Scope,
    budget: Budget,
    z_size: usize,
    batches: SyncSender<Batch>,
) -> Result<Option<Cursor>> {
    let (mut taken, mut bytes) = (0usize, PAGE_OVERHEAD_BYTES);
    let mut last: Option<Cursor> = None;
    let mut batch = Batch::default();
    let mut next = None;
    for frame in store.frames_in(scope, true) {
        let frame = frame?;
        let mut cost = row_bytes(&frame, z_size);
        if last
            .as_ref()
            .is_none_or(|c| (&c.source, &c.episode) != (&frame.source, &frame.episode))
        {
            cost += GROUP_OVERHEAD_BYTES + frame.source.len() + frame.episode.len();
        }
        if taken == budget.frames || bytes + cost > budget.bytes {
            if last.is_none() {
                bail!("a page of {} bytes cannot hold one frame of {cost}", budget.bytes);
            }
            next = last;
            break;
        }
        (taken, bytes) = (taken + 1, bytes + cost);
        last = Some(cursor(&frame));
        batch.push(frame);
        if batch.frames.len() == ENCODE_BATCH && batches.send(std::mem::take(&mut batch)).is_err() {
            return Ok(None); // the encoder failed: its error is the page's
        }
    }
    if !batch.frames.is_empty() {
        let _ = batches.send(batch);
    }
    Ok(next)
}

/// Frames to encode at once, their pixels already side by side (copied
/// by the reader, off the encoder's thread) and taken from the frames.
#[derive(Default)]
struct Batch {
    frames: Vec<Frame>,
    pixels: Vec<u8>,
}

impl Batch {
    fn push(&mut self, mut frame: Frame) {
        self.pixels.extend_from_slice(&std::mem::take(&mut frame.pixels));
        self.frames.push(frame);
    }
}

fn cursor(frame: &Frame) -> Cursor {
    Cursor {
        source: frame.source.clone(),
        episode: frame.episode.clone(),
        step: frame.step,
    }
}

impl Page {
    /// Encodes the frames of `batch` into rows.
    fn encode(&mut self, net: &Network, batch: Batch) -> Result<()> {
        let latents = net.encode_frames(&batch.pixels)?;
        for ((frame, mu), logvar) in batch.frames.into_iter().zip(latents.mu).zip(latents.logvar) {
            if self
                .episodes
                .last()
                .is_none_or(|g| g.source != frame.source || g.episode != frame.episode)
            {
                self.episodes.push(EpisodeRows {
                    source: frame.source.clone(),
                    episode: frame.episode.clone(),
                    rows: Vec::new(),
                });
            }
            let group = self.episodes.last_mut().expect("pushed above");
            group.rows.push(Row {
                step: frame.step,
                mu,
                logvar,
                action: frame.action,
                reward: frame.reward,
                done: frame.done,
            });
        }
        Ok(())
    }
}

/// Where a series' pages come from: the store with a network here, or the
/// leading trainer over NATS (`cli::backend`). `tools::series` writes
/// files from either the same way.
// Futures of these are awaited in place by one CLI task: no Send bound needed.
#[allow(async_fn_in_trait)]
pub trait Pages {
    /// What the pages fail with: the source's own error, so one its caller
    /// tells apart (an unknown version) reaches that caller typed.
    type Error: From<anyhow::Error>;
    /// The version encoding, and its weights' sha256.
    fn version(&self) -> (u64, &str);
    /// The episodes of `scope`, as [`episodes`].
    async fn episodes(&self, scope: &Scope) -> Result<Vec<EpisodeCount>, Self::Error>;
    /// The next page of `scope`, as [`page`].
    async fn page(&self, scope: Scope) -> Result<Page, Self::Error>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{compress_frames, BufferConfig};
    use crate::vae::device::Device;
    use crate::vae::model::VaeConfig;

    fn store_of_three_episodes(dir: &std::path::Path) -> Store {
        let store = Store::open(
            dir,
            BufferConfig {
                capacity: 1000,
                validation_fraction: 0.2,
            },
        )
        .unwrap();
        let frames: Vec<Frame> = [("a", "e1"), ("a", "e2"), ("b", "e1")]
            .iter()
            .flat_map(|(source, episode)| {
                (0..40u64).map(move |i| Frame {
                    source: source.to_string(),
                    episode: episode.to_string(),
                    step: i,
                    pixels: vec![(i * 5) as u8; crate::frames::BYTES].into(),
                    action: (i % 2 == 0).then(|| vec![1.0; 3]),
                    reward: None,
                    done: None,
                })
            })
            .collect();
        store.commit(&frames, compress_frames(&frames), &[]).unwrap();
        store
    }

    /// (source, episode, step) and mu of every row of the pages of `scope`.
    fn rows(store: &Store, net: &Network, budget: Budget) -> Vec<(String, String, u64, Vec<f32>)> {
        let (mut scope, mut out) = (Scope::default(), Vec::new());
        loop {
            let page = page(store, net, 7, scope.clone(), budget).unwrap();
            assert!(rmp_serde::to_vec_named(&page).unwrap().len() <= budget.bytes);
            for group in page.episodes {
                for row in group.rows {
                    out.push((group.source.clone(), group.episode.clone(), row.step, row.mu));
                }
            }
            match page.next {
                Some(next) => scope.after = Some(next),
                None => return out,
            }
        }
    }

    #[test]
    fn pages_join_into_the_whole_and_stay_under_their_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_of_three_episodes(dir.path());
        let net = Network::new(Device::Cpu, VaeConfig::default());
        let whole = rows(
            &store,
            &net,
            Budget {
                frames: usize::MAX,
                bytes: usize::MAX,
            },
        );
        assert_eq!(whole.len(), 120);
        for budget in [
            Budget {
                frames: 7,
                bytes: usize::MAX,
            },
            Budget {
                frames: PAGE_FRAMES,
                bytes: 4000,
            },
        ] {
            let paged = rows(&store, &net, budget);
            assert_eq!(paged.len(), whole.len());
            for (a, b) in paged.iter().zip(&whole) {
                assert_eq!((&a.0, &a.1, a.2), (&b.0, &b.1, b.2));
                assert!(a.3.iter().zip(&b.3).all(|(x, y)| (x - y).abs() <= 1e-5));
            }
        }
        let tiny = Budget { frames: 10, bytes: 100 };
        assert!(page(&store, &net, 7, Scope::default(), tiny).is_err());
    }

    #[test]
    fn episodes_come_in_pages_under_their_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_of_three_episodes(dir.path());
        let all = episodes(&store, &Scope::default()).unwrap();
        assert_eq!(all.len(), 3);
        let (mut scope, mut paged) = (Scope::default(), Vec::new());
        loop {
            let page = episodes_page(&store, &scope, 150).unwrap();
            assert_eq!(page.episodes.len(), 1);
            let last = page.episodes.last().unwrap();
            scope.after = Some(Cursor {
                source: last.source.clone(),
                episode: last.episode.clone(),
                step: 0,
            });
            paged.extend(page.episodes);
            if !page.more {
                break;
            }
        }
        assert_eq!(paged, all);
    }
}
