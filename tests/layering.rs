//! The library's layering, as the README's "Layout" section draws it: every file of `src/`
//! (the `duro` command under `src/bin/` aside) depends only on files of its own layer or of the
//! layers below, and no files depend on each other in a cycle. A dependency is a path that
//! names an item of another file (`use crate::...`, `super::...`, `crate::...` in code),
//! followed through re-exports to the file that defines the item.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, from the bottom. A module not listed here fails the test: place it.
const LAYERS: &[&[&str]] = &[
    &[
        "auth", "body", "clock", "error", "gate", "id", "message", "metrics", "response", "tls",
        "trace", "wire",
    ],
    &["storage"],
    &["host"],
    &["rpc", "gateway", "admin"],
    &["server", "shards", "cluster"],
    &["builtin", "client", "testing"],
    &["lib"],
];

/// What the client may depend on besides itself: the wire layer only.
const CLIENT_MAY_USE: &[&str] = &["body", "error", "id", "message", "tls", "wire"];

type Module = Vec<String>;

struct Crate {
    /// Module path → its file, and the file's code without comments and tests.
    files: BTreeMap<Module, (PathBuf, String)>,
}

impl Crate {
    fn read(src: &Path) -> Crate {
        let mut files = BTreeMap::new();
        collect(src, src, &mut files);
        // Modules declared under `#[cfg(test)]` are tests, which may use anything.
        let mut tests = Vec::new();
        for (module, (path, _)) in &files {
            let text = std::fs::read_to_string(path).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            for pair in lines.windows(2) {
                if pair[0].trim() == "#[cfg(test)]"
                    && let Some(name) = pair[1].trim().strip_prefix("mod ")
                    && let Some(name) = name.strip_suffix(';')
                {
                    let mut child = module.clone();
                    child.push(name.to_owned());
                    tests.push(child);
                }
            }
        }
        for test in tests {
            files.remove(&test);
        }
        Crate { files }
    }

    fn is_module(&self, module: &[String]) -> bool {
        self.files.contains_key(module)
    }

    /// The module that defines the item `path` names, seen from `from`; `None` for paths into
    /// other crates.
    fn resolve(&self, from: &Module, path: &[String], depth: usize) -> Option<Module> {
        assert!(depth < 16, "re-exports loop at {path:?}");
        let mut absolute: Module = match path.first().map(String::as_str) {
            Some("crate") => Vec::new(),
            Some("super") => {
                let mut module = from.clone();
                let mut rest = path;
                while rest.first().map(String::as_str) == Some("super") {
                    module.pop();
                    rest = &rest[1..];
                }
                return self.resolve_absolute(module, rest, depth);
            }
            Some("self") => from.clone(),
            Some(first) => {
                let mut child = from.clone();
                child.push(first.to_owned());
                if !self.is_module(&child) {
                    return None;
                }
                return self.resolve_absolute(from.clone(), path, depth);
            }
            None => return None,
        };
        absolute.clear();
        self.resolve_absolute(absolute, &path[1..], depth)
    }

    fn resolve_absolute(
        &self,
        mut module: Module,
        rest: &[String],
        depth: usize,
    ) -> Option<Module> {
        let mut rest = rest;
        while let Some(first) = rest.first() {
            let mut child = module.clone();
            child.push(first.clone());
            if !self.is_module(&child) {
                break;
            }
            module = child;
            rest = &rest[1..];
        }
        let Some(item) = rest.first() else {
            return Some(module);
        };
        // An item re-exported by `module` is defined where the re-export points.
        let code = &self.files[&module].1;
        for (name, target) in use_paths(code) {
            if name == *item && is_reexport(code, &target) {
                return self.resolve(&module, &target, depth + 1);
            }
        }
        Some(module)
    }
}

