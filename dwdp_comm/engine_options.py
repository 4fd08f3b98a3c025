"""Copy-engine options: one validation rule for the GPU engines and the contention model.

Pure Python (no CUDA, no torch), so the model and the CPU tests use the very rule the GPU
executor applies.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .errors import bad_arg, bad_type
from .checks import check_int
from .lanes import DISTRIBUTIONS

__all__ = ["ENGINE_OPTIONS", "SYNC_MODES", "parse_engine_options"]

ENGINE_OPTIONS = ("streams", "api", "distribute", "overlap_hint", "sync")
SYNC_MODES = ("none", "slot", "source")


def parse_engine_options(options: Mapping[str, Any] | None, backend: str, *, default_api: str = "batch") -> dict:
    """Validate copy-engine options; an unknown option or a bad value raises, naming it.

    Parameters
    ----------
    options : dict
        ``streams`` (int >= 1, default 1): copy streams for copies from peers (copies from this rank
        itself always get one more stream of their own). ``api`` (``"batch"``, the default, or
        ``"memcpy"``). ``distribute`` (``"source"``, the default, or ``"slot"``). ``overlap_hint``
        (bool, default False; batch only). ``sync`` (``"none"``, the default, ``"slot"`` or
        ``"source"``: time division on the copy plane, see
        :class:`~dwdp_comm.backends.cuda.time_division.TimeDivisionExecutor`; makes creating and
        closing the engine collective).
    backend : str
        Named in the error message.
    default_api : {"batch", "memcpy"}
        ``api`` when ``options`` does not set it: ``"batch"`` on the GPU engines (the measured best
        on H200, perf/results/gpu_copy_plane_h200x2.json); the contention model keeps ``"memcpy"``.

    Returns
    -------
    dict
        All five options, defaults filled in.

    Raises
    ------
    InvalidArgumentError, InvalidTypeError
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(ENGINE_OPTIONS))
    if unknown:
        hint = ("graph=True (the engine's own CUDA graphs per plan) was removed: on H200 its memcpy nodes cost what "
                "single copies cost (docs/benchmarks.md); use api='batch'" if "graph" in unknown else "")
        raise bad_arg("copy engine options", unknown, f"a subset of {list(ENGINE_OPTIONS)} on the {backend} backend",
                      hint)
    streams = options.get("streams", 1)
    streams = check_int("streams", streams, low=1)
    api = options.get("api", default_api)
    if api not in ("memcpy", "batch"):
        raise bad_arg("api", api, "'memcpy' or 'batch'")
    distribute = options.get("distribute", "source")
    if distribute not in DISTRIBUTIONS:
        raise bad_arg("distribute", distribute, "'source' or 'slot'")
    overlap_hint = options.get("overlap_hint", False)
    if not isinstance(overlap_hint, (bool, np.bool_)):
        raise bad_type("overlap_hint", overlap_hint, "a bool")
    sync = options.get("sync", "none")
    if not isinstance(sync, str) or sync not in SYNC_MODES:
        raise bad_arg("sync", sync, f"one of {list(SYNC_MODES)}")
    return {"streams": int(streams), "api": api, "distribute": distribute, "overlap_hint": bool(overlap_hint),
            "sync": sync}
