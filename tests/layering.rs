//! The layering rules of ARCHITECTURE.md ("Layering"), checked on the source tree: every
//! `crate::` path in src/ is resolved to the file it names, and
//!
//! 1. a module imports only modules on a lower floor (or files of its own folder);
//! 2. config and util import nothing of the crate;
//! 3. the pure floors (util, config, stats, frame, detect, model) never name tokio,
//!    rumqttc, nokhwa or v4l;
//! 4. there is no import cycle among src/ files (a folder's `mod.rs` re-exporting its own
//!    children does not count: those are relative `pub use`s, not `crate::` paths).
//!
//! `rules_catch_what_they_promise` feeds the checker made-up trees that break each rule.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Floors, ground first. A module may import modules on lower floors only.
const FLOORS: &[(&str, u32)] = &[
    ("util", 0),
    ("config", 0),
    ("stats", 1),
    ("frame", 1),
    ("detect", 1),
    ("model", 2),
    ("capture", 3),
    ("mqtt", 3),
    ("metrics", 3),
    ("keep", 3),
    ("infer", 4),
    ("daemon", 5),
    // The crate's front door: the module list and re-exports.
    ("lib", 6),
];

/// Floors that import nothing of the crate.
const GROUND: &[&str] = &["util", "config"];

/// Floors that stay free of the async runtime, the MQTT client and the camera drivers.
const PURE: &[&str] = &["util", "config", "stats", "frame", "detect", "model"];
const IMPURE_CRATES: &[&str] = &["tokio", "tokio_util", "rumqttc", "rumqttd", "nokhwa", "v4l"];

/// One source file: its path under src/ (`mqtt/outbox/queue.rs`) and its text.
struct Source {
    path: String,
    text: String,
}

fn read_tree(root: &Path) -> Vec<Source> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                let text = std::fs::read_to_string(&p).unwrap();
                out.push(Source { path: rel, text });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// The text without comments (`//` to the end of the line), so prose naming a module is
/// not an import. String literals are left: none of ours spell `crate::`.
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every module path after a `crate::`, with `use crate::{a, b::{c, d}}` groups expanded:
/// `[["a"], ["b", "c"], ["b", "d"]]`.
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        // `edgesight::crate::` cannot happen; `$crate::` in macros is not ours.
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let (paths, _) = use_tree(rest);
        out.extend(paths);
    }
    out
}

/// Parse a use tree at the start of `s`; returns its paths and the bytes consumed.
fn use_tree(s: &str) -> (Vec<Vec<String>>, usize) {
    let mut prefix = Vec::new();
    let mut i = 0;
    let b = s.as_bytes();
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < b.len() && b[i] == b'{' {
            i += 1;
            let mut all = Vec::new();
            loop {
                while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b',') {
                    i += 1;
                }
                if i >= b.len() || b[i] == b'}' {
                    i += 1;
                    break;
                }
                let (sub, n) = use_tree(&s[i..]);
                i += n.max(1);
                for p in sub {
                    let mut full = prefix.clone();
                    full.extend(p);
                    all.push(full);
                }
            }
            return (all, i);
        }
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            i += 1;
        }
        if i > start {
            prefix.push(s[start..i].to_string());
        }
        if s[i..].starts_with("::") {
            i += 2;
            continue;
        }
        // ` as name`, `;`, `,`, `(`, `}`: the path ends here.
        if s[i..].trim_start().starts_with("as ") {
            let skip = s[i..].find("as ").unwrap() + 3;
            i += skip;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b' ') {
                i += 1;
            }
        }
        return (vec![prefix], i);
    }
}

/// The file a module path names: the longest prefix that is a file of the tree.
fn resolve(files: &BTreeSet<String>, path: &[String]) -> Option<String> {
    (1..=path.len()).rev().find_map(|n| {
        let p = path[..n].join("/");
        [format!("{p}.rs"), format!("{p}/mod.rs")]
            .into_iter()
            .find(|f| files.contains(f))
    })
}

/// The top-level module a file belongs to: `mqtt/outbox/queue.rs` -> `mqtt`.
fn top(file: &str) -> &str {
    let first = file.split('/').next().unwrap_or(file);
    first.strip_suffix(".rs").unwrap_or(first)
}

fn floor(module: &str) -> Option<u32> {
    FLOORS.iter().find(|(m, _)| *m == module).map(|(_, f)| *f)
}

