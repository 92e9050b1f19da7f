//! What operators do to versions, over the store: the one implementation
//! behind `wmvae checkpoint ...`, used by the daemon when it runs (through
//! the control service and the trainer) and by the CLI when it does not, so
//! both give the same answers.
//!
//! No NATS and no tensors here: the model work (reconstructions, building a
//! checkpoint from foreign weights) is `vae`'s, and the trainer adds what
//! only a live daemon can do (switching the weights it trains and encodes with).

use crate::config::Config;
use crate::store::{best_by_eval, Error, HistoryEntry, HistoryPage, Provenance, Split, Store};
use crate::vae::checkpoint::{now_rfc3339, Checkpoint, Metadata};
use crate::vae::device::Device;
use crate::vae::learner::{Learner, Network};
use crate::vae::model::VaeConfig;
use crate::vae::properties::{INTERPOLATION_STEPS, PRIOR_DRAWS};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Frames shown by `checkpoint show --recon`: one row of originals over
/// one row of reconstructions.
pub const RECON_FRAMES: usize = 8;

/// One row of `checkpoint list` (JSON keys pinned).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Listed {
    pub version: u64,
    pub parent: Option<u64>,
    pub step: u64,
    pub created_at: String,
    pub eval_loss: Option<f64>,
    pub active: bool,
    pub pinned: bool,
    pub best: bool,
}

/// `checkpoint show`: the metadata and the marks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shown {
    #[serde(flatten)]
    pub metadata: Metadata,
    pub active: bool,
    pub pinned: bool,
    pub best: bool,
}

/// Every version with its marks, oldest first.
pub fn list(store: &Store) -> Result<Vec<Listed>> {
    let registry = store.registry();
    let all = registry.list()?;
    let active = registry.active_version()?;
    let pinned = registry.pinned()?;
    let best = best_by_eval(&all);
    Ok(all
        .into_iter()
        .map(|m| Listed {
            active: Some(m.version) == active,
            pinned: pinned.contains(&m.version),
            best: Some(m.version) == best,
            version: m.version,
            parent: m.parent,
            step: m.step,
            created_at: m.created_at,
            eval_loss: m.eval_loss,
        })
        .collect())
}

pub fn show(store: &Store, version: u64) -> Result<Shown, Error> {
    let row = list(store)?
        .into_iter()
        .find(|l| l.version == version)
        .ok_or(Error::UnknownVersion(version))?;
    let metadata = store
        .registry()
        .metadata(version)?
        .ok_or(Error::UnknownVersion(version))?;
    Ok(Shown {
        metadata,
        active: row.active,
        pinned: row.pinned,
        best: row.best,
    })
}

/// History entries in one page, by default and at most: ~200 bytes each
/// in JSON, a full page is ~100 KB, far under NATS's 1 MB payload limit.
pub const HISTORY_PAGE: usize = 500;
/// Stored bytes of the entries in one page at most (long reasons make big
/// entries): its JSON stays well under NATS's 1 MB payload limit too.
pub const HISTORY_PAGE_BYTES: usize = 256 << 10;

/// The newest `limit` (default and at most [`HISTORY_PAGE`]) history
/// entries before sequence number `before`, oldest first, and whether
/// older ones are kept.
pub fn history_page(store: &Store, before: Option<u64>, limit: Option<usize>) -> Result<HistoryPage> {
    store.registry().history_page(
        before,
        limit.unwrap_or(HISTORY_PAGE).clamp(1, HISTORY_PAGE),
        HISTORY_PAGE_BYTES,
    )
}

/// Every kept history entry, oldest first, read a page at a time.
pub fn history(store: &Store) -> Result<Vec<HistoryEntry>> {
    let mut pages = Vec::new();
    let mut before = None;
    loop {
        let page = history_page(store, before, None)?;
        pages.push(page.entries);
        match page.next_before {
            Some(next) if page.more => before = Some(next),
            _ => break,
        }
    }
    pages.reverse();
    Ok(pages.concat())
}

/// A stored version, verified, or [`Error::UnknownVersion`].
pub fn checkpoint(store: &Store, version: u64) -> Result<Checkpoint, Error> {
    store.registry().get(version)?.ok_or(Error::UnknownVersion(version))
}

/// The network holding a stored version's weights (verified), on `device`.
pub fn network(store: &Store, version: u64, device: Device, vae: VaeConfig) -> Result<Network, Error> {
    let mut net = Network::new(device, vae);
    net.load_checkpoint_weights(&checkpoint(store, version)?)?;
    Ok(net)
}

/// `n` frames to show: validation frames, or training frames while the
/// validation split is empty.
fn frames_to_show(store: &Store, n: usize) -> Result<Vec<u8>> {
    let split = if store.len(Split::Validation) > 0 {
        Split::Validation
    } else {
        Split::Train
    };
    store
        .sample(split, n, &mut rand::thread_rng())?
        .context("the replay buffer holds no frames to show")
}

