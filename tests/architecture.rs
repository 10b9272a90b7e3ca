//! The library's imports point down (docs/architecture.md, "Which way the imports point"):
//! [`LAYERS`] lists the top-level modules of src/ from the ground up, and a module may name
//! (`crate::NAME` outside comments, `$crate::NAME` in its macros) only modules on a lower layer
//! than its own. A loop between two modules, or the runtime importing the test support, breaks
//! this. Inside one module (src/gpu/, src/cpu/, ...) nothing is checked. main.rs (the binary)
//! and lib.rs are not modules of the library's layers.
//!
//! A new module fails the test until it is placed in [`LAYERS`].

use std::path::Path;

/// From the ground up; modules on one layer do not import each other.
const LAYERS: &[&[&str]] = &[
    &["files", "optim", "schedule", "augment", "cli_output", "signals"],
    &["data"],
    &["reference"],
    &["ops"],
    &["network", "opcase"],
    &["model"],
    &["checkpoint"],
    &["paths", "backend", "error"],
    &["cpu", "gpu"],
    &["choice", "train", "opcheck", "image_input"],
    &["bench", "plot"],
    &["api"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The top-level modules `text` names, outside comment lines.
fn named_modules(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with("//")) {
        for (at, _) in line.match_indices("crate::") {
            // `crate::` as a path's start, not the end of a longer word (`$crate::` counts).
            if line[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let name: String =
                line[at + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                names.push(name);
            }
        }
    }
    names
}

/// Every import of `files` ((module, source text)) that does not point down, as a sentence.
fn violations(files: &[(String, String)]) -> Vec<String> {
    let mut found = Vec::new();
    for (module, text) in files {
        let Some(own) = layer(module) else {
            found.push(format!(
                "module `{module}` is not in LAYERS: place it on the layer above all it imports"
            ));
            continue;
        };
        for name in named_modules(text) {
            if name == *module {
                continue;
            }
            match layer(&name) {
                Some(l) if l < own => {}
                Some(l) => found.push(format!(
                    "`{module}` (layer {own}) imports `{name}` (layer {l}): an import that does not point down"
                )),
                None => found.push(format!("`{module}` imports `{name}`, which is not in LAYERS")),
            }
        }
    }
    found
}

/// (top-level module, text) of every .rs file under src/ but main.rs and lib.rs.
fn library_sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    walk(&src, &mut paths);
    paths.sort();
    paths
        .iter()
        .filter_map(|path| {
            let rel = path.strip_prefix(&src).unwrap();
            let first = rel.components().next().unwrap().as_os_str().to_str().unwrap();
            // main.rs and src/cli/ are the binary; lib.rs only declares and re-exports.
            if first == "cli" || rel.components().count() == 1 && (first == "main.rs" || first == "lib.rs") {
                return None;
            }
            let module = first.trim_end_matches(".rs").to_string();
            Some((module, std::fs::read_to_string(path).unwrap()))
        })
        .collect()
}

#[test]
fn every_import_of_the_library_points_down() {
    let files = library_sources();
    assert!(files.len() > 20, "src/ read: {} files", files.len());
    let found = violations(&files);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// The check itself, on planted sources: an import up a layer, one across a layer, a loop, a
/// module not placed, and `$crate::` in a macro are caught; comments and a module naming itself
/// are not.
#[test]
fn imports_that_do_not_point_down_are_caught() {
    let file = |m: &str, t: &str| (m.to_string(), t.to_string());
    assert!(violations(&[file("ops", "use crate::data::Dataset;\n// see crate::network\n")]).is_empty());
    assert!(violations(&[file("gpu", "use crate::gpu::context;\nuse crate::ops::Ops;")]).is_empty());
    let caught = |files: &[(String, String)], needle: &str| {
        let found = violations(files);
        assert!(found.iter().any(|v| v.contains(needle)), "{needle}: {found:?}");
    };
    caught(&[file("data", "use crate::model::IMAGE_SIDE;")], "`data` (layer 1) imports `model`");
    caught(&[file("cpu", "    $crate::gpu::GpuOps")], "`cpu` (layer 8) imports `gpu` (layer 8)");
    caught(
        &[file("paths", "crate::checkpoint::load_checkpoint(p)"), file("checkpoint", "use crate::paths::x;")],
        "`checkpoint` (layer 6) imports `paths`",
    );
    caught(&[file("gpu", "use crate::opcheck::Trace;")], "`gpu` (layer 8) imports `opcheck`");
    caught(&[file("frontdoor", "use crate::train::train;")], "module `frontdoor` is not in LAYERS");
    caught(&[file("train", "use crate::nowhere::x;")], "`nowhere`, which is not in LAYERS");
    // `mycrate::` is another path, not this crate's.
    assert!(violations(&[file("data", "use mycrate::model::x;")]).is_empty());
}
