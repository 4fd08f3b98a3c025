"""Routing histograms: how many tokens chose each expert, per MoE layer.

Recorded on the device by the telemetry (:class:`RoutingCounter`, fed by
``DwdpPipeline.acquire(layer, expert_ids=...)`` while ``enable_telemetry(routing=True)``), read by
the advisor (hot-expert replication) from its JSON form (:func:`load`). Version 1::

    {"format": "dwdp-routing-histogram", "version": 1,
     "num_experts": 256, "top_k": 8, "ranks": [0, 1, 2, 3],
     "layers": {"3": {"tokens": 65536, "counts": [812, 0, 4410, ...]}, ...}}

``counts[e]``: the (token, top-k choice) pairs that chose global expert ``e`` in that layer, summed
over the recorded forwards and the ranks in ``ranks``; ``tokens``: the rows routed. Choices outside
``[0, num_experts)`` (padding ids) are not counted, so ``sum(counts) <= tokens * top_k``. Layer
keys are strings in JSON, ints here. A telemetry file holding this object under its top-level key
``"routing"`` is accepted too.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

import torch

from .errors import bad_arg, bad_type
from .checks import check_int

__all__ = ["FORMAT", "VERSION", "RoutingHistogram", "RoutingCounter", "load"]

FORMAT = "dwdp-routing-histogram"
VERSION = 1


class RoutingHistogram:
    """Per-layer expert choice counts (see the module docstring for the JSON form).

    Parameters
    ----------
    num_experts : int
        Routed experts of every layer (>= 1).
    layers : mapping
        ``{layer: {"tokens": int, "counts": [num_experts ints]}}`` (ints >= 0; layer keys may be
        strings of ints, as in JSON).
    top_k : int, optional
        The router's k, when known.
    ranks : iterable of int
        The ranks whose counts were summed.

    Raises
    ------
    InvalidArgumentError
        A field is missing or malformed; the message names it.
    """

    def __init__(self, num_experts: int, layers: Mapping, top_k: int | None = None, ranks: Iterable[int] = ()):
        check_int("num_experts", num_experts, low=1)
        if top_k is not None:
            check_int("top_k", top_k, low=1)
        if not isinstance(layers, Mapping):
            raise bad_type("layers", layers, "a mapping {layer: {'tokens': int, 'counts': [ints]}}")
        self.num_experts, self.top_k = num_experts, top_k
        self.ranks = tuple(sorted({check_int("ranks", r, low=0) for r in ranks}))
        self.layers: dict[int, dict] = {}
        for key, entry in layers.items():
            try:
                layer = int(key)
            except (TypeError, ValueError):
                raise bad_arg("layers", key, "layer keys that are ints (or strings of ints)") from None
            if not isinstance(entry, Mapping) or "counts" not in entry or "tokens" not in entry:
                raise bad_arg(f"layers[{layer}]", entry, "a mapping with 'tokens' and 'counts'")
            counts = list(entry["counts"])
            if len(counts) != num_experts:
                raise bad_arg(f"layers[{layer}].counts", f"{len(counts)} entries", f"{num_experts} (num_experts)")
            counts = [check_int(f"layers[{layer}].counts", c, low=0) for c in counts]
            self.layers[layer] = {"tokens": check_int(f"layers[{layer}].tokens", entry["tokens"], low=0),
                                  "counts": counts}

    def total(self, layer: int | None = None) -> list[int]:
        """Counts per expert (``num_experts`` ints) of ``layer``, or summed over every layer."""
        if layer is not None:
            if layer not in self.layers:
                raise bad_arg("layer", layer, f"one of the recorded layers {sorted(self.layers)}")
            return list(self.layers[layer]["counts"])
        out = [0] * self.num_experts
        for entry in self.layers.values():
            out = [a + b for a, b in zip(out, entry["counts"])]
        return out

    def as_dict(self) -> dict:
        """The JSON form (version 1)."""
        return {"format": FORMAT, "version": VERSION, "num_experts": self.num_experts, "top_k": self.top_k,
                "ranks": list(self.ranks),
                "layers": {str(l): {"tokens": e["tokens"], "counts": list(e["counts"])}
                           for l, e in sorted(self.layers.items())}}

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON form to ``path``."""
        with open(path, "w") as fh:
            json.dump(self.as_dict(), fh)

    @classmethod
    def from_dict(cls, doc: Mapping) -> "RoutingHistogram":
        """Parse the JSON form (or a telemetry document holding it under ``"routing"``)."""
        if not isinstance(doc, Mapping):
            raise bad_type("routing histogram", doc, "a JSON object")
        if doc.get("format") != FORMAT and isinstance(doc.get("routing"), Mapping):
            doc = doc["routing"]
        if doc.get("format") != FORMAT:
            raise bad_arg("format", doc.get("format"), f"{FORMAT!r} (a routing histogram, or a telemetry file "
                          "with one under 'routing')")
        if doc.get("version") != VERSION:
            raise bad_arg("version", doc.get("version"), f"{VERSION}")
        for key in ("num_experts", "layers"):
            if key not in doc:
                raise bad_arg(key, "missing", "present in a routing histogram")
        return cls(doc["num_experts"], doc["layers"], doc.get("top_k"), doc.get("ranks", ()))

    @classmethod
    def merge(cls, hists: Iterable["RoutingHistogram"]) -> "RoutingHistogram":
        """The sum of several histograms (e.g. one per rank) of the same ``num_experts``."""
        hists = list(hists)
        if not hists or not all(isinstance(h, RoutingHistogram) for h in hists):
            raise bad_arg("hists", [type(h).__name__ for h in hists], "one or more RoutingHistogram")
        E = hists[0].num_experts
        if any(h.num_experts != E for h in hists):
            raise bad_arg("hists", [h.num_experts for h in hists], "histograms of one num_experts")
        ks = {h.top_k for h in hists if h.top_k is not None}
        layers: dict[int, dict] = {}
        for h in hists:
            for l, e in h.layers.items():
                acc = layers.setdefault(l, {"tokens": 0, "counts": [0] * E})
                acc["tokens"] += e["tokens"]
                acc["counts"] = [a + b for a, b in zip(acc["counts"], e["counts"])]
        ranks = [r for h in hists for r in h.ranks]
        return cls(E, layers, ks.pop() if len(ks) == 1 else None, ranks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RoutingHistogram) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return (f"RoutingHistogram(num_experts={self.num_experts}, top_k={self.top_k}, ranks={list(self.ranks)}, "
                f"layers={sorted(self.layers)})")


