//! BENCHMARKS.md opens with the figures of `benchmarks/baseline.json`, the
//! ones `scripts/bench` compares a change against: the table between its
//! markers is what `scripts/baseline.py --table` prints from the baseline.
//! Checks text only: runs no bench.

mod common;

use common::{repo_root, venv_python};

#[test]
fn benchmarks_opens_with_the_baseline() {
    let out = std::process::Command::new(venv_python())
        .arg(repo_root().join("scripts/baseline.py"))
        .arg("--table")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout).unwrap();
    let doc = std::fs::read_to_string(repo_root().join("BENCHMARKS.md")).unwrap();
    let start = "<!-- baseline table: scripts/baseline.py --table -->\n";
    let (before, rest) = doc.split_once(start).expect("BENCHMARKS.md has no baseline table");
    let (written, _) = rest
        .split_once("<!-- end of the baseline table -->")
        .expect("the baseline table has no end marker");
    assert_eq!(
        written.trim(),
        table.trim(),
        "BENCHMARKS.md's table is not the baseline's (scripts/bench --update writes both)"
    );
    assert!(
        !before.contains("\n| "),
        "the baseline's table is not the first table of BENCHMARKS.md"
    );
    let baseline: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo_root().join("benchmarks/baseline.json")).unwrap()).unwrap();
    for name in baseline["figures"].as_object().unwrap().keys() {
        assert!(written.contains(&format!("`{name}`")), "{name} missing from the table");
    }
}
