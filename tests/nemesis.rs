//! `wmvae bench nemesis` for a minute, on its own (a test binary of one
//! test, so no other cluster shares the two cores): trainers and encoders
//! SIGKILLed, servers SIGKILLed, the leader paused past its lease, a
//! trainer with another lease TTL, a server partitioned from the others
//! (where this host allows network namespaces), drawn from a fixed seed;
//! then no
//! violation: nothing acked lost, no latent or version twice, no epoch
//! writing after a newer one, the lease TTL the cluster's, convergence
//! within TTL + 10 s. (`scripts/nemesis` runs it longer for BENCHMARKS.md.)

mod common;

use common::{repo_root, wmvae};

/// Seed 1 draws every fault kind within 60 s (the partition 15 s in), and
/// four kinds where partitions are not available.
const SEED: &str = "1";

#[test]
fn the_nemesis_finds_no_split() {
    let out = wmvae()
        .args([
            "bench",
            "nemesis",
            "--json",
            "--seconds",
            "60",
            "--seed",
            SEED,
            "--nats-server",
        ])
        .arg(repo_root().join(".venv/bin/nats-server"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{said}", String::from_utf8_lossy(&out.stdout));
    let figures: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(figures["violations"], serde_json::json!([]), "{figures}\n{said}");
    assert!(figures["acked_frames"].as_u64().unwrap() > 0, "{figures}");
    assert_eq!(figures["acked_frames_lost"], 0, "{figures}");
    assert_eq!(figures["duplicate_latents"], 0, "{figures}");
    assert_eq!(figures["duplicate_versions"], 0, "{figures}");
    assert_eq!(figures["epochs_with_two_writers"], 0, "{figures}");
    assert!(figures["converged_s"].as_f64().is_some(), "{figures}");
    let faults = figures["faults"].as_object().unwrap();
    let kinds = faults.values().filter(|n| n.as_u64().unwrap() > 0).count();
    assert!(kinds >= 4, "the seed drew too few fault kinds: {figures}");
    match figures["faults_unavailable"]["partition"].as_str() {
        Some(why) => eprintln!("no partition injected on this host: {why}"),
        None => assert!(faults["partition"].as_u64().unwrap() > 0, "{figures}"),
    }
}
