"""The public line: docs/api.md documents what users call, every name it documents exists, every public
name is documented, and both generated documents (api.md, internals.md) are current."""
import importlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
API = (ROOT / "docs" / "api.md").read_text()

# What users call (issue 25): each must have its own entry in api.md.
MUST = {"dwdp_comm": ["init", "WeightStore", "Prefetcher", "PrefetchHandle", "ExpertLayout", "Placement"],
        "dwdp_comm.launch": ["launch"],
        "dwdp_comm.moe": ["DwdpPipeline", "experts_forward"],
        "dwdp_comm.integrations.transformers": ["convert"],
        "dwdp_comm.integrations.hf_loading": ["load_model"],
        "dwdp_comm.bench.advise": ["advise"]}
COMMANDS = {"contention", "calibrate", "predict", "advise"}


def sections(text: str) -> dict[str, list[str]]:
    """``## `module``` section -> the names its ``### `` entries document."""
    out: dict[str, list[str]] = {}
    for block in re.split(r"^## ", text, flags=re.M)[1:]:
        m = re.match(r"`([^`]+)`", block)
        assert m, block[:80]
        out[m.group(1)] = re.findall(r"^### (?:class |constant |module )?`([^`(]+)", block, re.M)
    return out


def test_generated_documents_are_current():
    """docs/api.md and docs/internals.md are rendered from the docstrings: python3 -m docs.gen_api."""
    out = subprocess.run([sys.executable, "-m", "docs.gen_api", "--check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr


def test_what_users_call_is_documented():
    docs = sections(API)
    for mod, names in MUST.items():
        assert mod in docs, f"api.md has no section for {mod}"
        assert not set(names) - set(docs[mod]), f"api.md's {mod} lacks {sorted(set(names) - set(docs[mod]))}"
    cli = {n.split()[1] for n in docs["dwdp-bench"]}
    assert cli == COMMANDS, cli


def test_every_documented_name_exists():
    for mod, names in sections(API).items():
        if mod == "dwdp-bench":
            continue
        m = importlib.import_module(mod)
        missing = [n for n in names if not hasattr(m, n)]
        assert not missing, f"api.md documents {mod}.{missing}, which do not exist"


def test_every_public_name_is_documented():
    """Public modules are api.md's sections; each one's whole __all__ is documented there, and
    nothing else (a name documented but not in __all__ is not public)."""
    for mod, names in sections(API).items():
        if mod == "dwdp-bench":
            continue
        public = importlib.import_module(mod).__all__
        assert sorted(public) == sorted(names), (mod, sorted(set(public) ^ set(names)))


def test_dwdp_bench_commands_are_the_parsers():
    import argparse

    from dwdp_comm.bench.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == COMMANDS
    for cmd, parser in sub.choices.items():
        block = API.split(f"### `dwdp-bench {cmd}`", 1)[1].split("\n### ", 1)[0]
        flags = {s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings} - {"-h", "--help"}
        assert all(f"`{f}`" in block for f in flags), (cmd, sorted(f for f in flags if f"`{f}`" not in block))


def test_internals_are_not_in_the_public_document():
    """Backend internals live in docs/internals.md, not in api.md."""
    internals = sections((ROOT / "docs" / "internals.md").read_text())
    assert not set(internals) & set(sections(API)), set(internals) & set(sections(API))
    assert "dwdp_comm.backends.cuda.executor" in internals and "dwdp_comm.comm" in internals
    assert not re.search(r"^## `dwdp_comm\.backends", API, re.M)
