//! The pure core's modules import each other without circles.
//!
//! Reads `src/` (everything but the wasm-only `runtime` shell and test-only modules), finds every
//! path a module names (`use` trees, `crate::…` and `super::…` paths in code, and names its parent
//! re-exports from a child with `pub use child::…`), and fails naming the circle if the import
//! graph between modules has one. A module and its own ancestors are one unit (a parent declares
//! its children, and a provider's module registers in its parent), so those edges do not count;
//! siblings and cousins do.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// Every non-test module under `src/` (the `runtime` shell left out) and its source text.
fn modules(src: &Path) -> BTreeMap<Module, String> {
    let mut out = BTreeMap::new();
    walk(src, src, &mut out);
    out
}

fn walk(src: &Path, dir: &Path, out: &mut BTreeMap<Module, String>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            walk(src, &path, out);
            continue;
        }
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let rel = path.strip_prefix(src).expect("under src");
        let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        let last = parts.pop().expect("a file name");
        let stem = last.trim_end_matches(".rs").to_string();
        if !matches!(stem.as_str(), "lib" | "mod") {
            parts.push(stem);
        }
        if parts.first().map(String::as_str) == Some("runtime") {
            continue;
        }
        let text = fs::read_to_string(&path).expect("readable source");
        out.insert(parts, text);
    }
}

/// Whether `child` is declared test-only (`#[cfg(test)]` right before `mod child;`) in `parent`.
fn declared_for_tests(parent: &str, child: &str) -> bool {
    let lines: Vec<&str> = parent.lines().map(str::trim).collect();
    lines.iter().enumerate().any(|(i, line)| {
        let decl = line.trim_start_matches("pub ").trim_start_matches("pub(crate) ");
        decl == format!("mod {child};")
            && lines[..i].iter().rev().take_while(|l| l.starts_with("#[")).any(|l| l.contains("cfg(test)"))
    })
}

/// The text without comments and without inline `#[cfg(test)] mod … { … }` blocks.
fn code_only(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let code = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    while let Some(start) = out.find("#[cfg(test)]") {
        let after = &out[start..];
        let Some(open) = after.find('{') else { break };
        let head = &after[..open];
        if !head.contains("mod ") || head.contains(';') {
            out.replace_range(start..start + "#[cfg(test)]".len(), "");
            continue;
        }
        let mut depth = 0usize;
        let mut end = out.len();
        for (i, c) in out[start + open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = start + open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.replace_range(start..end, "");
    }
    out
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into its paths.
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.split_whitespace().collect();
    let Some(open) = tree.find('{') else { return vec![tree] };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut items = Vec::new();
    let (mut depth, mut from) = (0usize, 0usize);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&inner[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[from..]);
    items
        .into_iter()
        .filter(|i| !i.is_empty())
        .flat_map(|i| expand(i).into_iter().map(move |p| format!("{prefix}{p}")))
        .collect()
}

/// Every path the code names: `use` trees expanded, and `crate::`/`super::` paths elsewhere.
fn named_paths(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut offset = 0;
    for line in code.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let decl =
            ["use ", "pub use ", "pub(crate) use ", "pub(super) use "].iter().find_map(|p| trimmed.strip_prefix(p));
        if let Some(decl) = decl {
            let at = offset + (line.len() - trimmed.len()) + (trimmed.len() - decl.len());
            if let Some(end) = code[at..].find(';') {
                paths.extend(expand(&code[at..at + end]));
            }
        }
        offset += line.len();
    }
    for anchor in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(anchor) {
            let start = from + i;
            let path: String =
                code[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
            paths.push(path);
            from = start + anchor.len();
        }
    }
    paths
}