/// Reads every `.rs` file under `dir` except the command's (`src/bin/`).
fn collect(src: &Path, dir: &Path, files: &mut BTreeMap<Module, (PathBuf, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().unwrap() != "bin" {
                collect(src, &path, files);
            }
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let relative = path.strip_prefix(src).unwrap().with_extension("");
        let mut module: Module = relative
            .iter()
            .map(|part| part.to_string_lossy().into_owned())
            .collect();
        if module.last().is_some_and(|last| last == "mod") || module == ["lib"] {
            module.pop();
        }
        let code = code_of(&std::fs::read_to_string(&path).unwrap());
        files.insert(module, (path, code));
    }
}

/// The file's code without comments and without its test module (which may use anything).
fn code_of(text: &str) -> String {
    let mut code = String::new();
    for line in text.lines() {
        if line.starts_with("#[cfg(test)]") {
            // A test module at the top level, to the end of the file; a `mod` line of a test
            // file is only a declaration.
            continue;
        }
        if line.starts_with("mod tests") {
            break;
        }
        let line = line.split("//").next().unwrap_or("");
        code.push_str(line);
        code.push('\n');
    }
    code
}

/// Every path of every `use` declaration, as (the name it brings, the path's segments).
fn use_paths(code: &str) -> Vec<(String, Vec<String>)> {
    let mut paths = Vec::new();
    for statement in code.split(';') {
        let statement = statement.trim();
        let Some(at) = statement.find("use ") else {
            continue;
        };
        // What comes before `use` in the statement, after the last block it closes or opens.
        let head = statement[..at].rsplit(['{', '}']).next().unwrap_or("");
        if !head.trim().is_empty() && !head.trim().starts_with("pub") {
            continue;
        }
        let tree: String = statement[at + 4..]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        expand(&tree, &mut Vec::new(), &mut paths);
    }
    paths
}

/// Expands a use tree (`a::{b, c::{d, e as f}}`) into its paths.
fn expand(tree: &str, prefix: &mut Vec<String>, out: &mut Vec<(String, Vec<String>)>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let base = tree[..open].trim_end_matches("::");
        let inner = &tree[open + 1..tree.rfind('}').unwrap()];
        let depth = prefix.len();
        prefix.extend(
            base.split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        );
        for part in split_top(inner) {
            expand(part, prefix, out);
        }
        prefix.truncate(depth);
        return;
    }
    let (path, alias) = match tree.split_once(" as ") {
        Some((path, alias)) => (path.trim(), Some(alias.trim())),
        None => (tree, None),
    };
    let mut segments = prefix.clone();
    segments.extend(
        path.split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
    );
    if segments.last().is_some_and(|last| last == "self") {
        segments.pop();
    }
    // Globs are left out: `use super::*` is what an inline module (tests, a driver) writes to
    // reach its own file.
    if segments.last().is_some_and(|last| last == "*") {
        return;
    }
    if let Some(last) = segments.last() {
        let name = alias.unwrap_or(last).to_owned();
        out.push((name, segments));
    }
}

/// Splits at the commas outside braces.
fn split_top(list: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in list.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&list[start..]);
    parts.into_iter().filter(|p| !p.trim().is_empty()).collect()
}

/// Whether the `use` of `target` in `code` is a re-export (`pub use`, `pub(crate) use`).
fn is_reexport(code: &str, target: &[String]) -> bool {
    let first = &target[0];
    code.split(';').any(|statement| {
        let statement = statement.trim();
        statement.starts_with("pub")
            && statement.contains("use ")
            && statement.contains(first.as_str())
    })
}

