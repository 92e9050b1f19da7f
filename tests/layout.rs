//! The rooms' rules, as ARCHITECTURE.md states them, checked on the source:
//! each outside crate is used only in its folder, and the folders' imports
//! form no circle. Reads `src/` as text; runs nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// (path under src/, code without comment lines)
fn code() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let code: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect();
            (
                path.strip_prefix(&src).unwrap().to_string_lossy().replace('\\', "/"),
                code.join("\n"),
            )
        })
        .collect()
}

#[test]
fn outside_crates_stay_in_their_folders() {
    let rules: [(&str, &[&str]); 3] = [
        ("tch::", &["vae/", "tools/bench.rs"]),
        ("sled::", &["store/"]),
        ("async_nats::", &["bus/"]),
    ];
    for (file, code) in code() {
        for (marker, allowed) in rules {
            // `tch::` as a path of its own, not the end of `Batch::`.
            let uses = code
                .match_indices(marker)
                .any(|(i, _)| !code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_'));
            assert!(
                !uses || allowed.iter().any(|a| file.starts_with(a)),
                "src/{file} uses {marker} outside {allowed:?}"
            );
        }
    }
}

#[test]
fn top_level_folders_import_no_circle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, code) in code() {
        let from = file.split('/').next().unwrap().trim_end_matches(".rs").to_string();
        for (i, _) in code.match_indices("crate::") {
            let to: String = code[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !to.is_empty() && to != from {
                graph.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if let Some(at) = path.iter().position(|n| n == node) {
            panic!("import circle: {} -> {node}", path[at..].join(" -> "));
        }
        if done.contains(node) {
            return;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, path, done);
        }
        path.pop();
        done.insert(node.to_string());
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, &graph, &mut Vec::new(), &mut done);
    }
    assert!(
        graph.contains_key("daemon") && graph["daemon"].contains("store"),
        "the scan found no imports: {graph:?}"
    );
}