def load(source: str | os.PathLike | Mapping) -> RoutingHistogram:
    """A :class:`RoutingHistogram` from a JSON file path or an already parsed dict.

    Raises
    ------
    InvalidArgumentError
        Not a routing histogram (nor a telemetry file holding one), or a malformed field.
    """
    if isinstance(source, Mapping):
        return RoutingHistogram.from_dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise bad_type("source", source, "a path or a dict")
    with open(source) as fh:
        try:
            doc = json.load(fh)
        except json.JSONDecodeError as exc:
            raise bad_arg("source", os.fspath(source), f"a JSON file ({exc})") from None
    return RoutingHistogram.from_dict(doc)


class RoutingCounter:
    """Accumulates top-k expert choices per layer on their device, with no host synchronisation.

    Parameters
    ----------
    num_experts : int
        Routed experts per layer; choices outside ``[0, num_experts)`` are not counted.

    Notes
    -----
    :meth:`add` enqueues two small kernels on the current stream (a where and an ``index_add_``;
    ``torch.bincount`` is avoided: on CUDA it reads the maximum back to the host).
    :meth:`histogram` reads the counts back (blocks until the counting kernels ran).
    """

    def __init__(self, num_experts: int):
        self.num_experts = check_int("num_experts", num_experts, low=1)
        self.top_k: int | None = None
        self._counts: dict[int, torch.Tensor] = {}  # layer -> int64 [num_experts + 1] (last: out of range)
        self._tokens: dict[int, int] = {}

    def add(self, layer: int, expert_ids: torch.Tensor) -> None:
        """Count ``expert_ids`` (``[num_tokens, top_k]`` integer tensor, any device) for ``layer``."""
        if not isinstance(expert_ids, torch.Tensor):
            raise bad_type("expert_ids", expert_ids, "a torch.Tensor [num_tokens, top_k] of expert ids")
        if expert_ids.dim() != 2 or expert_ids.is_floating_point() or expert_ids.is_complex() \
                or expert_ids.dtype == torch.bool:
            raise bad_arg("expert_ids", f"a {expert_ids.dim()}-D {expert_ids.dtype} tensor",
                          "a 2-D integer tensor [num_tokens, top_k]")
        E = self.num_experts
        counts = self._counts.get(layer)
        if counts is None or counts.device != expert_ids.device:
            fresh = torch.zeros(E + 1, dtype=torch.int64, device=expert_ids.device)
            counts = self._counts[layer] = fresh if counts is None else fresh.add_(counts.to(fresh.device))
        flat = expert_ids.reshape(-1).long()
        flat = torch.where((flat >= 0) & (flat < E), flat, E)  # out of range: the overflow bin, dropped
        counts.index_add_(0, flat, torch.ones_like(flat))
        self._tokens[layer] = self._tokens.get(layer, 0) + int(expert_ids.shape[0])
        if expert_ids.shape[1]:
            self.top_k = int(expert_ids.shape[1])

    def histogram(self, ranks: Iterable[int] = ()) -> RoutingHistogram:
        """The counts so far as a :class:`RoutingHistogram` (blocks: reads the device counts)."""
        layers = {l: {"tokens": self._tokens[l], "counts": c[:self.num_experts].tolist()}
                  for l, c in sorted(self._counts.items())}
        return RoutingHistogram(self.num_experts, layers, self.top_k, ranks)

    def reset(self) -> None:
        """Forget every count."""
        self._counts.clear()
        self._tokens.clear()