/// The paths the code names outside `use` declarations: `crate::a::b`, `super::a`.
fn inline_paths(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    for start in ["crate::", "super::"] {
        for (at, _) in code.match_indices(start) {
            let before = code[..at].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let path: String = code[at..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let segments: Vec<String> = path
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            // `super::*` (an inline module reaching its own file) names no item.
            if segments.len() >= 2 {
                paths.push(segments);
            }
        }
    }
    paths
}

fn layer_of(module: &Module) -> (usize, &str) {
    let top = module.first().map_or("lib", String::as_str);
    let layer = LAYERS
        .iter()
        .position(|layer| layer.contains(&top))
        .unwrap_or_else(|| panic!("module {top} is in no layer of tests/layering.rs"));
    (layer, top)
}

/// Every dependency between files: (from, to).
fn dependencies(krate: &Crate) -> BTreeSet<(Module, Module)> {
    let mut edges = BTreeSet::new();
    for (module, (_, code)) in &krate.files {
        let mut paths: Vec<Vec<String>> = use_paths(code).into_iter().map(|(_, p)| p).collect();
        paths.extend(inline_paths(code));
        for path in paths {
            if let Some(target) = krate.resolve(module, &path, 0)
                && target != *module
            {
                edges.insert((module.clone(), target));
            }
        }
    }
    edges
}

fn name(module: &Module) -> String {
    if module.is_empty() {
        "lib".into()
    } else {
        module.join("::")
    }
}

#[test]
fn every_file_depends_only_downward_and_no_files_form_a_cycle() {
    let krate = Crate::read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let edges = dependencies(&krate);
    assert!(
        edges.len() > 50,
        "the parser lost track of the imports: {edges:?}"
    );
    let mut wrong = Vec::new();
    for (from, to) in &edges {
        let ((from_layer, from_top), (to_layer, to_top)) = (layer_of(from), layer_of(to));
        if to_layer > from_layer {
            wrong.push(format!("{} -> {} goes up a layer", name(from), name(to)));
        }
        if from_top == "client" && to_top != "client" && !CLIENT_MAY_USE.contains(&to_top) {
            wrong.push(format!(
                "{} -> {}: the client uses the wire only",
                name(from),
                name(to)
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    if let Some(cycle) = find_cycle(&edges) {
        let cycle: Vec<String> = cycle.iter().map(name).collect();
        panic!("files that depend on each other: {}", cycle.join(" -> "));
    }
}

/// A cycle in the graph, if there is one.
fn find_cycle(edges: &BTreeSet<(Module, Module)>) -> Option<Vec<Module>> {
    let mut next: BTreeMap<&Module, Vec<&Module>> = BTreeMap::new();
    for (from, to) in edges {
        next.entry(from).or_default().push(to);
    }
    let mut done = BTreeSet::new();
    for start in next.keys() {
        let mut stack = vec![*start];
        if let Some(cycle) = visit(start, &next, &mut stack, &mut done) {
            return Some(cycle);
        }
    }
    None
}

fn visit<'a>(
    node: &'a Module,
    next: &BTreeMap<&'a Module, Vec<&'a Module>>,
    stack: &mut Vec<&'a Module>,
    done: &mut BTreeSet<&'a Module>,
) -> Option<Vec<Module>> {
    if done.contains(node) {
        return None;
    }
    for &to in next.get(node).into_iter().flatten() {
        if let Some(at) = stack.iter().position(|m| *m == to) {
            let mut cycle: Vec<Module> = stack[at..].iter().map(|m| (*m).clone()).collect();
            cycle.push(to.clone());
            return Some(cycle);
        }
        stack.push(to);
        if let Some(cycle) = visit(to, next, stack, done) {
            return Some(cycle);
        }
        stack.pop();
    }
    done.insert(node);
    None
}

#[test]
fn the_checker_sees_a_cycle_and_an_upward_dependency() {
    let m = |s: &str| -> Module { s.split("::").map(str::to_owned).collect() };
    let edges: BTreeSet<_> = [(m("a"), m("b")), (m("b"), m("c")), (m("c"), m("a"))].into();
    assert_eq!(find_cycle(&edges).map(|c| c.len()), Some(4));
    let edges: BTreeSet<_> = [(m("a"), m("b")), (m("a"), m("c")), (m("b"), m("c"))].into();
    assert_eq!(find_cycle(&edges), None);
    assert!(layer_of(&m("storage")).0 < layer_of(&m("host::state")).0);
    let mut paths = Vec::new();
    expand(
        "crate::storage::{self, Backend, value::{encode as e}}",
        &mut Vec::new(),
        &mut paths,
    );
    let names: Vec<&str> = paths.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["storage", "Backend", "e"]);
}
