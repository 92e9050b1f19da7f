//! Reading the buffer in (source, episode, step) order: the episodes held
//! with their frame counts, and the frames of a [`Scope`] (a source, a range
//! of episode names, after a [`Cursor`]), for `buffer export` and `series`.
//! Reads only; the index and chunks it walks are `layout`'s.

use super::layout::*;
use super::Store;
use crate::frames::Frame;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// A frame's place in (source, episode, step) order: where a read resumes
/// (the frames after it).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Cursor {
    pub source: String,
    pub episode: String,
    pub step: u64,
}

/// Which frames a read covers: of one source or all, episodes whose name
/// is in `[from, until)` (either end open), after `after`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Scope {
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub episodes_from: Option<String>,
    #[serde(default)]
    pub episodes_until: Option<String>,
    #[serde(default)]
    pub after: Option<Cursor>,
}

impl Scope {
    /// Whether `episode`'s name is in the scope's range.
    pub fn holds_episode(&self, episode: &str) -> bool {
        self.episodes_from.as_deref().is_none_or(|from| episode >= from)
            && self.episodes_until.as_deref().is_none_or(|until| episode < until)
    }
}

/// An episode held, with its frame count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpisodeCount {
    pub source: String,
    pub episode: String,
    pub frames: u64,
}

/// (source, episode) of an index key `I source 0 episode 0 block`, or of an
/// episode key `E source 0 episode` (`tail_bytes` after the episode: 9 or 0).
fn names(key: &[u8], tail_bytes: usize) -> Result<(String, String)> {
    let body = key
        .get(1..key.len().saturating_sub(tail_bytes))
        .context("corrupt key in the store")?;
    let body = body.strip_suffix(b"\0").unwrap_or(body);
    let split = body.iter().position(|b| *b == 0).context("corrupt key in the store")?;
    let (source, episode) = (&body[..split], &body[split + 1..]);
    Ok((
        String::from_utf8(source.to_vec())?,
        String::from_utf8(episode.to_vec())?,
    ))
}

impl Store {
    /// The episodes held (a frame at least), in (source, episode) order,
    /// of one source or all.
    pub fn episodes(&self, source: Option<&str>) -> Result<Vec<EpisodeCount>> {
        let prefix: Vec<u8> = match source {
            Some(s) => [b"E", s.as_bytes(), b"\0"].concat(),
            None => b"E".to_vec(),
        };
        let mut out = Vec::new();
        for entry in self.tree.scan_prefix(prefix) {
            let (key, value) = entry?;
            let frames = be_u64(&value)?;
            if frames > 0 {
                let (source, episode) = names(&key, 0)?;
                out.push(EpisodeCount {
                    source,
                    episode,
                    frames,
                });
            }
        }
        Ok(out)
    }

    /// Every stored frame in (source, episode, step) order, optionally of
    /// one source; with `pixels` false their pixels are left empty (no
    /// decompression).
    pub fn frames_in_order<'a>(
        &'a self,
        source: Option<&'a str>,
        pixels: bool,
    ) -> impl Iterator<Item = Result<Frame>> + 'a {
        self.frames_in(
            Scope {
                source: source.map(str::to_string),
                ..Scope::default()
            },
            pixels,
        )
    }

    /// The frames of `scope` in (source, episode, step) order; frames of
    /// episodes outside it are skipped by their index alone.
    pub fn frames_in(&self, scope: Scope, pixels: bool) -> impl Iterator<Item = Result<Frame>> + '_ {
        let blocks = self.index_blocks(&scope);
        let locations = blocks.flat_map(move |entry| scope.locations_in(entry));
        // Consecutive steps mostly share a chunk: keep the last one read.
        let mut held: Option<(Split, u64, sled::IVec)> = None;
        locations.map(move |location| self.read_located(location?, &mut held, pixels))
    }

    /// The index blocks a read of `scope` walks: from its first block to the end of its source or range.
    fn index_blocks(&self, scope: &Scope) -> impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + '_ {
        let prefix: Vec<u8> = match &scope.source {
            Some(s) => [b"I", s.as_bytes(), b"\0"].concat(),
            None => b"I".to_vec(),
        };
        // Of one source, the scan starts at the range's first episode (its
        // key: names hold no NUL, so key order is name order) and stops at
        // the first name past the range.
        let from = scope
            .source
            .as_ref()
            .zip(scope.episodes_from.as_ref())
            .map(|(s, e)| [b"I", s.as_bytes(), b"\0", e.as_bytes(), b"\0"].concat());
        let until = scope.source.as_ref().and(scope.episodes_until.clone());
        let after = scope
            .after
            .as_ref()
            .map(|c| index_block_key(&c.source, &c.episode, c.step).0);
        let start = [Some(prefix.clone()), from, after]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or_default();
        self.tree.range(start..).take_while(move |entry| {
            entry.as_ref().map_or(true, |(key, _)| {
                let before_until = || {
                    until
                        .as_ref()
                        .is_none_or(|u| names(key, 8).map_or(true, |(_, e)| e < *u))
                };
                key.starts_with(&prefix) && before_until()
            })
        })
    }

    /// The frame at `(split, seq)`, from the `held` chunk when it is there, else from its own chunk (then held).
    fn read_located(
        &self,
        (split, seq): (Split, u64),
        held: &mut Option<(Split, u64, sled::IVec)>,
        pixels: bool,
    ) -> Result<Frame> {
        if let Some((_, first, bytes)) = held.as_ref().filter(|(held_split, ..)| *held_split == split) {
            if let Some(frame) = read_in_chunk(*first, bytes, seq, |stored| stored.to_frame(pixels))? {
                return Ok(frame);
            }
        }
        let (first, bytes) = self
            .chunk_holding(split, seq)?
            .context("the index points at a missing frame")?;
        let frame = read_in_chunk(first, &bytes, seq, |stored| stored.to_frame(pixels))?
            .context("the index points at a missing frame")?;
        *held = Some((split, first, bytes));
        Ok(frame)
    }
}