/// Every broken rule, in words that name the file and the import.
fn violations(tree: &[Source]) -> Vec<String> {
    let files: BTreeSet<String> = tree.iter().map(|s| s.path.clone()).collect();
    let mut bad = Vec::new();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for src in tree {
        if src.path == "main.rs" {
            continue; // the binary: it uses the library from outside
        }
        let from = top(&src.path);
        let Some(from_floor) = floor(from) else {
            bad.push(format!(
                "{}: module {from} has no floor in FLOORS",
                src.path
            ));
            continue;
        };
        let code = code(&src.text);
        for path in crate_paths(&code) {
            let Some(target) = resolve(&files, &path) else {
                continue;
            };
            let to = top(&target);
            edges
                .entry(src.path.clone())
                .or_default()
                .insert(target.clone());
            if to == from {
                continue;
            }
            let shown = format!("crate::{}", path.join("::"));
            if GROUND.contains(&from) {
                bad.push(format!(
                    "{}: {from} is the ground floor but imports {shown}",
                    src.path
                ));
            } else if floor(to).is_some_and(|f| f >= from_floor) {
                bad.push(format!(
                    "{}: {from} (floor {from_floor}) imports {shown} ({to}, floor {})",
                    src.path,
                    floor(to).unwrap()
                ));
            }
        }
        if PURE.contains(&from) {
            for c in IMPURE_CRATES {
                let named = code.match_indices(&format!("{c}::")).any(|(i, _)| {
                    let before = code[..i].chars().last();
                    !before.is_some_and(|b| b.is_alphanumeric() || b == '_' || b == ':')
                });
                if named {
                    bad.push(format!("{}: {from} is pure but names {c}", src.path));
                }
            }
        }
    }
    bad.extend(cycles(&edges));
    bad
}

/// Import cycles among files (self-imports aside), each named once by its files.
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        found: &mut BTreeSet<String>,
    ) {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(n.to_string());
            found.insert(format!("import cycle: {}", cycle.join(" -> ")));
            return;
        }
        if done.contains(n) {
            return;
        }
        stack.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            if m != n {
                visit(m, edges, stack, done, found);
            }
        }
        stack.pop();
        done.insert(n.to_string());
    }
    let mut found = BTreeSet::new();
    let mut done = BTreeSet::new();
    for n in edges.keys() {
        visit(n, edges, &mut Vec::new(), &mut done, &mut found);
    }
    found.into_iter().collect()
}

#[test]
fn the_source_tree_keeps_its_layers() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let tree = read_tree(&root);
    assert!(
        tree.len() > 20,
        "read {} files from {}",
        tree.len(),
        root.display()
    );
    // Every top-level module has a floor, and every floor's module exists.
    for (m, _) in FLOORS {
        assert!(
            tree.iter().any(|s| top(&s.path) == *m),
            "FLOORS names {m}, which src/ does not have"
        );
    }
    let bad = violations(&tree);
    assert!(bad.is_empty(), "layering broken:\n  {}", bad.join("\n  "));
}

/// Data-driven: made-up trees, each breaking one rule (or none), and what the checker
/// must say.
#[test]
fn rules_catch_what_they_promise() {
    let tree = |files: &[(&str, &str)]| -> Vec<Source> {
        files
            .iter()
            .map(|(p, t)| Source {
                path: p.to_string(),
                text: t.to_string(),
            })
            .collect()
    };
    // (files as (path, text), the violations expected, by their start)
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        // Downward imports, groups and renames: fine.
        (
            &[
                ("config/mod.rs", "pub struct Settings;"),
                (
                    "capture/mod.rs",
                    "use crate::{config::Settings, stats::{Stats as S}};",
                ),
                ("stats/mod.rs", "use crate::config::Settings;"),
            ],
            &[],
        ),
        // An upward import (capture takes the inference stage's slots).
        (
            &[
                ("capture/mod.rs", "use crate::infer::Slots;"),
                ("infer/mod.rs", "pub struct Slots;"),
            ],
            &["capture/mod.rs: capture (floor 3) imports crate::infer::Slots (infer, floor 4)"],
        ),
        // Sideways: mqtt takes capture's status, inside a group.
        (
            &[
                ("mqtt/driver.rs", "use crate::{capture::CameraStatus};"),
                ("capture/mod.rs", ""),
            ],
            &["mqtt/driver.rs: mqtt (floor 3) imports crate::capture::CameraStatus"],
        ),
        // The ground floor imports something; a comment naming a module does not count.
        (
            &[
                (
                    "config/mod.rs",
                    "// see crate::mqtt\nlet x = crate::mqtt::MAX_PACKET;",
                ),
                ("mqtt/mod.rs", ""),
            ],
            &["config/mod.rs: config is the ground floor but imports crate::mqtt::MAX_PACKET"],
        ),
        // A pure floor names tokio.
        (
            &[("frame/mod.rs", "fn f() { tokio::spawn(async {}); }")],
            &["frame/mod.rs: frame is pure but names tokio"],
        ),
        // A cycle inside one folder.
        (
            &[
                ("mqtt/mod.rs", "use crate::mqtt::discovery::payload;"),
                ("mqtt/discovery.rs", "use crate::mqtt::availability_topic;"),
            ],
            &["import cycle: mqtt/discovery.rs -> mqtt/mod.rs -> mqtt/discovery.rs"],
        ),
    ];
    for (files, want) in cases {
        let got = violations(&tree(files));
        assert_eq!(got.len(), want.len(), "{files:?}: {got:?}");
        for (g, w) in got.iter().zip(*want) {
            assert!(g.starts_with(w), "{files:?}:\n got {g}\nwant {w}");
        }
    }
}

