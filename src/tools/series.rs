//! `wmvae series`: a directory of one version's series, one `.npz` per
//! episode and `index.json` (PROTOCOL.md, "Series"), from [`Pages`] (the
//! store here, or the leading trainer over NATS), with a progress bar.
//!
//! Resumable: each episode's file, then the index, is written atomically
//! (a temporary file renamed), so an interrupted run leaves whole files; a
//! rerun into the same directory skips the episodes its index lists. A
//! hidden marker names the version that writes the directory, and a run
//! with another version is refused. It encodes nothing and picks no
//! backend (`series`, `cli::backend`).

use crate::frames::identity::series_file_name;
use crate::frames::npy::{utf32, NpzWriter};
use crate::series::{EpisodeRows, Pages, Row};
use crate::store::{Cursor, EpisodeCount, Scope};
use crate::tools::progress::Progress;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

/// The index of a series directory (pinned name).
pub const INDEX: &str = "index.json";
/// The version a series directory holds, written before any episode.
const MARKER: &str = ".wmvae-series.json";

/// An entry of `index.json` (pinned keys): `file` is relative to the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub source: String,
    pub episode: String,
    pub file: String,
    pub frames: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    version: u64,
    sha256: String,
}

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeriesReport {
    pub written: usize,
    pub skipped: usize,
    pub frames: u64,
}

/// Makes `path` whole or not at all: `write` fills a temporary file
/// beside it, which is then renamed over it.
fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path.parent().context("a file in a directory")?;
    let temp = tempfile::Builder::new()
        .prefix(".wmvae-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    write(temp.path())?;
    temp.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)?;
    write_atomically(path, |temp| {
        std::fs::write(temp, &bytes).with_context(|| format!("writing {}", temp.display()))
    })
}