/// The module a path names, from module `at`: the longest known module prefix, a parent's
/// `pub use child::Name` followed to the child.
fn resolve(
    path: &str,
    at: &Module,
    known: &BTreeMap<Module, String>,
    reexports: &BTreeMap<(Module, String), Module>,
) -> Option<Module> {
    let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let mut base: Module = match segs.first()? {
        &"crate" => Vec::new(),
        &"super" | &"self" => {
            let mut base = at.clone();
            for s in segs.iter().take_while(|s| **s == "super") {
                let _ = s;
                base.pop();
            }
            base
        }
        _ => return None,
    };
    let names = segs.iter().skip_while(|s| matches!(**s, "crate" | "super" | "self"));
    for name in names {
        let mut next = base.clone();
        next.push((*name).to_string());
        if known.contains_key(&next) {
            base = next;
        } else if let Some(child) = reexports.get(&(base.clone(), (*name).to_string())) {
            return Some(child.clone());
        } else {
            break;
        }
    }
    Some(base)
}

fn related(a: &Module, b: &Module) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

#[test]
fn the_core_modules_import_each_other_without_circles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let all = modules(&src);
    let known: BTreeMap<Module, String> = all
        .iter()
        .filter(|(m, _)| {
            let Some((name, parent)) = m.split_last() else { return true };
            let parent_text = all.get(parent).map(String::as_str).unwrap_or("");
            !declared_for_tests(parent_text, name) && !name.ends_with("tests")
        })
        .map(|(m, t)| (m.clone(), code_only(t)))
        .collect();
    let mut reexports = BTreeMap::new();
    for (m, code) in &known {
        for path in named_paths(code) {
            let segs: Vec<&str> = path.split("::").collect();
            let mut child = m.clone();
            child.push(segs[0].to_string());
            if segs.len() >= 2 && known.contains_key(&child) && code.contains(&format!("pub use {}", segs[0])) {
                reexports.insert((m.clone(), segs[segs.len() - 1].to_string()), child);
            }
        }
    }
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (m, code) in &known {
        let targets = edges.entry(m.clone()).or_default();
        for path in named_paths(code) {
            if let Some(to) = resolve(&path, m, &known, &reexports) {
                if !to.is_empty() && !related(m, &to) {
                    targets.insert(to);
                }
            }
        }
    }
    let circles = circles(&edges);
    let shown: Vec<String> =
        circles.iter().map(|c| c.iter().map(|m| m.join("::")).collect::<Vec<_>>().join(" -> ")).collect();
    assert!(shown.is_empty(), "modules that import each other in a circle:\n{}", shown.join("\n"));
}

/// One circle per strongly connected component of more than one module (Tarjan), as a path.
fn circles(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct Walk<'a> {
        edges: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<Module, usize>,
        low: BTreeMap<Module, usize>,
        stack: Vec<Module>,
        found: Vec<Vec<Module>>,
    }
    fn visit(w: &mut Walk, v: &Module) {
        let i = w.index.len();
        w.index.insert(v.clone(), i);
        w.low.insert(v.clone(), i);
        w.stack.push(v.clone());
        for to in w.edges.get(v).into_iter().flatten() {
            if !w.index.contains_key(to) {
                visit(w, to);
                let l = w.low[to].min(w.low[v]);
                w.low.insert(v.clone(), l);
            } else if w.stack.contains(to) {
                let l = w.index[to].min(w.low[v]);
                w.low.insert(v.clone(), l);
            }
        }
        if w.low[v] == w.index[v] {
            let mut component = Vec::new();
            while let Some(top) = w.stack.pop() {
                let done = &top == v;
                component.push(top);
                if done {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                w.found.push(component);
            }
        }
    }
    let mut w = Walk { edges, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), found: Vec::new() };
    for v in edges.keys() {
        if !w.index.contains_key(v) {
            visit(&mut w, v);
        }
    }
    w.found
        .into_iter()
        .map(|component| {
            let set: BTreeSet<&Module> = component.iter().collect();
            component
                .iter()
                .map(|m| {
                    let to: Vec<String> = edges[m].iter().filter(|t| set.contains(t)).map(|t| t.join("::")).collect();
                    let mut shown = m.clone();
                    shown.push(format!("[imports {}]", to.join(", ")));
                    shown
                })
                .collect()
        })
        .collect()
}
