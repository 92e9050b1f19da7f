//! Training behaviour of the VAE with our Adam: it learns, and a checkpoint
//! resumes to exactly the same next step.

mod common;

use tch::Device;
use wmvae::vae::adam::{AdamConfig, Schedule};
use wmvae::vae::checkpoint::{Checkpoint, Metadata};
use wmvae::vae::learner::{frames_to_tensor, Learner};
use wmvae::vae::model::{Precision, VaeConfig};

/// libtorch's RNG is process-global: tests that seed it must not interleave.
static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn learner(seed: i64, learning_rate: f64) -> Learner {
    scheduled(
        seed,
        AdamConfig {
            learning_rate,
            ..Default::default()
        },
    )
}

fn scheduled(seed: i64, adam: AdamConfig) -> Learner {
    tch::manual_seed(seed);
    Learner::new(Device::Cpu, VaeConfig::default(), adam, Precision::Fp32)
}

/// A few hundred steps on one fixed small batch lower the reconstruction
/// loss a lot, in float32 and in bf16; bf16 leaves the weights float32.
#[test]
fn training_lowers_reconstruction_loss() {
    for precision in [Precision::Fp32, Precision::Bf16] {
        lowers_reconstruction_loss(precision);
    }
}

fn lowers_reconstruction_loss(precision: Precision) {
    let _rng = GLOBAL_RNG.lock().unwrap();
    tch::manual_seed(0);
    let mut l = Learner::new(
        Device::Cpu,
        VaeConfig::default(),
        AdamConfig {
            learning_rate: 1e-3,
            ..Default::default()
        },
        precision,
    );
    let xs = frames_to_tensor(&common::frames(8, 64, 64), Device::Cpu).unwrap();
    let before = l.net().evaluate(&xs);
    for _ in 0..200 {
        let v = l.train_step(&xs);
        assert!(v.total.is_finite());
    }
    let after = l.net().evaluate(&xs);
    assert_eq!(l.steps(), 200);
    assert!(
        after.recon < 0.5 * before.recon,
        "{precision:?}: recon {} -> {}",
        before.recon,
        after.recon
    );
    // Float32 weights: the safetensors writer refuses any other kind.
    assert!(l.net().weights_bytes().is_ok(), "{precision:?} weights are float32");
}

/// Snapshot to bytes and restore elsewhere: identical outputs, identical
/// next step, the learning-rate schedule picked up where it was (step 4 of
/// a warmup, not step 1 again).
#[test]
fn checkpoint_resumes_the_very_same_next_step() {
    let _rng = GLOBAL_RNG.lock().unwrap();
    let xs = frames_to_tensor(&common::frames(4, 64, 64), Device::Cpu).unwrap();
    let adam = AdamConfig {
        learning_rate: 1e-3,
        schedule: Schedule::WarmupCosine,
        warmup_steps: 10,
        decay_steps: 100,
        min_learning_rate: 1e-4,
        ..Default::default()
    };
    let mut original = scheduled(1, adam);
    for _ in 0..3 {
        original.train_step(&xs);
    }
    let bytes = original
        .snapshot(Metadata {
            version: 2,
            step: 3,
            ..Default::default()
        })
        .unwrap()
        .to_bytes()
        .unwrap();

    let mut resumed = scheduled(99, adam);
    resumed.restore(&Checkpoint::from_bytes(&bytes).unwrap()).unwrap();
    assert_eq!(resumed.steps(), 3);
    assert_eq!(
        resumed.net().weights_bytes().unwrap(),
        original.net().weights_bytes().unwrap()
    );
    let (mu_a, logvar_a) = original.net().encode(&xs);
    let (mu_b, logvar_b) = resumed.net().encode(&xs);
    assert!(mu_a.equal(&mu_b) && logvar_a.equal(&logvar_b));

    tch::manual_seed(42);
    let loss_a = original.train_step(&xs);
    tch::manual_seed(42);
    let loss_b = resumed.train_step(&xs);
    assert_eq!(loss_a, loss_b);
    assert_eq!(
        original.net().weights_bytes().unwrap(),
        resumed.net().weights_bytes().unwrap(),
        "next step differs"
    );
}

/// A checkpoint with a tampered weight byte is refused and leaves the learner unchanged.
#[test]
fn tampered_checkpoint_changes_nothing() {
    let _rng = GLOBAL_RNG.lock().unwrap();
    let original = learner(1, 1e-4);
    let mut checkpoint = original
        .snapshot(Metadata {
            version: 5,
            ..Default::default()
        })
        .unwrap();
    let last = checkpoint.weights.len() - 1;
    checkpoint.weights[last] ^= 0xff;
    let mut other = learner(2, 1e-4);
    let before = other.net().weights_bytes().unwrap();
    let err = other.restore(&checkpoint).unwrap_err().to_string();
    assert!(err.contains("v5") && err.contains("sha256"), "{err}");
    assert_eq!(other.net().weights_bytes().unwrap(), before);
}
