"""A routing histogram for ``advise``: per MoE layer, per expert, how many routed rows chose it.

Read from a file a user gives (``dwdp-bench advise --routing FILE``) in any of these forms:

* JSON as the telemetry records it (``dwdp_comm.routing_histogram``'s version 1 form, issue 26):
  ``{"format": "dwdp-routing-histogram", "version": 1, "num_experts": E, "top_k": k | null,
  "ranks": [...], "layers": {"3": {"tokens": T, "counts": [E ints]}, ...}}``, alone or under the
  top-level key ``"routing"`` of a whole telemetry file;
* plain JSON: ``{"layers": {"3": [E ints], ...}}`` (optionally ``"top_k"``), ``{"3": [E ints]}``,
  a list of per-layer lists, or one list (one layer);
* CSV, long: a header naming ``layer``, ``expert`` and ``count`` columns (any order; ``tokens`` or
  ``rows`` accepted for ``count``), one row per (layer, expert); experts never listed count 0;
* CSV, wide: one row per layer, ``layer, count_0, ..., count_{E-1}`` (an optional header row
  whose first cell is not a number).

Counts are (token, top-k choice) pairs: ints >= 0. Layers are kept apart: each has its own hot set.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass

from ...errors import bad_arg

__all__ = ["RoutingHistogram", "load_routing", "TELEMETRY_FORMAT"]

TELEMETRY_FORMAT = "dwdp-routing-histogram"


@dataclass(frozen=True)
class RoutingHistogram:
    """Per-layer routed-row counts of every expert.

    Attributes
    ----------
    num_experts : int
    layers : dict of int to tuple of int
        ``layers[l][e]``: rows of layer ``l`` routed to global expert ``e`` (``num_experts`` each).
    top_k : int or None
        The router's k when the file says.
    source : str
        Where it came from (a file name, or ``"dict"``).
    sparse : bool
        True when experts may be missing at the end (long CSV: ``num_experts`` is the highest id
        listed + 1); :meth:`padded` completes them with zeros.
    """

    num_experts: int
    layers: dict
    top_k: int | None = None
    source: str = "dict"
    sparse: bool = False

    def padded(self, num_experts: int) -> "RoutingHistogram":
        """The same counts over ``num_experts`` experts (a sparse histogram's missing ones count 0)."""
        if num_experts == self.num_experts:
            return self
        if not self.sparse or num_experts < self.num_experts:
            raise bad_arg("routing", f"{self.num_experts} experts a layer ({self.source})",
                          f"{num_experts} (the model's num_experts)")
        return RoutingHistogram(num_experts, {k: v + (0,) * (num_experts - len(v)) for k, v in self.layers.items()},
                                self.top_k, self.source)

    def shares(self, layer: int) -> list[float]:
        """Each expert's fraction of layer ``layer``'s routed rows (sums to 1)."""
        c = self.layers[layer]
        total = sum(c)
        return [x / total for x in c]

    def total(self) -> list[int]:
        """Counts summed over the layers."""
        return [sum(col) for col in zip(*self.layers.values())]


def _count(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or int(v) != v:
        raise bad_arg(name, v, "counts that are ints >= 0")
    return int(v)


def _counts(name: str, values, num_experts: int | None) -> tuple[int, ...]:
    if not isinstance(values, (list, tuple)) or not values:
        raise bad_arg(name, values, "a list of per-expert counts")
    out = [_count(name, v) for v in values]
    if num_experts is not None and len(out) != num_experts:
        raise bad_arg(name, f"{len(out)} counts", f"{num_experts} (num_experts)")
    if sum(out) == 0:
        raise bad_arg(name, "all zero", "at least one routed row")
    return tuple(out)


def _layer_id(key) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise bad_arg("routing layer", key, "an integer layer id") from None


def _from_json(doc, source: str) -> RoutingHistogram:
    if isinstance(doc, dict) and "routing" in doc and isinstance(doc["routing"], dict):
        doc = doc["routing"]  # a whole telemetry file
    top_k = None
    if isinstance(doc, dict) and doc.get("format") == TELEMETRY_FORMAT:
        if doc.get("version") != 1:
            raise bad_arg("routing version", doc.get("version"), f"1 ({TELEMETRY_FORMAT})")
        E = doc.get("num_experts")
        if isinstance(E, bool) or not isinstance(E, int) or E < 1:
            raise bad_arg("routing num_experts", E, "an int >= 1")
        top_k = doc.get("top_k")
        layers = {}
        for key, v in (doc.get("layers") or {}).items():
            if not isinstance(v, dict) or "counts" not in v:
                raise bad_arg(f"routing layers[{key!r}]", v, "{'tokens': int, 'counts': [...]}")
            layers[_layer_id(key)] = _counts(f"routing layers[{key!r}].counts", v["counts"], E)
    elif isinstance(doc, dict) and isinstance(doc.get("format"), str):
        raise bad_arg("routing format", doc["format"], f"{TELEMETRY_FORMAT!r}, plain JSON counts or CSV")
    else:
        if isinstance(doc, dict) and "layers" in doc:
            top_k = doc.get("top_k")
            doc = doc["layers"]
        if isinstance(doc, list) and doc and not isinstance(doc[0], (list, tuple)):
            doc = [doc]  # one layer
        items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else None
        if items is None:
            raise bad_arg("routing", type(doc).__name__, "a JSON object or list of per-layer counts")
        layers, E = {}, None
        for key, v in items:
            layers[_layer_id(key)] = c = _counts(f"routing layer {key}", v, E)
            E = len(c)
    if not layers:
        raise bad_arg("routing", source, "at least one layer of counts")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise bad_arg("routing top_k", top_k, "an int >= 1 or null")
    return RoutingHistogram(len(next(iter(layers.values()))), dict(sorted(layers.items())), top_k, source)


def _num(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _from_csv(text: str, source: str) -> RoutingHistogram:
    rows = [[c.strip() for c in r] for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    if not rows:
        raise bad_arg("routing", source, "CSV rows of counts")
    head = [c.lower() for c in rows[0]]
    if "layer" in head and "expert" in head:
        cnt = next((head.index(n) for n in ("count", "tokens", "rows") if n in head), None)
        if cnt is None:
            raise bad_arg("routing CSV header", rows[0], "layer, expert and count columns")
        il, ie = head.index("layer"), head.index("expert")
        per: dict[int, dict[int, int]] = {}
        for i, r in enumerate(rows[1:], 2):
            try:
                layer, e, c = int(r[il]), int(r[ie]), float(r[cnt])
            except (ValueError, IndexError):
                raise bad_arg(f"routing CSV line {i}", r, "layer, expert and count numbers") from None
            if e < 0:
                raise bad_arg(f"routing CSV line {i}", r, "an expert id >= 0")
            d = per.setdefault(layer, {})
            d[e] = d.get(e, 0) + _count(f"routing CSV line {i}", c)
        if not per:
            raise bad_arg("routing", source, "at least one CSV row after the header")
        E = max(max(d) for d in per.values()) + 1
        h = _from_json({str(k): [d.get(e, 0) for e in range(E)] for k, d in per.items()}, source)
        return RoutingHistogram(h.num_experts, h.layers, h.top_k, source, sparse=True)
    body = rows[1:] if not _num(rows[0][0]) else rows
    layers = {}
    for i, r in enumerate(body):
        if not _num(r[0]) or not all(_num(c) for c in r[1:]):
            raise bad_arg(f"routing CSV row {i + 1}", r, "layer, then one count per expert (numbers)")
        layers[str(int(float(r[0])))] = [float(c) for c in r[1:]]
    return _from_json(layers, source)


def load_routing(path_or_doc) -> RoutingHistogram:
    """A :class:`RoutingHistogram` from a file (``.csv``: CSV; else JSON) or a parsed JSON document.

    Raises
    ------
    InvalidArgumentError
        Unreadable, an unknown form, counts that are not ints >= 0, layers of different lengths.
    """
    if isinstance(path_or_doc, RoutingHistogram):
        return path_or_doc
    if isinstance(path_or_doc, (dict, list)):
        return _from_json(path_or_doc, "dict")
    if not isinstance(path_or_doc, str):
        raise bad_arg("routing", type(path_or_doc).__name__, "a file path or a parsed JSON document")
    try:
        with open(path_or_doc) as f:
            text = f.read()
    except OSError as exc:
        raise bad_arg("routing", path_or_doc, "a readable routing histogram file", str(exc)) from None
    name = os.path.basename(path_or_doc)
    if path_or_doc.lower().endswith(".csv"):
        return _from_csv(text, name)
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise bad_arg("routing", path_or_doc, "JSON (or a .csv file)", str(exc)) from None
    return _from_json(doc, name)