/// The tests a `Tests:` line names: its code spans with a `::` (braces expanded:
/// `a::{b, c}` is `a::b` and `a::c`) or a path under tools/ or tests/.
fn named_tests(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    for span in line.split('`').skip(1).step_by(2) {
        let span: String = span.split_whitespace().collect();
        if let Some((head, rest)) = span.split_once("::{") {
            for leaf in rest.trim_end_matches('}').split(',') {
                out.push(format!("{head}::{leaf}"));
            }
        } else if span.contains("::") || span.starts_with("tools/") || span.starts_with("tests/") {
            out.push(span);
        }
    }
    out
}

/// Whether the test `name` (`file::test` for tests/FILE.rs, `module::path::test` for a
/// unit test, or a script's path) exists in the tree.
fn test_exists(root: &Path, src: &[Source], name: &str) -> bool {
    if name.starts_with("tools/") || name.starts_with("tests/") {
        return root.join(name.split(' ').next().unwrap_or(name)).exists();
    }
    let parts: Vec<&str> = name.split("::").collect();
    let (module, test) = (&parts[..parts.len() - 1], parts[parts.len() - 1]);
    let def = format!("fn {test}(");
    let integration = root.join("tests").join(format!("{}.rs", module[0]));
    if module.len() == 1 && integration.exists() {
        return std::fs::read_to_string(integration).unwrap().contains(&def);
    }
    let dir: Vec<&str> = module.iter().copied().filter(|m| *m != "tests").collect();
    let prefix = dir.join("/");
    src.iter()
        .any(|s| s.path.starts_with(&prefix) && s.text.contains(&def))
}

/// ARCHITECTURE.md's invariants each name the tests that fail when they break, and every
/// test named exists: renaming or deleting one breaks this, not the document silently.
#[test]
fn every_invariant_names_tests_that_exist() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let section = doc
        .split("\n## Invariants")
        .nth(1)
        .expect("ARCHITECTURE.md has an Invariants section");
    let section = section.split("\n## ").next().unwrap();
    let src = read_tree(&root.join("src"));
    let bullets: Vec<&str> = section.split("\n* ").skip(1).collect();
    assert!(bullets.len() >= 12, "{} invariants", bullets.len());
    let mut missing = Vec::new();
    for b in bullets {
        let title = b.split("**").nth(1).unwrap_or(b);
        if title == "Tests use real parts" {
            continue; // the rule the others follow
        }
        let Some((_, tests)) = b.split_once("Tests:") else {
            missing.push(format!("{title}: names no tests"));
            continue;
        };
        let names = named_tests(tests);
        if names.is_empty() {
            missing.push(format!("{title}: names no tests"));
        }
        for n in names {
            if !test_exists(&root, &src, &n) {
                missing.push(format!("{title}: no test {n}"));
            }
        }
    }
    assert!(missing.is_empty(), "{missing:#?}");
    // The checker can tell: a made-up name is not found.
    assert!(!test_exists(&root, &src, "daemon::no_such_test"));
    assert!(!test_exists(
        &root,
        &src,
        "mqtt::outbox::tests::no_such_test"
    ));
}
