"""Render the public API's docstrings into docs/api.md.

Usage: python docs/gen_api.py            # rewrite docs/api.md
       python docs/gen_api.py --check    # exit 1 if docs/api.md is stale (the tests run this)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys

MODULES = ["dwdp_comm", "dwdp_comm.launch", "dwdp_comm.testing", "dwdp_comm.kernels", "dwdp_comm.kernels.torch_path", "dwdp_comm.moe",
           "dwdp_comm.bench.timing", "dwdp_comm.bench.record", "dwdp_comm.bench.split_weights",
           "dwdp_comm.bench.workload", "dwdp_comm.interop.streams",
           "dwdp_comm.interop.torch", "dwdp_comm.interop.cupy", "dwdp_comm.store", "dwdp_comm.moe.runner",
           "dwdp_comm.telemetry", "dwdp_comm.trace", "dwdp_comm.routing_histogram",
           *(f"dwdp_comm.backends.cuda.{m}" for m in ("driver", "streams", "memory", "vmm", "fd_passing", "peers",
                                                       "copies", "time_division", "executor", "backend",
                                                       "timing"))]
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "api.md")
# Document this checkout's package, not whichever one pip's editable install points at (a CI run
# of another clone redirects it: the api.md written then was that clone's).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
        if name.startswith("_") and name not in ("__init__",):
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if inspect.isfunction(member) or isinstance(member, property):
            out.append((name, member))
    return out


def render() -> str:
    lines = ["# dwdp_comm API", "", "Generated from the docstrings by `python docs/gen_api.py`; do not edit.", ""]
    for modname in MODULES:
        mod = importlib.import_module(modname)
        lines += [f"## `{modname}`", "", _doc(mod), ""]
        names = getattr(mod, "__all__", [n for n in vars(mod) if not n.startswith("_")])
        for name in names:
            obj = getattr(mod, name, None)
            if obj is None or inspect.ismodule(obj):
                continue
            if getattr(obj, "__module__", "").split(".")[0] != "dwdp_comm":
                continue
            if inspect.isclass(obj):
                lines += [f"### class `{name}{_sig(obj) if not issubclass(obj, BaseException) else ''}`", "", _doc(obj), ""]
                for mname, member in _members(obj):
                    if mname == "__init__":
                        continue
                    if isinstance(member, property):
                        lines += [f"#### property `{name}.{mname}`", "", _doc(member), ""]
                    else:
                        lines += [f"#### `{name}.{mname}{_sig(member)}`", "", _doc(member), ""]
            elif callable(obj):
                lines += [f"### `{name}{_sig(obj)}`", "", _doc(obj), ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    text = render()
    if args.check:
        current = open(OUT).read() if os.path.exists(OUT) else ""
        if current != text:
            print("docs/api.md is stale: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    with open(OUT, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
