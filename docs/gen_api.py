"""Render the docstrings into docs/api.md (what users call) and docs/internals.md (the rest).

Usage, from the repository root (so that this checkout's ``dwdp_comm`` is the one documented)::

    python3 -m docs.gen_api            # rewrite docs/api.md and docs/internals.md
    python3 -m docs.gen_api --check    # exit 1 if either is stale (tests/cpu/test_docs.py runs this)

The public line: the ``__all__`` of each module of :data:`PUBLIC`, and the ``dwdp-bench`` commands.
Every other library module is a contributor reference entry in docs/internals.md: its docstring and
the names of its ``__all__`` it defines, minus what api.md already documents.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import os
import pkgutil
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
API, INTERNALS = os.path.join(DOCS, "api.md"), os.path.join(DOCS, "internals.md")

# What users call; each module's whole __all__ is documented in api.md.
PUBLIC = ["dwdp_comm", "dwdp_comm.launch", "dwdp_comm.testing", "dwdp_comm.moe",
          "dwdp_comm.integrations.transformers", "dwdp_comm.integrations.hf_loading", "dwdp_comm.bench.advise"]
CLI = "dwdp_comm.bench.cli"  # its build_parser(): the dwdp-bench commands
NOT_DOCUMENTED = ("__main__",)  # module basenames left out of internals.md


def _sig(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else "(no docstring)"


def _members(cls) -> list[tuple[str, object]]:
    out = []
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if inspect.isfunction(member) or isinstance(member, property):
            out.append((name, member))
    return out


def _entry(name: str, obj) -> list[str]:
    """The markdown of one documented name (``### ...`` heading first)."""
    if inspect.ismodule(obj):
        return [f"### module `{name}`", "", f"`{obj.__name__}`, documented in its own section.", ""]
    if inspect.isclass(obj):
        sig = "" if issubclass(obj, BaseException) else _sig(obj)
        lines = [f"### class `{name}{sig}`", "", _doc(obj), ""]
        for mname, member in _members(obj):
            if isinstance(member, property):
                lines += [f"#### property `{name}.{mname}`", "", _doc(member), ""]
            else:
                lines += [f"#### `{name}.{mname}{_sig(member)}`", "", _doc(member), ""]
        return lines
    if callable(obj):
        return [f"### `{name}{_sig(obj)}`", "", _doc(obj), ""]
    text = repr(obj)
    if " at 0x" in text:  # an address: not the same from one run to the next
        text = f"{type(obj).__name__} of {sorted(obj)}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    elif isinstance(obj, str) and os.path.isabs(obj) and os.path.realpath(obj).startswith(os.path.realpath(ROOT)):
        # a path inside this checkout: the same document wherever the checkout lies (a CI clone, ...)
        text = "<this checkout>" + obj[len(ROOT):] if obj.startswith(ROOT) else "a path inside this checkout"
    return [f"### constant `{name}`", "", f"`{text if len(text) <= 100 else text[:97] + '...'}`", ""]


def _flags(action) -> str:
    flags = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        flags += " {" + ", ".join(map(str, action.choices)) + "}"
    elif action.nargs != 0 and action.option_strings:
        flags += f" `{action.metavar or action.dest.upper()}`"
    return flags


def render_cli() -> list[str]:
    """The ``dwdp-bench`` commands: each one's options, from the parser (the same on every Python)."""
    ap = importlib.import_module(CLI).build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    lines = ["## `dwdp-bench`", "", "The benchmark and advisor CLI (`dwdp-bench COMMAND --help`; also "
             "`python3 -m dwdp_comm.bench COMMAND`).", ""]
    for cmd, parser in sub.choices.items():
        lines += [f"### `dwdp-bench {cmd}`", "", helps.get(cmd) or "", ""]
        if parser.description:
            lines += [inspect.cleandoc(parser.description), ""]
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            text = action.help or ""
            if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text:
                text += f" (default: `{action.default}`)"
            lines.append(f"- {_flags(action)}: {text}")
        lines.append("")
    return lines


def _section(modname: str, names, skip_ids=frozenset()) -> tuple[list[str], set[int]]:
    mod = importlib.import_module(modname)
    lines, shown = [f"## `{modname}`", "", _doc(mod), ""], set()
    for name in names:
        obj = getattr(mod, name)
        if id(obj) in skip_ids:
            continue
        lines += _entry(name, obj)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            shown.add(id(obj))
    return lines, shown


def render_api() -> tuple[str, set[int]]:
    """docs/api.md, and the ids of the objects it documents."""
    lines = ["# dwdp_comm API", "",
             "What users call, generated from the docstrings by `python3 -m docs.gen_api`; do not edit. "
             "The library's other modules are in `docs/internals.md` (contributor reference, no stability "
             "promise).", ""]
    shown: set[int] = set()
    for modname in PUBLIC:
        sec, ids = _section(modname, importlib.import_module(modname).__all__)
        lines += sec
        shown |= ids
    lines += render_cli()
    return "\n".join(lines).rstrip() + "\n", shown


def internal_modules() -> list[str]:
    """Every module of the package that api.md does not document, in path order."""
    pkg = importlib.import_module("dwdp_comm")
    out = []
    for info in pkgutil.walk_packages(pkg.__path__, "dwdp_comm."):
        if info.name not in PUBLIC and info.name.rsplit(".", 1)[-1] not in NOT_DOCUMENTED:
            out.append(info.name)
    return sorted(out)


def _defined_in(obj, modname: str) -> bool:
    """Whether ``modname``'s section documents ``obj``: classes and functions in the module that
    defines them (a package that re-exports them only names them), constants where listed."""
    if inspect.ismodule(obj):
        return False
    if inspect.isclass(obj) or inspect.isfunction(obj):
        return obj.__module__ == modname
    return True


# Optional packages a module may import at its top (such a module is imported only where they exist).
OPTIONAL_IMPORTS = ("triton", "cupy", "numba", "nvshmem", "cuda")


def _needs_optional(modname: str) -> str | None:
    """The optional package ``modname`` imports at its top level (read from its source, never imported:
    the document must be the same with or without that package), or None."""
    spec = importlib.util.find_spec(modname)
    tree = ast.parse(open(spec.origin).read())
    for node in tree.body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        for n in names:
            if n.split(".")[0] in OPTIONAL_IMPORTS:
                return n.split(".")[0]
    return None


def render_internals(public_ids: set[int]) -> str:
    lines = ["# dwdp_comm internals", "",
             "Contributor reference: every library module that `docs/api.md` does not document, generated from "
             "the docstrings by `python3 -m docs.gen_api`; do not edit. Names here may change without notice. "
             "`docs/design.md` has the layers and the map of every file.", ""]
    for modname in internal_modules():
        needs = _needs_optional(modname)
        if needs is not None:  # documented from its docstring alone, the same whether or not `needs` is installed
            doc = ast.get_docstring(ast.parse(open(importlib.util.find_spec(modname).origin).read())) or ""
            lines += [f"## `{modname}`", "", f"Imports `{needs}` at its top: listed here without its members.", "",
                      doc.strip(), ""]
            continue
        mod = importlib.import_module(modname)
        names = [n for n in getattr(mod, "__all__", ()) if _defined_in(getattr(mod, n), modname)]
        sec, _ = _section(modname, names, frozenset(public_ids))
        lines += sec
    return "\n".join(lines).rstrip() + "\n"


def render() -> dict[str, str]:
    """``{path: text}`` of both documents."""
    os.environ["COLUMNS"] = "120"  # argparse reads it; nothing rendered here depends on it, but be safe
    api, ids = render_api()
    return {API: api, INTERNALS: render_internals(ids)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if a document is stale, write nothing")
    args = ap.parse_args(argv)
    import dwdp_comm
    here = os.path.dirname(os.path.dirname(os.path.abspath(dwdp_comm.__file__)))
    if os.path.realpath(here) != os.path.realpath(ROOT):
        print(f"dwdp_comm is imported from {here}, not from this checkout ({ROOT}): run `python3 -m docs.gen_api` "
              "from the repository root", file=sys.stderr)
        return 2
    stale = []
    for path, text in render().items():
        current = open(path).read() if os.path.exists(path) else ""
        if current == text:
            continue
        stale.append(os.path.relpath(path, ROOT))
        if not args.check:
            with open(path, "w") as f:
                f.write(text)
    if args.check and stale:
        print(f"stale: {', '.join(stale)}: run python3 -m docs.gen_api from the repository root", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