/// Claims `dir` for `version`: refused when it holds another version's
/// series, or a series this command did not write.
fn claim(dir: &Path, version: u64, sha256: &str) -> Result<()> {
    let marker = dir.join(MARKER);
    match std::fs::read(&marker) {
        Ok(bytes) => {
            let held: Marker =
                serde_json::from_slice(&bytes).with_context(|| format!("reading {}", marker.display()))?;
            if held.version != version || held.sha256 != sha256 {
                bail!(
                    "{} holds the series of v{} (weights sha256 {}); this run encodes with v{version} (sha256 {sha256}): \
                     give another --out, or --version {} to finish that one",
                    dir.display(),
                    held.version,
                    held.sha256,
                    held.version
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dir.join(INDEX).exists() {
                bail!(
                    "{} holds a series that `wmvae series` did not write (no {MARKER}): give another --out",
                    dir.display()
                );
            }
            write_json(
                &marker,
                &Marker {
                    version,
                    sha256: sha256.into(),
                },
            )
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", marker.display())),
    }
}

/// The entries of `dir`'s index whose files are there (an earlier run's).
fn finished(dir: &Path) -> Result<Vec<IndexEntry>> {
    let path = dir.join(INDEX);
    let entries: Vec<IndexEntry> = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(entries.into_iter().filter(|e| dir.join(&e.file).is_file()).collect())
}

/// Writes the series of `pages` for `scope` (its source and episode
/// range) into `dir`, skipping the episodes an earlier run finished.
///
/// Episodes not yet written that follow each other in the store are read
/// as one run of pages, so every encoded batch is full but the last (a
/// page is not cut at an episode's end); each episode's file is written
/// as soon as its last row has come.
pub async fn write<P: Pages>(pages: &P, scope: &Scope, dir: &Path) -> Result<SeriesReport, P::Error> {
    let (version, sha256) = pages.version();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    claim(dir, version, sha256)?;
    let index = finished(dir)?;
    let done: HashSet<(String, String)> = index.iter().map(|e| (e.source.clone(), e.episode.clone())).collect();
    let all = pages.episodes(scope).await?;
    let mut out = Output {
        dir,
        version,
        sha256,
        index,
        report: SeriesReport {
            written: 0,
            skipped: done.len(),
            frames: 0,
        },
    };
    let todo = |e: &EpisodeCount| !done.contains(&(e.source.clone(), e.episode.clone()));
    let mut progress = Progress::new(
        format!("series v{version}"),
        all.iter().filter(|e| todo(e)).map(|e| e.frames).sum(),
    );
    let mut at = 0usize;
    for run in all.chunk_by(|a, b| todo(a) == todo(b)) {
        let before = at.checked_sub(1).map(|i| &all[i]);
        at += run.len();
        if !todo(&run[0]) {
            continue;
        }
        // The run starts right after the episode before it (all its steps).
        let start = Scope {
            after: before
                .map(|e| Cursor {
                    source: e.source.clone(),
                    episode: e.episode.clone(),
                    step: u64::MAX,
                })
                .or_else(|| scope.after.clone()),
            ..scope.clone()
        };
        write_run(pages, start, run, &mut out, &mut progress).await?;
    }
    Ok(out.report)
}

/// Where the episodes' files go, and what is written so far.
struct Output<'a> {
    dir: &'a Path,
    version: u64,
    sha256: &'a str,
    index: Vec<IndexEntry>,
    report: SeriesReport,
}

impl Output<'_> {
    /// Writes one episode's file, then the index naming it.
    fn episode(&mut self, source: String, episode: String, rows: Vec<Row>) -> Result<()> {
        let file = series_file_name(&source, &episode);
        if self.index.iter().any(|e| e.file == file) {
            bail!("two episodes share the file name {file}: refusing to overwrite one with the other");
        }
        let path = self.dir.join(&file);
        write_atomically(&path, |temp| write_episode(temp, &rows, self.version, self.sha256))?;
        self.index.push(IndexEntry {
            source,
            episode,
            file,
            frames: rows.len() as u64,
        });
        self.index
            .sort_by(|a, b| (&a.source, &a.episode).cmp(&(&b.source, &b.episode)));
        write_json(&self.dir.join(INDEX), &self.index)?;
        self.report.written += 1;
        self.report.frames += rows.len() as u64;
        Ok(())
    }
}

/// The episodes of `run` (consecutive in the store), a page at a time from
/// `scope`, each written once its rows are all there. Episodes stored
/// since the listing are passed over; the pages stop past the run's last.
async fn write_run<P: Pages>(
    pages: &P,
    mut scope: Scope,
    run: &[EpisodeCount],
    out: &mut Output<'_>,
    progress: &mut Progress,
) -> Result<(), P::Error> {
    let wanted: HashSet<(&str, &str)> = run.iter().map(|e| (e.source.as_str(), e.episode.as_str())).collect();
    let last = run.last().map(|e| (e.source.as_str(), e.episode.as_str()));
    let mut current: Option<EpisodeRows> = None;
    loop {
        let page = pages.page(scope.clone()).await?;
        if page.version != out.version {
            return Err(anyhow!("asked for v{}, got a page of v{}", out.version, page.version).into());
        }
        for group in page.episodes {
            let name = (group.source.as_str(), group.episode.as_str());
            if last.is_some_and(|last| name > last) {
                return Ok(finish(current, out)?);
            }
            if !wanted.contains(&name) {
                continue;
            }
            progress.advance(group.rows.len() as u64);
            match current.as_mut() {
                Some(held) if (&held.source, &held.episode) == (&group.source, &group.episode) => {
                    held.rows.extend(group.rows)
                }
                _ => finish(current.replace(group), out)?,
            }
        }
        match page.next {
            Some(next) if scope.after.as_ref().is_none_or(|a| next > *a) => scope.after = Some(next),
            Some(next) => {
                return Err(anyhow!("the pages do not move on (next {next:?} after {:?})", scope.after).into())
            }
            None => return Ok(finish(current, out)?),
        }
    }
}

/// Writes the episode whose rows are all there, if any.
fn finish(episode: Option<EpisodeRows>, out: &mut Output<'_>) -> Result<()> {
    match episode {
        Some(e) if !e.rows.is_empty() => out.episode(e.source, e.episode, e.rows),
        _ => Ok(()),
    }
}

/// Writes one episode's arrays (PROTOCOL.md, "Series"): a frame without
/// an action gets a row of NaN (A is the episode's longest action, 0 when
/// none has one), without a reward NaN, without `done` false.
fn write_episode(path: &Path, rows: &[Row], version: u64, sha256: &str) -> Result<()> {
    let t = rows.len();
    let z = rows.first().map_or(0, |r| r.mu.len());
    let a = rows
        .iter()
        .filter_map(|r| r.action.as_ref().map(Vec::len))
        .max()
        .unwrap_or(0);
    let floats = |values: &mut dyn Iterator<Item = f32>| -> Vec<u8> { values.flat_map(f32::to_le_bytes).collect() };
    let steps = rows
        .iter()
        .map(|r| i64::try_from(r.step).map(i64::to_le_bytes))
        .collect::<Result<Vec<_>, _>>()
        .context("a step past int64")?;
    let mut npz = NpzWriter::create(path)?;
    let mu = floats(&mut rows.iter().flat_map(|r| r.mu.iter().copied()));
    npz.array("mu", "<f4", &[t, z])?.write_all(&mu)?;
    let logvar = floats(&mut rows.iter().flat_map(|r| r.logvar.iter().copied()));
    npz.array("logvar", "<f4", &[t, z])?.write_all(&logvar)?;
    npz.array("action", "<f4", &[t, a])?
        .write_all(&floats(&mut rows.iter().flat_map(|r| {
            let given = r.action.as_deref().unwrap_or(&[]);
            (0..a).map(move |i| given.get(i).copied().unwrap_or(f32::NAN))
        })))?;
    let reward = floats(&mut rows.iter().map(|r| r.reward.map_or(f32::NAN, |v| v as f32)));
    npz.array("reward", "<f4", &[t])?.write_all(&reward)?;
    let done: Vec<u8> = rows.iter().map(|r| u8::from(r.done.unwrap_or(false))).collect();
    npz.array("done", "|b1", &[t])?.write_all(&done)?;
    npz.array("step", "<i8", &[t])?.write_all(&steps.concat())?;
    let version = i64::try_from(version).context("a version past int64")?;
    npz.array("version", "<i8", &[])?.write_all(&version.to_le_bytes())?;
    let width = sha256.chars().count();
    npz.array("sha256", &format!("<U{width}"), &[])?
        .write_all(&utf32(sha256, width))?;
    npz.finish()
}

/// `--episodes A..B`: names in [A, B), either end left open by leaving it empty.
pub fn parse_episode_range(text: &str) -> Result<(Option<String>, Option<String>)> {
    let (from, until) = text
        .split_once("..")
        .with_context(|| format!("--episodes {text:?}: expected FROM..UNTIL (either may be empty)"))?;
    let end = |s: &str| (!s.is_empty()).then(|| s.to_string());
    Ok((end(from), end(until)))
}
