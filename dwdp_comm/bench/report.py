"""Text output (nccl-tests style) and the JSON document of the contention benchmark."""

from __future__ import annotations

import json
import sys
from typing import IO

from .units import format_size  # re-exported: the report prints sizes as the flags take them

SCHEMA = "dwdp-bench/contention/v1"

__all__ = ["SCHEMA", "Reporter", "format_size", "to_json"]

_COLS = [("pattern", "", 12), ("schedule", "", 0), ("chunk", "(B)", 10), ("size", "(B)", 11),
         ("time", "(us)", 11), ("rank-bw", "(GB/s)", 9), ("agg-bw", "(GB/s)", 9), ("ideal", "(GB/s)", 9),
         ("%ideal", "(%)", 7), ("#wrong", "", 7)]


class Reporter:
    """Prints the ``#`` preamble, the header and units rows, and one line per row."""

    def __init__(self, out: IO[str] | None = None, schedule_width: int = 12):
        self.out = out or sys.stdout
        self.sw = max(schedule_width, 8)

    def comment(self, text: str = "") -> None:
        for line in (text.splitlines() or [""]):
            print(f"# {line}".rstrip(), file=self.out)
        self.out.flush()

    def _widths(self) -> list[int]:
        return [w or self.sw for _, _, w in _COLS]

    def header(self) -> None:
        ws = self._widths()
        names = "".join(f"{n:>{w}} " for (n, _, _), w in zip(_COLS, ws))
        units = "".join(f"{u:>{w}} " for (_, u, _), w in zip(_COLS, ws))
        print("#" + names[1:].rstrip(), file=self.out)
        print("#" + units[1:].rstrip(), file=self.out)
        self.out.flush()

    def row(self, r: dict) -> None:
        ws = self._widths()
        head = [r["pattern"], r["schedule"], str(r["chunk_nbytes"]), str(r["nbytes"])]
        if r["status"] != "ok":
            cells = "".join(f"{v:>{w}} " for v, w in zip(head, ws))
            print(f"{cells}  skipped: {r['reason']}", file=self.out)
        else:
            wrong = "-" if r.get("wrong") is None else str(r["wrong"])
            vals = head + [f"{r['time_us']:.1f}", f"{r['rank_GBps']:.2f}", f"{r['agg_GBps']:.2f}",
                           _num(r["ideal_GBps"], 2), _num(r["pct_ideal"], 1), wrong]
            print("".join(f"{v:>{w}} " for v, w in zip(vals, ws)).rstrip(), file=self.out)
        if r.get("note"):
            print(f"#   note: {r['note']}", file=self.out)
        self.out.flush()


def _num(x: float | None, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def to_json(doc: dict, path: str) -> None:
    """Write the result document (``SCHEMA``) to ``path``."""
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