/// Up to `n` held-out frames (the validation split's, drawn with
/// replacement, no more than it holds); None while it is empty.
pub fn held_out_frames(store: &Store, n: usize) -> Result<Option<Vec<u8>>> {
    match n.min(store.len(Split::Validation) as usize) {
        0 => Ok(None),
        n => store.sample(Split::Validation, n, &mut rand::thread_rng()),
    }
}

/// A PNG of up to [`RECON_FRAMES`] validation frames (training frames if
/// the validation split is empty) over their reconstructions by `version`.
pub fn recon_png(store: &Store, version: u64, config: &Config) -> Result<Vec<u8>, Error> {
    Ok(network(store, version, Device::Cpu, config.vae())?.recon_png(&frames_to_show(store, RECON_FRAMES)?)?)
}

/// A PNG of the same [`PRIOR_DRAWS`] draws from the prior decoded by each
/// of `versions`: one row per version, in the order given.
pub fn prior_strip_png(store: &Store, versions: &[u64], config: &Config) -> Result<Vec<u8>> {
    let rows = versions
        .iter()
        .map(|&version| network(store, version, Device::Cpu, config.vae())?.prior_samples())
        .collect::<Result<Vec<_>>>()?;
    let rows: Vec<&[u8]> = rows.iter().map(Vec::as_slice).collect();
    crate::frames::grid::png_grid(&rows, PRIOR_DRAWS)
}

/// A PNG of one row: a validation frame (a training frame if that split is
/// empty), [`INTERPOLATION_STEPS`] frames decoded by `version` along the
/// line between its latent and another's, then that other frame.
pub fn interpolation_png(store: &Store, version: u64, config: &Config) -> Result<Vec<u8>> {
    let ends = frames_to_show(store, 2)?;
    let (a, b) = ends.split_at(crate::frames::BYTES);
    let path = network(store, version, Device::Cpu, config.vae())?.interpolation(a, b)?;
    crate::frames::grid::png_grid(&[&[a, &path, b].concat()], INTERPOLATION_STEPS + 2)
}

/// `by` when none is given: user@host.
pub fn default_actor() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    format!("{user}@{}", crate::config::hostname())
}

/// Builds and stores a new active version from foreign weights (strict
/// names and shapes: a bad file changes nothing), with fresh Adam state.
/// `version` is the number allocated across nodes (the daemon's), or None
/// for the store's next (offline).
pub fn import(
    store: &Store,
    version: Option<u64>,
    weights_bytes: &[u8],
    origin: &str,
    config: &Config,
    provenance: &Provenance,
) -> Result<Checkpoint> {
    let mut learner = Learner::new(Device::Cpu, config.vae(), config.adam(), config.train.precision);
    learner.load_safetensors(weights_bytes, origin)?;
    let parent = store.registry().active_version()?;
    let metadata = Metadata {
        parent,
        created_at: now_rfc3339(),
        config: serde_json::to_value(config)?,
        ..Default::default()
    };
    Ok(store.registry().add(
        version,
        |version| learner.snapshot(Metadata { version, ..metadata }),
        provenance,
    )?)
}

/// Checks that safetensors `bytes` fit the model (strict names, shapes and
/// dtypes), so a bad file is refused before anything changes.
pub fn check_weights(bytes: &[u8], origin: &str, config: &Config) -> Result<()> {
    Network::from_safetensors(Device::Cpu, config.vae(), bytes, origin).map(drop)
}

