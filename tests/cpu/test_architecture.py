"""The shape of the code, checked from the source (no import runs): the import graph of dwdp_comm has
no cycle and no import from a lower layer into a higher one; nothing edits ``sys.path`` or imports a
file by its path; no library file passes 600 lines; one integer check, one round-up, one
``describe``.

The layers, bottom first (docs/design.md, "Layers"). A module belongs to the layer of its longest
matching prefix; it may import its own layer and the layers below.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "dwdp_comm"

LAYERS = [
    ("base", ["dwdp_comm.errors", "dwdp_comm.checks", "dwdp_comm.version"]),
    ("foundation", ["dwdp_comm.comm", "dwdp_comm.interop", "dwdp_comm.layout", "dwdp_comm.placement",
                    "dwdp_comm.planner", "dwdp_comm.engine_options", "dwdp_comm.routing_histogram",
                    "dwdp_comm.lanes"]),
    ("backend interface", ["dwdp_comm.backends.base"]),
    ("GPU layer", ["dwdp_comm.backends.cuda"]),
    ("backends", ["dwdp_comm.backends"]),
    ("group", ["dwdp_comm.group"]),
    ("store", ["dwdp_comm.store"]),
    ("prefetch", ["dwdp_comm.prefetch", "dwdp_comm.prefetch_handle", "dwdp_comm.telemetry"]),
    ("kernels", ["dwdp_comm.kernels"]),
    ("moe", ["dwdp_comm.moe"]),
    ("integrations", ["dwdp_comm.integrations"]),
    ("tools", ["dwdp_comm.launch", "dwdp_comm.testing", "dwdp_comm.bench", "dwdp_comm.trace"]),
    ("package", ["dwdp_comm"]),
]
MAX_LINES = 600

# Known offenders that another change of issue 25 removes; each entry must still be true (so the
# list shrinks as they are fixed: delete an entry once its test says it no longer holds).
KNOWN_CYCLES: list = []
KNOWN_UPWARD: set = set()
KNOWN_LONG: set = set()  # none left; add an entry only for a file another change is splitting


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The dwdp_comm modules ``path`` imports (anywhere in the file, function bodies included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "dwdp_comm"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "dwdp_comm":
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{alias.name}"
                out.add(sub if is_module(sub) else base)
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PKG.rglob("*.py"))}


def layer_of(name: str) -> int:
    best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
                if name == p or name.startswith(p + ".")), default=None)
    assert best is not None, f"{name} is in no layer: add it to LAYERS"
    return best[1]


def cycles(g: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    """The checks below see real edges (a parser that finds nothing would pass them all)."""
    g = graph()
    assert "dwdp_comm.comm" in g["dwdp_comm.group"] and "dwdp_comm.backends" in g["dwdp_comm.group"]
    assert "dwdp_comm.kernels.triton_moe" in g["dwdp_comm.moe.tokens"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_cycle():
    found = cycles(graph())
    unknown = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    assert not unknown, f"import cycles: {unknown}"
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not gone, f"known cycles no longer there (remove them from KNOWN_CYCLES): {gone}"


def test_no_upward_import():
    g = graph()
    up = {(a, b) for a, deps in g.items() for b in deps if layer_of(b) > layer_of(a)}
    unknown = sorted(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
                     for a, b in up - KNOWN_UPWARD)
    assert not unknown, "imports from a lower layer into a higher one:\n" + "\n".join(unknown)
    assert not KNOWN_UPWARD - up, f"no longer upward (remove from KNOWN_UPWARD): {sorted(KNOWN_UPWARD - up)}"


def test_backends_never_import_the_group():
    g = graph()
    assert not [m for m, deps in g.items() if m.startswith("dwdp_comm.backends") and "dwdp_comm.group" in deps]


# ---- no sys.path edits, no import by path --------------------------------------------------------------
_SYS = "sys" + ".path"  # spelled apart so that this file does not match its own patterns
PATH_EDITS = [
    (re.compile(re.escape(_SYS) + r"\s*(\.\s*(insert|append|extend|remove|pop|clear)\s*\(|\[[^\]]*\]\s*=|\s*\+?=[^=])"),
     "edits sys.path"),
    (re.compile(r"syspath_" + r"prepend"), "edits sys.path (pytest monkeypatch)"),
    (re.compile(r"spec_from_file_" + r"location"), "imports a file by its path"),
    (re.compile(r"\brun_" + r"path\s*\("), "runs a file by its path (runpy)"),
    (re.compile(r"SourceFile" + r"Loader|load_" + r"source\s*\(|imp\.load_" + r"module"), "imports a file by its path"),
]


def _repo_files():
    for folder in ("dwdp_comm", "tests", "perf", "examples", "docs", ".ci"):
        for p in sorted((ROOT / folder).rglob("*")):
            if p.is_file() and (p.suffix in (".py", ".sh") or p.parent.name == ".ci") and "results" not in p.parts:
                yield p


def test_no_sys_path_edits_or_imports_by_path():
    bad = [f"{p.relative_to(ROOT)}:{i}: {why}: {line.strip()}"
           for p in _repo_files() for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
           for rx, why in PATH_EDITS if rx.search(line)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("line, flagged", [
    (_SYS + ".insert(0, ROOT)", True), (_SYS + "[:0] = [REPO]", True), (_SYS + " += ['x']", True),
    ("monkeypatch.syspath_" + "prepend(d)", True), ("importlib.util.spec_from_file_" + "location('m', p)", True),
    ("runpy.run_" + "path(p)", True), ("roots = [p for p in " + _SYS + " if 'site' in p]", False),
    ("if ROOT not in " + _SYS + ":", False), ("x = " + _SYS + " == y", False),
])
def test_the_path_patterns(line, flagged):
    assert any(rx.search(line) for rx, _ in PATH_EDITS) == flagged


# ---- file size --------------------------------------------------------------------------------------------
def test_no_library_file_over_600_lines():
    sizes = {str(p.relative_to(PKG)): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    long = {p for p, n in sizes.items() if n > MAX_LINES}
    assert not long - KNOWN_LONG, {p: sizes[p] for p in sorted(long - KNOWN_LONG)}
    assert not KNOWN_LONG - long, f"now under {MAX_LINES} lines (remove from KNOWN_LONG): {sorted(KNOWN_LONG - long)}"


# ---- one helper per rule -------------------------------------------------------------------------------
INLINE_INT_CHECK = re.compile(r"isinstance\([\w.]+, bool\) or not (isinstance\([\w.]+, (int|\(int, np\.integer\))\)"
                              r"|hasattr\([\w.]+, \"__index__\"\))")
ROUND_UP = re.compile(r"\(\s*\w+\s*\+\s*\w+\s*-\s*1\s*\)\s*//\s*\w+\s*\*\s*\w+|def _(align|round_up)\b")
OWN_DESCRIBE = re.compile(r"^def _?describe\(", re.M)
# Inline integer checks in files other changes of issue 25 edit; each becomes checks.check_int when merged.
KNOWN_INLINE_INT_CHECKS: dict = {}
KNOWN_OWN_DESCRIBE: set = set()


def _library_texts():
    return {str(p.relative_to(PKG)): p.read_text() for p in sorted(PKG.rglob("*.py"))}


def test_one_integer_check():
    """Integer arguments go through checks.check_int (one rule: bool is not an int; one message)."""
    found = {f: len(INLINE_INT_CHECK.findall(t)) for f, t in _library_texts().items() if f != "checks.py"}
    found = {f: n for f, n in found.items() if n}
    assert found == KNOWN_INLINE_INT_CHECKS, (f"inline integer checks (use dwdp_comm.checks.check_int): {found}; "
                                              f"update KNOWN_INLINE_INT_CHECKS when one goes")


def test_one_round_up_and_one_describe():
    texts = _library_texts()
    assert not [f for f, t in texts.items() if f != "checks.py" and ROUND_UP.search(t)], \
        "round-ups outside dwdp_comm.checks.align_up"
    own = {f for f, t in texts.items() if f != "comm.py" and OWN_DESCRIBE.search(t)}
    assert own == KNOWN_OWN_DESCRIBE, f"describe() outside dwdp_comm.comm: {own}"


@pytest.mark.parametrize("line, flagged", [
    ("if isinstance(v, bool) or not isinstance(v, (int, np.integer)):", True),
    ("if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:", True),
    ('if isinstance(rank, bool) or not hasattr(rank, "__index__"):', True),
    ("if isinstance(value, bool) or not isinstance(value, (int, float)):", False),  # a number, not an int
    ("if not isinstance(flag, bool):", False),
])
def test_the_int_check_pattern(line, flagged):
    assert bool(INLINE_INT_CHECK.search(line)) == flagged
