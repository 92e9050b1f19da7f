//! The rooms' rules, as ARCHITECTURE.md states them, checked on the source:
//! each outside crate is used only in its folder; each import of one
//! top-level folder by another (`crate::x` in `src/`, `wmvae::x` in
//! `crates/bench/`) is an edge of ARCHITECTURE.md's dependency table, and
//! each edge the table states is one the code has; no circle. Reads the
//! sources and ARCHITECTURE.md as text; runs nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The library, then the benches' crate (which uses it as `wmvae::`).
const LIBRARY: &str = "src";
const BENCH_CRATE: &str = "crates/bench";

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

/// (path from the repository root, code without comment lines) of every
/// file under `dir` (relative to the root).
fn code(dir: &str) -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources(&root.join(dir), &mut files);
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let code: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect();
            (
                path.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/"),
                code.join("\n"),
            )
        })
        .collect()
}

/// `code` without its unit tests (a `tests.rs`, a `#[cfg(test)] mod tests`
/// and what follows it): tests play the outside world and may reach
/// anywhere, as `tests/` does.
fn without_unit_tests<'a>(file: &str, code: &'a str) -> &'a str {
    if file.ends_with("/tests.rs") {
        return "";
    }
    let mut at = 0;
    while let Some(i) = code[at..].find("#[cfg(test)]") {
        let start = at + i;
        let rest = code[start + "#[cfg(test)]".len()..].trim_start();
        let rest = rest.strip_prefix("pub(super) ").unwrap_or(rest);
        if rest.starts_with("mod tests") {
            return &code[..start];
        }
        at = start + 1;
    }
    code
}

/// The top-level folders (or files) a file's code names after `prefix`
/// (`crate::` or `wmvae::`): `crate::store::Store` names `store`.
fn named(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices(prefix) {
        // `crate::` as a path of its own, not the end of `my_crate::`.
        if code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[i + prefix.len()..];
        assert!(
            !rest.starts_with('{'),
            "`{prefix}{{...}}`: write one `use {prefix}x::...` per folder, so that each edge is seen"
        );
        let to: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        if !to.is_empty() {
            out.insert(to);
        }
    }
    out
}

/// Who imports whom, as the code has it: the library's top-level folders
/// (a top-level file is its own node: `backoff`, `versions`) by `crate::`,
/// and the bench crate, one node, by `wmvae::`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, code) in code(LIBRARY) {
        let from = file[LIBRARY.len() + 1..]
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        for to in named(without_unit_tests(&file, &code), "crate::") {
            if to != from {
                graph.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    for (file, code) in code(BENCH_CRATE) {
        for to in named(without_unit_tests(&file, &code), "wmvae::") {
            graph.entry(BENCH_CRATE.to_string()).or_default().insert(to);
        }
    }
    graph
}

/// ARCHITECTURE.md's dependency table (`| folder | may use |`): each row's
/// folder and the backquoted names in its second cell.
fn stated() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md")).unwrap();
    let quoted = |cell: &str| -> Vec<String> { cell.split('`').skip(1).step_by(2).map(str::to_string).collect() };
    let mut lines = text.lines().skip_while(|l| l.replace(' ', "") != "|folder|mayuse|");
    assert!(
        lines.next().is_some(),
        "ARCHITECTURE.md has no `| folder | may use |` table"
    );
    let mut table = BTreeMap::new();
    for line in lines.skip(1).take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.split('|').collect();
        let folder = quoted(cells[1]);
        assert_eq!(folder.len(), 1, "a row names one folder: {line}");
        table.insert(folder[0].clone(), quoted(cells[2]).into_iter().collect());
    }
    assert!(
        table.len() > 5,
        "the dependency table is too short to be the one: {table:?}"
    );
    table
}

#[test]
fn outside_crates_stay_in_their_folders() {
    let rules: [(&str, &[&str]); 3] = [
        ("tch::", &["src/vae/", "crates/bench/src/bench.rs"]),
        ("sled::", &["src/store/"]),
        ("async_nats::", &["src/bus/"]),
    ];
    for (file, code) in code(LIBRARY).into_iter().chain(code(BENCH_CRATE)) {
        for (marker, allowed) in rules {
            // `tch::` as a path of its own, not the end of `Batch::`.
            let uses = code
                .match_indices(marker)
                .any(|(i, _)| !code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_'));
            assert!(
                !uses || allowed.iter().any(|a| file.starts_with(a)),
                "{file} uses {marker} outside {allowed:?}"
            );
        }
    }
}

#[test]
fn the_library_never_names_the_bench_crate() {
    for (file, code) in code(LIBRARY) {
        assert!(
            !code.contains("wmvae_bench"),
            "{file} names wmvae_bench: the library is the daemon, the benches depend on it"
        );
    }
}

#[test]
fn each_import_is_an_edge_the_table_states_and_each_stated_edge_is_real() {
    let (table, graph) = (stated(), imports());
    let mut wrong = Vec::new();
    for (from, tos) in &graph {
        for to in tos {
            if !table.get(from).is_some_and(|allowed| allowed.contains(to)) {
                wrong.push(format!(
                    "{from} uses {to}, which ARCHITECTURE.md's table does not allow"
                ));
            }
        }
    }
    for (from, tos) in &table {
        for to in tos {
            if !graph.get(from).is_some_and(|used| used.contains(to)) {
                wrong.push(format!(
                    "the table says {from} uses {to}, which the code does not (any more)"
                ));
            }
        }
    }
    let library = Path::new(env!("CARGO_MANIFEST_DIR")).join(LIBRARY);
    for entry in std::fs::read_dir(library).unwrap() {
        let name = entry
            .unwrap()
            .file_name()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if !["lib", "main"].contains(&name.as_str()) && !table.contains_key(&name) {
            wrong.push(format!("src/{name} has no row in ARCHITECTURE.md's table"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(
        graph.get("daemon").is_some_and(|d| d.contains("store")) && graph.contains_key(BENCH_CRATE),
        "the scan found no imports: {graph:?}"
    );
}

#[test]
fn top_level_folders_import_no_circle() {
    let graph = imports();
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
        graph.get("daemon").is_some_and(|d| d.contains("store")),
        "the scan found no imports: {graph:?}"
    );
}
