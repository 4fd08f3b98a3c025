"""Measure this machine's fabric for the copy-plane model (``dwdp-bench calibrate --write FILE``).

:func:`measure_local` times a few copies on the visible GPUs (torch, blocking, a few seconds);
:func:`fit_fabric` turns those times into a :class:`~dwdp_comm.bench.fabric.Fabric`, the fields it
could not measure taken from a preset and said so (``provenance``). The fit inverts the model's own
cost of a copy (``overhead + bytes / rate``), so a fabric the model runs on reproduces the times it
was fitted to (the CPU test's round trip).

What is measured (GPU 0, and GPU 1 when there is one):

* ``whole_s``: one ``nbytes`` copy GPU 1 -> GPU 0 (with one GPU: device-local on GPU 0);
* ``chunked_s``: the same bytes as ``nbytes / chunk_nbytes`` copies back to back on one stream
  (8 MiB over a peer link, 32 MiB locally, so the host issues faster than the copies run);
* ``swap_s`` (two GPUs): 0 <- 1 and 1 <- 0 at once, each copy on its own streams on both devices
  (torch's cross-device copies wait on the current streams of both devices: a shared stream
  would serialise them);
* ``local_s``: one ``nbytes`` device-local copy on GPU 0.

Per copy, ``overhead = (chunked_s - whole_s) / (n_chunks - 1)``; pair rate ``nbytes / (whole_s -
overhead)``; duplex cap ``2 nbytes / (swap_s - overhead)``; local rate ``nbytes / (local_s -
overhead)`` (bytes copied, as ``DEVICE_NOTES.md`` counts them).
"""

from __future__ import annotations

import time

from ..errors import bad_arg
from .fabric import PRESETS, Fabric, detect_preset, preset

__all__ = ["measure_local", "fit_fabric"]