impl Scope {
    /// The frame locations an index block holds in the scope (none for an episode outside it), or its error.
    fn locations_in(&self, entry: sled::Result<(sled::IVec, sled::IVec)>) -> Vec<Result<(Split, u64)>> {
        let located = entry.map_err(anyhow::Error::from).and_then(|(key, bytes)| {
            let (source, episode) = names(&key, 8)?;
            if !self.holds_episode(&episode) {
                return Ok(Vec::new());
            }
            let first_step = be_u64(&key[key.len() - 8..])? * INDEX_BLOCK_STEPS;
            let after = self
                .after
                .as_ref()
                .filter(|c| c.source == source && c.episode == episode)
                .map(|c| c.step);
            let block = decode_index_block(&bytes)?;
            Ok(block
                .into_iter()
                .filter(|(offset, _)| after.is_none_or(|a| first_step + u64::from(*offset) > a))
                .map(|(_, location)| Ok(location))
                .collect())
        });
        match located {
            Ok(locations) => locations,
            Err(e) => vec![Err(e)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{compress_frames, BufferConfig};

    fn frame(source: &str, episode: &str, step: u64) -> Frame {
        Frame {
            source: source.into(),
            episode: episode.into(),
            step,
            pixels: vec![step as u8; crate::frames::BYTES].into(),
            action: None,
            reward: None,
            done: None,
        }
    }

    #[test]
    fn scopes_select_and_resume_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            BufferConfig {
                capacity: 1000,
                validation_fraction: 0.3,
            },
        )
        .unwrap();
        let mut frames = Vec::new();
        for (source, episode) in [("b", "e1"), ("a", "e2"), ("a", "e1"), ("a", "x/y")] {
            frames.extend((0..70).map(|s| frame(source, episode, s)));
        }
        store.commit(&frames, compress_frames(&frames), &[]).unwrap();
        let listed: Vec<(String, String, u64)> = store
            .episodes(None)
            .unwrap()
            .into_iter()
            .map(|e| (e.source, e.episode, e.frames))
            .collect();
        assert_eq!(
            listed,
            [
                ("a".into(), "e1".into(), 70),
                ("a".into(), "e2".into(), 70),
                ("a".into(), "x/y".into(), 70),
                ("b".into(), "e1".into(), 70)
            ]
        );
        let keys = |scope: Scope| {
            store
                .frames_in(scope, false)
                .map(|f| f.map(|f| (f.source, f.episode, f.step)))
                .collect::<Result<Vec<_>>>()
                .unwrap()
        };
        assert_eq!(keys(Scope::default()).len(), 280);
        let a_e2 = Scope {
            source: Some("a".into()),
            episodes_from: Some("e2".into()),
            episodes_until: Some("e3".into()),
            ..Scope::default()
        };
        assert_eq!(
            keys(a_e2.clone()),
            (0..70)
                .map(|s| ("a".to_string(), "e2".to_string(), s))
                .collect::<Vec<_>>()
        );
        // One episode: its name to the next one (names hold no NUL).
        let e1_only = Scope {
            source: Some("a".into()),
            episodes_from: Some("e1".into()),
            episodes_until: Some("e1\0".into()),
            ..Scope::default()
        };
        assert_eq!(
            keys(e1_only),
            (0..70)
                .map(|s| ("a".to_string(), "e1".to_string(), s))
                .collect::<Vec<_>>()
        );
        let resumed = keys(Scope {
            after: Some(Cursor {
                source: "a".into(),
                episode: "e2".into(),
                step: 64,
            }),
            ..a_e2
        });
        assert_eq!(resumed.iter().map(|k| k.2).collect::<Vec<_>>(), [65, 66, 67, 68, 69]);
        let tail = keys(Scope {
            after: Some(Cursor {
                source: "a".into(),
                episode: "x/y".into(),
                step: 69,
            }),
            ..Scope::default()
        });
        assert_eq!((tail.len(), &tail[0]), (70, &("b".to_string(), "e1".to_string(), 0)));
        let pixels = store.frames_in(Scope::default(), true).next().unwrap().unwrap().pixels;
        assert_eq!(pixels.len(), crate::frames::BYTES);
    }
}
