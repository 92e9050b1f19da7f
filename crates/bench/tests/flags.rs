//! `wmvae bench`'s subcommands and flags, pinned (scripts, BENCHMARKS.md
//! and CI call them): the `wmvae-bench` binary that `wmvae bench ...` runs
//! must offer each one. Parses help only; measures nothing. (Its being an
//! integration test also makes `cargo test` build `wmvae-bench` beside
//! `wmvae` for the root package's tests of `wmvae bench ...`.)

use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_wmvae-bench"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_bench_and_flag_is_offered() {
    let top = help(&[]);
    assert!(top.contains("Usage: wmvae bench <COMMAND>"), "{top}");
    let benches: [(&str, &[&str]); 9] = [
        (
            "train",
            &["--device", "--steps", "--threads", "--json", "--batch", "--precision"],
        ),
        ("encode", &["--device", "--steps", "--threads", "--json"]),
        (
            "quality",
            &[
                "--config",
                "--nats-url",
                "--data-dir",
                "--frames",
                "--heldout",
                "--steps",
                "--target-recon",
                "--json",
            ],
        ),
        (
            "latency",
            &["--rate", "--seconds", "--no-train", "--nats-server", "--json"],
        ),
        (
            "pipeline",
            &["--rate", "--seconds", "--device", "--nats-server", "--json"],
        ),
        ("encoders", &["--replicas", "--frames", "--nats-server", "--json"]),
        ("failover", &["--rate", "--lease-ttl-secs", "--nats-server", "--json"]),
        ("chaos", &["--seconds", "--rate", "--nats-server", "--json"]),
        ("ingest", &["--frames", "--nats-server", "--json"]),
    ];
    for (bench, flags) in benches {
        assert!(
            top.lines().any(|l| l.split_whitespace().next() == Some(bench)),
            "no `{bench}` in:\n{top}"
        );
        let text = help(&[bench]);
        for flag in flags {
            assert!(
                text.split_whitespace().any(|w| w == *flag),
                "`wmvae bench {bench}` has no {flag}:\n{text}"
            );
        }
    }
}