def _timed(fn, devices: list, iters: int) -> float:
    """Median host seconds of ``fn`` with every device in ``devices`` idle before and done after."""
    import torch
    ts = []
    for _ in range(iters + 1):  # the first is a warm-up
        for d in devices:
            torch.cuda.synchronize(d)
        t0 = time.perf_counter()
        fn()
        for d in devices:
            torch.cuda.synchronize(d)
        ts.append(time.perf_counter() - t0)
    ts = sorted(ts[1:])
    return ts[len(ts) // 2]


def measure_local(nbytes: int = 1 << 30, iters: int = 5) -> dict:
    """Time the copies :func:`fit_fabric` needs on GPU 0 (and GPU 1 when visible); blocking.

    Parameters
    ----------
    nbytes : int
        Bytes of each whole copy (default 1 GiB, as ``DEVICE_NOTES.md`` measured).
    iters : int
        Timed repetitions of each case (median).

    Returns
    -------
    dict
        ``gpu`` (device name), ``gpus`` (1 or 2), ``nbytes``, ``chunk_nbytes``, ``n_chunks``,
        ``whole_s``, ``chunked_s``, ``swap_s`` (None with one GPU), ``local_s``, ``peer`` (bool).

    Raises
    ------
    InvalidArgumentError
        No CUDA GPU is visible.
    """
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        raise bad_arg("calibrate --write", "no CUDA GPU visible", "a machine with a CUDA GPU",
                      "it times copies on this machine's GPUs; dwdp-bench calibrate alone needs none")
    peer = torch.cuda.device_count() > 1
    d0 = torch.device("cuda", 0)
    d1 = torch.device("cuda", 1) if peer else d0
    chunk = (8 << 20) if peer else (32 << 20)
    if nbytes < 2 * chunk or nbytes % chunk:
        raise bad_arg("nbytes", nbytes, f"a multiple of {chunk} bytes, at least two chunks")
    n_chunks = nbytes // chunk
    dst0 = torch.empty(nbytes, dtype=torch.uint8, device=d0)
    src0 = torch.empty(nbytes, dtype=torch.uint8, device=d0)
    src1 = torch.empty(nbytes, dtype=torch.uint8, device=d1) if peer else src0
    devs = [d0, d1] if peer else [d0]
    # own streams on both devices for every copy (see the module docstring)
    sa = [torch.cuda.Stream(device=d) for d in devs]
    sb = [torch.cuda.Stream(device=d) for d in devs]

    def on(streams, fn):
        ctx = [torch.cuda.stream(s) for s in streams]
        for c in ctx:
            c.__enter__()
        try:
            fn()
        finally:
            for c in reversed(ctx):
                c.__exit__(None, None, None)

    def whole():
        on(sa, lambda: dst0.copy_(src1, non_blocking=True))

    pieces = [(dst0[i * chunk:(i + 1) * chunk], src1[i * chunk:(i + 1) * chunk]) for i in range(n_chunks)]

    def chunked():  # views made beforehand: the host issues only the copies
        def run():
            for d, s in pieces:
                d.copy_(s, non_blocking=True)
        on(sa, run)

    out = {"gpu": torch.cuda.get_device_name(d0), "gpus": len(devs), "peer": peer, "nbytes": int(nbytes),
           "chunk_nbytes": chunk, "n_chunks": n_chunks, "iters": iters}
    out["whole_s"] = _timed(whole, devs, iters)
    out["chunked_s"] = _timed(chunked, devs, iters)
    out["local_s"] = _timed(lambda: on(sa[:1], lambda: dst0.copy_(src0, non_blocking=True)), devs, iters)
    if peer:
        dst1 = torch.empty(nbytes, dtype=torch.uint8, device=d1)

        def swap():
            on(sa, lambda: dst0.copy_(src1, non_blocking=True))
            on(sb, lambda: dst1.copy_(src0, non_blocking=True))
        out["swap_s"] = _timed(swap, devs, iters)
    else:
        out["swap_s"] = None
    return out


def fit_fabric(measured: dict, base: str = "auto") -> tuple[Fabric, dict]:
    """A fabric from :func:`measure_local`'s times; the fields it cannot measure from ``base``.

    Parameters
    ----------
    measured : dict
        :func:`measure_local`'s result (or the same keys from elsewhere).
    base : str
        The preset of the unmeasured fields; ``"auto"``: the preset of ``measured["gpu"]``, else
        ``h200`` (the measured one).

    Returns
    -------
    (Fabric, dict)
        The fabric (``group_size`` 2, named ``"<base>-measured"``) and, per field, how it was
        obtained (``"measured: ..."`` or ``"from <base>: ..."``).
    """
    for k in ("gpu", "nbytes", "n_chunks", "whole_s", "chunked_s", "local_s", "peer"):
        if k not in measured:
            raise bad_arg("measured", sorted(measured), f"measure_local's keys (missing {k!r})")
    if base == "auto":
        base = detect_preset(measured["gpu"]) or "h200"
    if base not in PRESETS:
        raise bad_arg("base", base, f"'auto' or a preset in {list(PRESETS)}")
    ref = preset(base, 2)
    n, k = measured["nbytes"], measured["n_chunks"]
    if not (measured["chunked_s"] > 0 and measured["whole_s"] > 0 and k >= 2):
        raise bad_arg("measured", measured, "positive times and at least 2 chunks")
    over = max(0.0, (measured["chunked_s"] - measured["whole_s"]) / (k - 1))
    how = f"{k} copies of {n // k >> 20} MiB against one of {n >> 20} MiB"
    prov = {}

    def rate(t: float, nbytes: int) -> float:
        if not t > over:
            raise bad_arg("measured", t, f"a copy time above the per-copy overhead ({over:.3g} s)")
        return nbytes / (t - over)
    vals = {"copy_overhead_s": over}
    prov["copy_overhead_s"] = f"measured: per copy, {how}" + (" (peer)" if measured["peer"] else " (device-local)")
    vals["batch_call_overhead_s"] = vals["graph_copy_overhead_s"] = over
    prov["batch_call_overhead_s"] = "measured: assumed one launch, the per-copy cost (as on H200)"
    prov["graph_copy_overhead_s"] = "measured: assumed the per-copy cost (as on H200)"
    vals["local_Bps"] = rate(measured["local_s"], n)
    prov["local_Bps"] = f"measured: one {n >> 20} MiB device-local copy (bytes copied)"
    if measured["peer"]:
        pair = rate(measured["whole_s"], n)
        vals["egress_Bps"] = vals["ingress_Bps"] = pair
        prov["egress_Bps"] = prov["ingress_Bps"] = f"measured: one {n >> 20} MiB copy GPU 1 -> GPU 0"
        if measured.get("swap_s"):
            vals["duplex_Bps"] = min(2 * rate(measured["swap_s"], n), 2 * pair)
            prov["duplex_Bps"] = "measured: 0 <- 1 and 1 <- 0 at once (capped at twice the pair rate)"
    for f in ("egress_Bps", "ingress_Bps", "duplex_Bps", "batch_copy_overhead_s", "flag_latency_s",
              "harness_copy_overhead_s", "max_streams"):
        if f not in vals:
            vals[f] = getattr(ref, f)
            prov[f] = f"from {base}: not measured here" + (" (one GPU: no peer link)" if not measured["peer"]
                                                           and f in ("egress_Bps", "ingress_Bps", "duplex_Bps")
                                                           else "")
    fab = Fabric(group_size=2, name=f"{base}-measured",
                 notes=f"measured on {measured['gpu']} ({measured.get('gpus', 2 if measured['peer'] else 1)} GPUs) "
                       f"by dwdp-bench calibrate; the rest from {base}", **vals)
    return fab, prov
