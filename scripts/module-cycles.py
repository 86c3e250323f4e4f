#!/usr/bin/env python3
"""Fails if the modules of a Rust crate import each other in a circle.

    python3 scripts/module-cycles.py src/lib.rs core/src/lib.rs ...
    python3 scripts/module-cycles.py --self-test

The module tree is read the way rustc reads it: from the crate root,
following `mod NAME;` (NAME.rs or NAME/mod.rs, or a `#[path]`) and inline
`mod NAME { ... }`. `#[cfg(test)]` items are left out (tests may reach
anywhere). An arrow A -> B is any path in A's code that names B or an item
in B: a `use` (groups, `self`, `as` included), or a path in the code such as
`crate::exit::code(..)`, `super::pin(..)`, `worker::run(..)` or
`alias::Item` after `use crate::cluster::{self as alias}`. Comments, strings
and external crates are ignored.

A module and the modules inside it are one unit to the outside: a parent
may use its children (and re-export them), and a child may use what its
parent defines. Every other arrow must point one way, at every level of the
tree: among the top-level modules (an arrow from `dataplane::worker` to
`cluster` counts as `dataplane` -> `cluster`), among the children of one
module, and so on. Any circle is printed with the names that tie it, and
the exit code is 1.
"""
import os
import re
import sys
import tempfile

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip(text):
    """The code with comments, string and char literals blanked out (kept
    as spaces, so offsets and line numbers stay)."""
    out = []
    i, n = 0, len(text)

    def blank(s):
        return "".join(c if c == "\n" else " " for c in s)

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(blank(text[i:j]))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(blank(text[i:j]))
            i = j
        elif (m := re.match(r'b?r(#*)"', text[i:])) and (i == 0 or not re.match(r"\w", text[i - 1])):
            end = '"' + m.group(1)
            j = text.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            out.append(blank(text[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(blank(text[i:j + 1]))
            i = j + 1
        elif c == "'" and (m := re.match(r"'(\\(x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]+\}|.)|[^\\'])'", text[i:], re.S)):
            out.append(blank(m.group(0)))
            i += m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def matching(text, open_at):
    """The index of the brace that closes the one at `open_at`."""
    depth = 0
    for j in range(open_at, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return len(text) - 1


def drop_test_items(code):
    """Blanks every `#[cfg(test)]` item (its attributes, then up to its `;`
    or its closing brace)."""
    while (m := re.search(r"#\[cfg\(test\)\]", code)):
        j = m.end()
        while j < len(code) and code[j] not in ";{":
            j += 1
        end = j if j >= len(code) or code[j] == ";" else matching(code, j)
        code = code[:m.start()] + "".join(ch if ch == "\n" else " " for ch in code[m.start():end + 1]) + code[end + 1:]
    return code


def expand_use(tree):
    """`a::{b, c::{self as d}, e::*}` -> [(["a","b"], "b"), (["a","c"], "d"), (["a","e"], None)]:
    each path with the name it binds (None for a glob)."""
    tree = re.sub(r"\s+", "", tree)
    result = []

    def walk(prefix, s):
        parts, depth, cur = [], 0, ""
        for ch in s:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        if cur:
            parts.append(cur)
        for part in parts:
            alias = None
            if (m := re.fullmatch(r"(.*)as(" + IDENT + ")", part)) and not part.endswith("::*"):
                part, alias = m.group(1), m.group(2)
            if "{" in part:
                head, rest = part.split("{", 1)
                walk(prefix + [seg for seg in head.split("::") if seg], rest[:-1])
                continue
            segs = prefix + [seg for seg in part.split("::") if seg]
            if segs and segs[-1] == "*":
                result.append((segs[:-1], None))
            elif segs and segs[-1] == "self":
                segs = segs[:-1]
                result.append((segs, alias or (segs[-1] if segs else None)))
            elif segs:
                result.append((segs, alias or segs[-1]))

    walk([], tree)
    return result


class Crate:
    """The module tree of one crate, and the arrows between its modules."""

    def __init__(self, root):
        self.root = root
        self.modules = {}  # module path (tuple) -> (file, code, span start, span end)
        self.children = {}  # module path -> {name: child path}
        self.load((), root)
        # arrows: (from, to) -> set of names used
        self.arrows = {}
        for module in self.modules:
            self.read(module)

    def load(self, module, path, code=None, span=None, is_dir_owner=None):
        if code is None:
            with open(path, encoding="utf-8") as f:
                code = drop_test_items(strip(f.read()))
            span = (0, len(code))
            base = os.path.basename(path)
            is_dir_owner = module == () or base == "mod.rs"
        self.modules[module] = (path, code, span[0], span[1])
        self.children.setdefault(module, {})
        directory = os.path.dirname(path) if is_dir_owner else os.path.splitext(path)[0]
        pattern = r"((?:#\[[^\]]*\]\s*)*)(?:pub(?:\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*([;{])"
        pos = span[0]
        while (m := re.compile(pattern).search(code, pos, span[1])):
            name, attrs = m.group(2), m.group(1)
            child = module + (name,)
            self.children[module][name] = child
            if m.group(3) == ";":
                given = re.search(r'#\[path\s*=\s*"([^"]*)"\]', attrs)
                if given:
                    file = os.path.join(os.path.dirname(path), given.group(1))
                else:
                    file = os.path.join(directory, name + ".rs")
                    if not os.path.exists(file):
                        file = os.path.join(directory, name, "mod.rs")
                if os.path.exists(file):
                    self.load(child, file)
                pos = m.end()
            else:
                close = matching(code, m.end() - 1)
                self.load(child, path, code, (m.end(), close), is_dir_owner)
                pos = close + 1

    def own_ranges(self, module):
        """The parts of a module's span outside its inline children."""
        _, code, start, end = self.modules[module]
        holes = sorted(self.modules[c][2:] for c in self.children[module].values()
                       if self.modules.get(c, (None, None))[1] is code)
        ranges, at = [], start
        for s, e in holes:
            ranges.append((at, s))
            at = e + 1
        ranges.append((at, end))
        return [code[s:e] for s, e in ranges]

    def resolve(self, module, segs, aliases):
        """The module of this crate that a path names (the deepest module
        on it), or None for an external path."""
        if not segs:
            return None
        at, rest = None, list(segs)
        if rest[0] == "crate":
            at, rest = (), rest[1:]
        elif rest[0] in ("self", "super"):
            at = module
            while rest and rest[0] in ("self", "super"):
                if rest[0] == "super":
                    if not at:
                        return None
                    at = at[:-1]
                rest = rest[1:]
        elif rest[0] in self.children[module]:
            at = module
        elif rest[0] in aliases:
            at, rest = aliases[rest[0]], rest[1:]
        else:
            return None
        while rest and rest[0] in self.children.get(at, {}):
            at, rest = self.children[at][rest[0]], rest[1:]
        return at, rest

    def read(self, module):
        code = "\n".join(self.own_ranges(module))
        aliases = {}
        uses = list(re.finditer(r"\buse\s+([^;]*);", code))
        for m in uses:
            for segs, name in expand_use(m.group(1)):
                target = self.resolve(module, segs, aliases)
                if target:
                    self.arrow(module, *target)
                    if name and not target[1]:
                        aliases[name] = target[0]  # the path names a module
        rest = re.sub(r"\buse\s+[^;]*;", " ", code)
        rest = re.sub(r"\bmod\s+" + IDENT + r"\s*;", " ", rest)
        for m in re.finditer(r"(?<![\w:])((?:" + IDENT + r"\s*::\s*)+" + IDENT + ")", rest):
            segs = [s.strip() for s in m.group(1).split("::")]
            target = self.resolve(module, segs, aliases)
            if target:
                self.arrow(module, *target)

    def arrow(self, source, target, rest):
        name = rest[0] if rest else "::".join(target) or "crate"
        if source == target or target[:len(source)] == source or source[:len(target)] == target:
            return  # a module and the modules inside it are one unit
        self.arrows.setdefault((source, target), set()).add(name)


def circles(arrows):
    """Strongly connected components of more than one node (Tarjan)."""
    graph = {}
    for a, b in arrows:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def check(crate):
    """Every circle of `crate`, at every level, as printable text."""
    name = lambda m: "::".join(m) or "crate"
    depth = max((len(m) for m in crate.modules), default=0)
    reports, seen = [], set()
    for level in range(1, depth + 1):
        projected = {}
        for (a, b), names in crate.arrows.items():
            pa, pb = a[:level], b[:level]
            if pa != pb:
                projected.setdefault((pa, pb), []).append((a, b, names))
        for component in circles(projected):
            key = tuple(component)
            if key in seen:
                continue
            seen.add(key)
            lines = [f"circle among {', '.join(name(m) for m in component)}:"]
            members = set(component)
            for (pa, pb), ties in sorted(projected.items()):
                if pa in members and pb in members:
                    for a, b, names in sorted(ties):
                        lines.append(f"  {crate.modules[a][0]} ({name(a)}) -> {name(b)}: {', '.join(sorted(names))}")
            reports.append("\n".join(lines))
    return reports


def self_test():
    """Synthetic crates: each must pass or fail as its name says."""
    cases = {
        "a parent and its children may use each other": (True, {
            "lib.rs": "mod p;\nmod q;\npub use p::run;",
            "p/mod.rs": "mod worker;\nmod counters;\npub struct T;\npub fn run() { worker::go(); }\nfn pin() {}",
            "p/worker.rs": "use super::counters::{bump, Counters};\npub fn go() { super::pin(); }",
            "p/counters.rs": "use super::T;\npub fn bump() {}\npub struct Counters;",
            "q.rs": "use crate::p::{self, T};\nfn f() { p::run(); }",
        }),
        "two siblings that use each other": (False, {
            "lib.rs": "mod a;\nmod b;",
            "a.rs": "use crate::b::X;\npub fn g() {}",
            "b.rs": "pub struct X;\nfn f() { crate::a::g() }",
        }),
        "a circle between packages through a child": (False, {
            "lib.rs": "mod p;\nmod q;",
            "p/mod.rs": "mod c;\npub struct Z;",
            "p/c.rs": "fn f() { let _ = crate::q::Y; }",
            "q.rs": "use crate::p::Z;\npub struct Y;",
        }),
        "a circle inside a package": (False, {
            "lib.rs": "pub mod state;",
            "state/mod.rs": "mod create;\nmod store;\npub use create::create;",
            "state/create.rs": "pub fn create() { super::store::lock_path(); }\npub(crate) fn durably() {}",
            "state/store.rs": "use super::create::durably;\npub(crate) fn lock_path() {}",
        }),
        "groups, self and aliases are followed": (False, {
            "lib.rs": "mod a;\nmod b;",
            "a.rs": "use crate::{b::{self as other}};\nfn f() { other::h(); }\npub fn g() {}",
            "b.rs": "pub fn h() { use crate::a as x; x::g(); }",
        }),
        "comments, strings and test modules are not arrows": (True, {
            "lib.rs": "mod a;\nmod b;",
            "a.rs": "use crate::b::X;\n// crate::b\n",
            "b.rs": ("pub struct X;\n/// see [`crate::a::f`]\nconst S: &str = \"crate::a::f\";\n"
                     "const C: char = '\"';\n/* crate::a */\n#[cfg(test)]\nmod tests {\n    use crate::a::*;\n}\n"),
        }),
        "an inline module is a module": (False, {
            "lib.rs": "mod a;\nmod b { pub fn h() { crate::a::g() } }",
            "a.rs": "pub fn g() {}\nfn f() { crate::b::h() }",
        }),
    }
    failures = 0
    for title, (ok, files) in cases.items():
        with tempfile.TemporaryDirectory() as tmp:
            for rel, text in files.items():
                os.makedirs(os.path.join(tmp, os.path.dirname(rel)), exist_ok=True)
                with open(os.path.join(tmp, rel), "w") as f:
                    f.write(text)
            reports = check(Crate(os.path.join(tmp, "lib.rs")))
        if (not reports) != ok:
            failures += 1
            print(f"self-test FAILED: {title}: expected {'no circle' if ok else 'a circle'}, got {reports or 'none'}")
    if failures:
        return 1
    print(f"ok: the cycle check passes and fails as it should on {len(cases)} synthetic crates")
    return 0


def main(argv):
    if argv == ["--self-test"]:
        return self_test()
    if not argv:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    status = 0
    for root in argv:
        crate = Crate(root)
        reports = check(crate)
        if reports:
            status = 1
            print(f"FAIL: import cycles among the modules of {root}:")
            print("\n".join(reports))
        else:
            print(f"ok: no import cycle among the {len(crate.modules)} modules of {root}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