/// Makes `version` active (offline; the daemon does more, see `trainer`).
pub fn rollback(store: &Store, version: u64, provenance: &Provenance) -> Result<Option<u64>, Error> {
    store.registry().activate(version, provenance)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::{self, Frame};
    use crate::store::compress_frames;
    use crate::store::Change;

    fn setup() -> (tempfile::TempDir, Store, Config) {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::load_with_env(None, []).unwrap();
        let store = Store::open(
            dir.path(),
            crate::store::BufferConfig {
                capacity: 100,
                validation_fraction: 0.0,
            },
        )
        .unwrap();
        (dir, store, config)
    }

    /// A version with placeholder bytes and `eval_loss`, made active.
    fn add(store: &Store, eval_loss: f64) -> u64 {
        let make = |version| {
            Ok(Checkpoint::new(
                Metadata {
                    version,
                    eval_loss: Some(eval_loss),
                    ..Default::default()
                },
                vec![1; 4],
                vec![],
            ))
        };
        store
            .registry()
            .add(None, make, &Provenance::operator(Change::Trained, "test", None))
            .unwrap()
            .metadata
            .version
    }

    #[test]
    fn list_marks_active_pinned_and_best() {
        let (_dir, store, _) = setup();
        for loss in [5.0, 2.0, 9.0] {
            add(&store, loss);
        }
        store.registry().set_pinned(1, true).unwrap();
        let marks: Vec<(u64, bool, bool, bool)> = list(&store)
            .unwrap()
            .iter()
            .map(|l| (l.version, l.active, l.pinned, l.best))
            .collect();
        assert_eq!(
            marks,
            [
                (1, false, true, false),
                (2, false, false, true),
                (3, true, false, false)
            ]
        );
        let shown = show(&store, 2).unwrap();
        assert_eq!(
            (shown.metadata.eval_loss, shown.best, shown.active),
            (Some(2.0), true, false)
        );
    }

    #[test]
    fn unknown_versions_are_unknown_everywhere() {
        let (_dir, store, config) = setup();
        add(&store, 1.0);
        let unknown = |e: Error| match e {
            Error::UnknownVersion(version) => Some(version),
            _ => None,
        };
        assert_eq!(unknown(show(&store, 7).unwrap_err()), Some(7));
        assert_eq!(unknown(checkpoint(&store, 7).unwrap_err()), Some(7));
        assert_eq!(
            unknown(rollback(&store, 7, &Provenance::operator(Change::Rollback, "me", None)).unwrap_err()),
            Some(7)
        );
        assert_eq!(unknown(recon_png(&store, 7, &config).unwrap_err()), Some(7));
    }

    #[test]
    fn rollback_moves_the_active_version_and_records_who_and_why() {
        let (_dir, store, _) = setup();
        add(&store, 3.0);
        add(&store, 2.0);
        assert_eq!(
            rollback(
                &store,
                1,
                &Provenance::operator(Change::Rollback, "ops@host", Some("bad run".into()))
            )
            .unwrap(),
            Some(2)
        );
        assert_eq!(store.registry().active_version().unwrap(), Some(1));
        let last = history(&store).unwrap().pop().unwrap();
        assert_eq!(
            (last.from, last.to, last.why, last.by.as_str(), last.reason.as_deref()),
            (Some(2), 1, Change::Rollback, "ops@host", Some("bad run"))
        );
    }

    #[test]
    fn import_checks_the_weights_and_makes_a_new_active_version() {
        let (_dir, store, config) = setup();
        add(&store, 3.0);
        let good = Network::new(Device::Cpu, config.vae()).weights_bytes().unwrap();
        // A bad file changes nothing and says which file.
        let err = format!(
            "{:#}",
            import(
                &store,
                None,
                &good[..good.len() / 2],
                "half.safetensors",
                &config,
                &Provenance::operator(Change::Import, "me", None)
            )
            .unwrap_err()
        );
        assert!(err.contains("half.safetensors"), "{err}");
        assert!(check_weights(b"not safetensors", "junk", &config).is_err());
        assert_eq!(store.registry().active_version().unwrap(), Some(1));
        // A good one becomes the next version, active, its parent the version before.
        check_weights(&good, "good", &config).unwrap();
        let imported = import(
            &store,
            None,
            &good,
            "good.safetensors",
            &config,
            &Provenance::operator(Change::Import, "me", Some("trained elsewhere".into())),
        )
        .unwrap();
        assert_eq!((imported.metadata.version, imported.metadata.parent), (2, Some(1)));
        assert_eq!(imported.weights, good);
        assert_eq!(store.registry().active_version().unwrap(), Some(2));
        assert_eq!(history(&store).unwrap().pop().unwrap().why, Change::Import);
    }

    #[test]
    fn pictures_draw_stored_frames_and_the_prior() {
        let (_dir, store, config) = setup();
        let weights = Network::new(Device::Cpu, config.vae()).weights_bytes().unwrap();
        store
            .registry()
            .add(
                None,
                |version| {
                    Ok(Checkpoint::new(
                        Metadata {
                            version,
                            ..Default::default()
                        },
                        weights.clone(),
                        vec![],
                    ))
                },
                &Provenance::operator(Change::Initial, "test", None),
            )
            .unwrap();
        let err = format!("{:#}", recon_png(&store, 1, &config).unwrap_err());
        assert!(err.contains("no frames"), "{err}");
        let stored: Vec<Frame> = (0..3)
            .map(|step| Frame {
                source: "s".into(),
                episode: "e".into(),
                step,
                pixels: vec![step as u8 * 60; frames::BYTES].into(),
                action: None,
                reward: None,
                done: None,
            })
            .collect();
        store.commit(&stored, compress_frames(&stored), &[]).unwrap();
        // (width, height) of a PNG, from its header.
        let size = |png: &[u8]| {
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
            let be = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
            (be(16), be(20))
        };
        assert_eq!(size(&recon_png(&store, 1, &config).unwrap()), (8 * 64, 2 * 64));
        assert_eq!(
            size(&prior_strip_png(&store, &[1, 1], &config).unwrap()),
            (8 * 64, 2 * 64)
        );
        assert_eq!(size(&interpolation_png(&store, 1, &config).unwrap()), (10 * 64, 64));
        // No validation split here: no held-out frames, though there are frames to show.
        assert_eq!(held_out_frames(&store, 4).unwrap(), None);
    }
}
