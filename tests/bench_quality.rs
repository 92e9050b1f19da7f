//! `wmvae bench quality` on small frame files: a held-out curve at step 0
//! and every tenth of the run, wall time growing, the first step at the
//! target found; with the paper's recipe (config/world_models_paper.toml)
//! and with a warmup-cosine schedule. Its figures are BENCHMARKS.md's, not
//! asserted here.

mod common;

use common::{frames, repo_root, wmvae};
use serde_json::Value;
use wmvae::frames::npy;

fn quality(config: &std::path::Path, dir: &std::path::Path) -> Value {
    let (train, heldout) = (dir.join("train.npy"), dir.join("heldout.npy"));
    npy::write_frames(&train, &frames(48, 64, 64), 64, 64).unwrap();
    npy::write_frames(&heldout, &frames(16, 96, 96), 96, 96).unwrap();
    let out = wmvae()
        .args([
            "bench",
            "quality",
            "--steps",
            "20",
            "--target-recon",
            "1e9",
            "--json",
            "--frames",
        ])
        .arg(&train)
        .arg("--heldout")
        .arg(&heldout)
        .arg("--config")
        .arg(config)
        .env("WMVAE_TRAIN__BATCH_SIZE", "4")
        .env("WMVAE_TRAIN__THREADS", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn reports_a_held_out_curve_for_each_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let cosine = dir.path().join("cosine.toml");
    std::fs::write(
        &cosine,
        "[train]\nlearning_rate = 1e-3\nlr_schedule = \"warmup_cosine\"\nwarmup_steps = \
        5\ndecay_steps = 50\nmin_learning_rate = 1e-4\n",
    )
    .unwrap();
    for (config, schedule, rate) in [
        (repo_root().join("config/world_models_paper.toml"), "constant", 1e-4),
        (cosine, "warmup_cosine", 1e-3),
    ] {
        let figures = quality(&config, dir.path());
        assert_eq!(
            (figures["lr_schedule"].as_str(), figures["learning_rate"].as_f64()),
            (Some(schedule), Some(rate)),
            "{figures}"
        );
        assert_eq!(
            (
                figures["train_frames"].as_u64(),
                figures["heldout_frames"].as_u64(),
                figures["batch_size"].as_u64()
            ),
            (Some(48), Some(16), Some(4))
        );
        let curve = figures["curve"].as_array().unwrap();
        let steps: Vec<u64> = curve.iter().map(|p| p["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, (0..=20).step_by(2).collect::<Vec<u64>>(), "{figures}");
        let seconds: Vec<f64> = curve.iter().map(|p| p["seconds"].as_f64().unwrap()).collect();
        assert!(seconds.windows(2).all(|w| w[0] < w[1]), "{seconds:?}");
        assert!(
            curve
                .iter()
                .all(|p| p["eval_recon"].as_f64().unwrap().is_finite() && p["eval_kl"].as_f64().unwrap() >= 0.0),
            "{figures}"
        );
        assert!(
            curve.iter().all(|p| p["active_units"].as_u64().is_some_and(|u| u <= 32)
                && p["kl_per_dim"].as_array().is_some_and(
                    |kl| kl.len() == 32 && kl.iter().all(|k| k.as_f64().is_some_and(|k| k.is_finite() && k >= 0.0))
                )),
            "{figures}"
        );
        // Every measured step is under a target of 1e9: the first one after step 0.
        assert_eq!(figures["steps_to_recon"].as_u64(), Some(2), "{figures}");
    }
}
