#!/usr/bin/env python3
"""Copy-plane performance of the GPU backends (issue 3). Run on a multi-GPU machine (4 x H200 here).

Three measurements, one process per GPU (``dwdp_comm.testing.launch``):

1. single pair: rank 0 pulls a 1 GiB expert range (two 512 MiB experts of rank 1) through the
   library (``Prefetcher.prefetch(experts=...)``), against a raw ``cudaMemcpyAsync`` of the same
   bytes between the same two addresses on a non-blocking stream, in the same run. Several chunk
   sizes and both executor APIs. Target: library >= 95 % of raw.
2. overlap: every rank prefetches a full DeepSeek-V3 MoE layer (256 experts, w13 [7168, 4096] and
   w2 [2048, 7168] bf16; 192 remote experts = 16.9 GB per rank) while its compute stream runs
   bf16 8192^3 matmuls that last about as long. Reports the matmul slowdown (target <= 5 %) and
   the prefetch bandwidth alone and overlapped.
3. memory: bytes per rank of the 4-layer DeepSeek-V3 set (heap + depth slots) against the minimum
   (local shards + depth x remote bytes of one layer), by accounting and by ``cudaMemGetInfo``.

Timing: GPU events only. Each timed region starts behind a ``torch.cuda._sleep`` gate on its stream
so that the host has issued every copy before the clock starts (the copies wait for the gate); the
host time ``prefetch()`` took to issue is reported separately.

Usage::

    python3 -m perf.gpu_copy_plane --out $OUT/gpu_copy_plane.json [--world-size 4] [--backends cuda_ipc,nvshmem]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback

import torch

import dwdp_comm as dc
from dwdp_comm import backends as dc_backends
from dwdp_comm.bench import record

GiB, MiB = 1 << 30, 1 << 20


# ---- helpers (run in the ranks) ---------------------------------------------------------------------
def _gate(stream, cycles: int):
    """Sleep on ``stream``, then record a timing event there: the clock starts after the gate."""
    t0 = torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        torch.cuda._sleep(cycles)
        t0.record(stream)
    return t0


def _timed_prefetch(pf, layer: int, experts, stream, gate_cycles: int) -> tuple[float, float, int]:
    """(GPU ms, host issue ms, bytes) of one prefetch that starts behind a gate on ``stream``."""
    before = pf.nbytes_prefetched
    t0 = _gate(stream, gate_cycles)
    t1 = torch.cuda.Event(enable_timing=True)
    h0 = time.perf_counter()
    h = pf.prefetch(layer, experts=experts, stream=stream)  # copies wait for the gate
    issue_ms = (time.perf_counter() - h0) * 1e3
    h.wait(stream=stream)
    t1.record(stream)
    t1.synchronize()
    h.release(stream=stream)
    return t0.elapsed_time(t1), issue_ms, pf.nbytes_prefetched - before


def _timed_raw(dst: int, src: int, nbytes: int, chunk: int, stream, gate_cycles: int) -> float:
    """GPU ms of raw cudaMemcpyAsync of ``nbytes`` (in ``chunk`` pieces) on a non-blocking copy
    stream (torch's) gated exactly like the library's: it waits for ``stream``, which waits for it."""
    from cuda.bindings import runtime as rt
    copy = torch.cuda.Stream()
    t0 = _gate(stream, gate_cycles)
    t1 = torch.cuda.Event(enable_timing=True)
    copy.wait_stream(stream)
    raw = rt.cudaStream_t(copy.cuda_stream)
    for off in range(0, nbytes, chunk):
        n = min(chunk, nbytes - off)
        err = rt.cudaMemcpyAsync(dst + off, src + off, n, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, raw)[0]
        if err != rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"cudaMemcpyAsync failed: {err}")
    stream.wait_stream(copy)
    t1.record(stream)
    t1.synchronize()
    return t0.elapsed_time(t1)


def _stats(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _mem_info():
    free, total = torch.cuda.mem_get_info()  # cudaMemGetInfo on the current device
    return int(free), int(total)


# ---- 1. single pair ---------------------------------------------------------------------------------
def single_pair(group, iters: int, chunks, apis):
    """Rank 0 pulls rank 1's two 512 MiB experts (1 GiB) through the library and raw."""
    G = group.size
    expert = 512 * MiB
    lay = dc.ExpertLayout(2 * G, G, group.rank)
    st = dc.WeightStore(group, lay)
    st.register(0, "w", torch.full((lay.num_local_experts, expert), group.rank + 1, dtype=torch.uint8,
                                   device=group.device))
    st.commit()
    out = {"nbytes": 2 * expert, "mode": st.slot_mode(0, "w"), "lib": {}, "raw": {}, "check": None}
    wanted = list(lay.experts_of(1))
    stream = torch.cuda.Stream()
    gate = 10_000_000
    group.barrier()
    if group.rank == 0:
        try:
            _single_pair_rank0(st, out, wanted, stream, gate, iters, chunks, apis, expert)
        except Exception:  # keep the collective sequence intact: the peers wait in the barrier below
            out["error"] = traceback.format_exc()
    group.barrier()
    st.close()
    return out if group.rank == 0 else None


def _single_pair_rank0(st, out, wanted, stream, gate, iters, chunks, apis, expert):
    """The measurements of :func:`single_pair` (rank 0 only; the peers wait in a barrier)."""
    e = st.placement(0, "w")
    for api in apis:
        for chunk in chunks:
            with dc.Prefetcher(st, depth=1, chunk_nbytes=chunk, engine_options={"api": api}) as pf:
                _timed_prefetch(pf, 0, wanted, stream, gate)  # warm-up (and plan cache)
                ms, issue = [], []
                for _ in range(iters):
                    t, h_ms, nb = _timed_prefetch(pf, 0, wanted, stream, gate)
                    ms.append(t)
                    issue.append(h_ms)
                if out["check"] is None:  # the bytes arrived: rank 1 filled its shard with 2
                    h = pf.prefetch(0, experts=wanted)
                    h.wait()
                    out["check"] = bool(h.weights("w", experts=wanted)[wanted[0]:wanted[-1] + 1].eq(2).all())
                    h.release()
                out["lib"][f"{api}/{chunk // MiB}MiB"] = {
                    "ms": _stats(ms), "GBps_best": 2 * expert / min(ms) / 1e6, "GBps_median":
                    2 * expert / statistics.median(ms) / 1e6, "host_issue_ms": statistics.median(issue),
                    "api_used": pf.engine_api, "bytes_per_prefetch": nb}
                if chunk == chunks[0] and api == apis[0]:
                    # Raw copies between the very addresses the library uses.
                    src = st.heap.peer_ptrs[1] + e.heap_offset
                    dst = pf.slot_ptr(0) + e.slot_offset + e.slot_row(wanted[0]) * e.spec.expert_nbytes
                    for rchunk in sorted({2 * expert, *chunks}, reverse=True):
                        _timed_raw(dst, src, 2 * expert, rchunk, stream, gate)
                        ms = [_timed_raw(dst, src, 2 * expert, rchunk, stream, gate) for _ in range(iters)]
                        out["raw"][f"{rchunk // MiB}MiB"] = {"ms": _stats(ms), "GBps_best": 2 * expert / min(ms) / 1e6,
                                                             "GBps_median": 2 * expert / statistics.median(ms) / 1e6}
    raw_best = out["raw"][f"{2 * expert // MiB}MiB"]["GBps_best"]
    lib_best_key = max(out["lib"], key=lambda k: out["lib"][k]["GBps_best"])
    out["raw_GBps"] = raw_best
    out["lib_best"] = {"config": lib_best_key, "GBps": out["lib"][lib_best_key]["GBps_best"],
                       "ratio_to_raw": out["lib"][lib_best_key]["GBps_best"] / raw_best}
    out["lib_same_chunking"] = {k: v["GBps_best"] / out["raw"][k.split("/")[1]]["GBps_best"]
                                for k, v in out["lib"].items() if k.split("/")[1] in out["raw"]}


# ---- 2 + 3. DeepSeek-V3 layer set: memory and overlap -------------------------------------------------
DSV3 = {"w13": ((7168, 4096), torch.bfloat16), "w2": ((2048, 7168), torch.bfloat16)}


def deepseek(group, num_layers: int, depth: int, variants, reps: int, mm: int):
    G, rank = group.size, group.rank
    lay = dc.ExpertLayout(256, G, rank)
    shards = {n: torch.full((lay.num_local_experts, *shape), float(rank + 1), dtype=dt, device=group.device)
              for n, (shape, dt) in DSV3.items()}
    torch.cuda.synchronize()
    free0, total = _mem_info()
    reserved0 = torch.cuda.memory_reserved()
    st = dc.WeightStore(group, lay)
    for l in range(num_layers):
        for n, t in shards.items():
            st.register(l, n, t)  # one tensor per name serves every layer: the set is about the heap
    st.commit()
    del shards, t
    torch.cuda.empty_cache()
    out = {"rank": rank, "modes": {n: st.slot_mode(0, n) for n in DSV3}, "variants": {}}

    # memory: accounting and the driver's view, with the first variant's prefetcher
    pf = dc.Prefetcher(st, depth=depth, **variants[0][1])
    torch.cuda.synchronize()
    free1, _ = _mem_info()
    torch_delta = torch.cuda.memory_reserved() - reserved0
    per_expert = sum(math.prod(s) * dt.itemsize for s, dt in DSV3.values())
    local_bytes = num_layers * lay.num_local_experts * per_expert
    remote_one = st.remote_nbytes(0)
    minimum = local_bytes + depth * remote_one
    used = st.heap_nbytes + depth * st.slot_nbytes
    out["memory"] = {"heap_nbytes": st.heap_nbytes, "slot_nbytes": st.slot_nbytes, "depth": depth,
                     "library_nbytes": used, "minimum_nbytes": minimum, "ratio": used / minimum,
                     "measured_nbytes": (free0 - free1) - torch_delta, "gpu_total_nbytes": total,
                     "local_shard_nbytes": local_bytes, "remote_nbytes_one_layer": remote_one}

    compute, side = torch.cuda.Stream(), torch.cuda.Stream()
    a = torch.randn(mm, mm, dtype=torch.bfloat16, device=group.device)
    b = torch.randn(mm, mm, dtype=torch.bfloat16, device=group.device)
    c = torch.empty(mm, mm, dtype=torch.bfloat16, device=group.device)
    with torch.cuda.stream(compute):
        for _ in range(3):
            torch.matmul(a, b, out=c)
    compute.synchronize()
    s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(compute):
        s0.record(compute)
        for _ in range(20):
            torch.matmul(a, b, out=c)
        s1.record(compute)
    s1.synchronize()
    one_mm = s0.elapsed_time(s1) / 20
    out["matmul"] = {"shape": [mm, mm, mm], "ms": one_mm, "TFLOPs": 2 * mm ** 3 / one_mm / 1e9}
    gate = 40_000_000
    layer_cycle = [l % num_layers for l in range(1, 10 * num_layers)]

    for vi, (name, kw) in enumerate(variants):
        if vi:
            pf = dc.Prefetcher(st, depth=depth, **kw)
        res = {"options": {k: v for k, v in kw.items()}, "api_used": pf.engine_api}
        li = iter(layer_cycle)
        group.barrier()
        _timed_prefetch(pf, next(li), None, side, gate)  # warm-up
        alone, issue = [], []
        for _ in range(reps):
            group.barrier()  # every rank pulls at once, as in DWDP
            t, h_ms, nb = _timed_prefetch(pf, next(li), None, side, gate)
            alone.append(t)
            issue.append(h_ms)
        res["prefetch_alone"] = {"ms": _stats(alone), "GBps": remote_one / statistics.median(alone) / 1e6,
                                 "bytes": nb, "host_issue_ms": statistics.median(issue)}
        n_mm = max(1, math.ceil(1.2 * statistics.median(alone) / one_mm))
        mm_alone, mm_over, pf_over = [], [], []
        for _ in range(reps):
            group.barrier()
            t0 = _gate(compute, gate)
            t1 = torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(compute):
                for _ in range(n_mm):
                    torch.matmul(a, b, out=c)
                t1.record(compute)
            t1.synchronize()
            mm_alone.append(t0.elapsed_time(t1))
        for _ in range(reps):
            group.barrier()
            t0 = _gate(compute, gate)
            t1, tp = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            h = pf.prefetch(next(li), stream=compute)  # starts with the matmuls, behind the gate
            with torch.cuda.stream(compute):
                for _ in range(n_mm):
                    torch.matmul(a, b, out=c)
                t1.record(compute)
            h.wait(stream=side)
            tp.record(side)
            t1.synchronize()
            tp.synchronize()
            h.release(stream=side)
            mm_over.append(t0.elapsed_time(t1))
            pf_over.append(t0.elapsed_time(tp))
        res["overlap"] = {"matmuls": n_mm, "matmul_alone_ms": _stats(mm_alone), "matmul_overlapped_ms": _stats(mm_over),
                          "slowdown": statistics.median(mm_over) / statistics.median(mm_alone) - 1,
                          "prefetch_overlapped_ms": _stats(pf_over),
                          "prefetch_overlapped_GBps": remote_one / statistics.median(pf_over) / 1e6,
                          "prefetch_hidden": statistics.median(pf_over) <= statistics.median(mm_over)}
        # the bytes are right: a remote expert of the next rank holds that rank's fill value
        h = pf.prefetch(0)
        h.wait()
        peer = (rank + 1) % G
        e = lay.first_expert(peer)
        res["check"] = bool(h.weights("w13", experts=[e])[e].eq(float(peer + 1)).all())
        h.release()
        pf.close()
        out["variants"][name] = res
    st.close()
    return out


def rank_main(group, args: dict):
    out = {"rank": group.rank, "backend": group.backend, "mode": getattr(group.impl, "mode", None),
           "mode_reason": getattr(group.impl, "mode_reason", None), "gpu": torch.cuda.get_device_name(),
           "errors": {}}
    parts = [("single_pair", lambda: single_pair(group, args["iters"], args["chunks"], args["apis"]))]
    if args["deepseek"]:
        parts.append(("deepseek", lambda: deepseek(group, args["layers"], args["depth"], args["variants"],
                                                   args["reps"], args["mm"])))
    partial = os.path.join(args["partial_dir"], f"rank{group.rank}.json")
    for name, fn in parts:
        try:
            out[name] = fn()
        except Exception:
            # Save what we have, then raise: launch() kills the peers (which would wait in a
            # collective) and reports this traceback.
            out["errors"][name] = traceback.format_exc()
            with open(partial, "w") as f:
                json.dump(out, f, indent=1, default=str)
            raise
        with open(partial, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return out


def _versions() -> dict:
    v = record.versions("cuda.bindings", "cuda.core", "cupy", "nvshmem")
    v["driver"] = record.driver_version() or "unknown"
    return v


def summarize(report: dict) -> list[str]:
    lines = []
    for b, res in report["backends"].items():
        if "error" in res:
            lines.append(f"{b}: FAILED: {res['error'].splitlines()[-1] if res['error'] else '?'}")
            continue
        r0 = res["ranks"][0]
        sp = r0.get("single_pair")
        if sp:
            lines.append(f"{b} single pair 1 GiB: raw {sp['raw_GBps']:.1f} GB/s, library best {sp['lib_best']['GBps']:.1f} "
                         f"GB/s ({sp['lib_best']['config']}) = {100 * sp['lib_best']['ratio_to_raw']:.1f}% of raw "
                         f"[target >= 95%], bytes ok: {sp['check']}")
        for r in res["ranks"]:
            if r.get("errors"):
                lines.append(f"{b} rank {r['rank']} errors in {sorted(r['errors'])}")
        ds = [r.get("deepseek") for r in res["ranks"] if r.get("deepseek")]
        if ds:
            m = ds[0]["memory"]
            lines.append(f"{b} memory/rank: {m['library_nbytes'] / 1e9:.2f} GB vs minimum {m['minimum_nbytes'] / 1e9:.2f} GB "
                         f"(x{m['ratio']:.4f}); measured {m['measured_nbytes'] / 1e9:.2f} GB")
            for name in ds[0]["variants"]:
                v = [d["variants"][name] for d in ds]
                slow = max(x["overlap"]["slowdown"] for x in v)
                bw_alone = min(x["prefetch_alone"]["GBps"] for x in v)
                bw_over = min(x["overlap"]["prefetch_overlapped_GBps"] for x in v)
                lines.append(f"{b} overlap [{name}]: matmul slowdown max over ranks {100 * slow:.2f}% [target <= 5%]; "
                             f"prefetch min over ranks {bw_alone:.1f} GB/s alone, {bw_over:.1f} GB/s overlapped; "
                             f"bytes ok: {all(x['check'] for x in v)}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_copy_plane.json"))
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--backends", default="cuda_ipc,nvshmem")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--mm", type=int, default=8192)
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--no-deepseek-on", default="nvshmem",
                    help="backends that run only the single-pair part (comma list)")
    a = ap.parse_args()
    n = dc.testing.gpu_count()
    if n < max(2, a.world_size):
        print(f"# needs {a.world_size} GPUs, found {n}", file=sys.stderr)
        return 2
    variants = [("memcpy/8MiB", {"chunk_nbytes": 8 * MiB, "engine_options": {"api": "memcpy"}}),
                ("batch/8MiB", {"chunk_nbytes": 8 * MiB, "engine_options": {"api": "batch"}}),
                ("memcpy/64MiB", {"chunk_nbytes": 64 * MiB, "engine_options": {"api": "memcpy"}}),
                ("memcpy/8MiB/3streams", {"chunk_nbytes": 8 * MiB, "engine_options": {"api": "memcpy", "streams": 3}}),
                ("memcpy/256MiB/3streams", {"chunk_nbytes": 256 * MiB, "engine_options": {"api": "memcpy", "streams": 3}}),
                ("batch/64MiB/3streams", {"chunk_nbytes": 64 * MiB, "engine_options": {"api": "batch", "streams": 3}})]
    report = {"benchmark": "gpu_copy_plane", "date": record.utc_date(timespec="auto"),
              "git_commit": record.commit() or "unknown", "machine": {"hostname": record.host(),
                                                                      "kind": os.environ.get("DWDP_DEVICE_KIND", "unknown"),
                                                                      "gpus": record.gpu_names(n)},
              "versions": _versions(), "world_size": a.world_size, "backends": {},
              "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                      "NVSHMEM_DISABLE_NVLS", "NVSHMEM_SYMMETRIC_SIZE")}}
    skip_ds = set(a.no_deepseek_on.split(",")) if a.no_deepseek_on else set()
    for b in [x for x in a.backends.split(",") if x]:
        reason = dc_backends.probe(b)
        if reason:
            report["backends"][b] = {"error": f"unavailable: {reason}"}
            continue
        args = {"iters": a.iters, "chunks": [1024 * MiB, 256 * MiB, 64 * MiB, 8 * MiB], "apis": ["memcpy", "batch"],
                "deepseek": b not in skip_ds, "layers": a.layers, "depth": a.depth, "variants": variants,
                "reps": a.reps, "mm": a.mm}
        t0 = time.time()
        args["partial_dir"] = tempfile.mkdtemp(prefix=f"dwdp-perf-{b}-")
        try:
            ranks = dc.testing.launch(rank_main, a.world_size, args, backend=b, timeout=a.timeout)
            report["backends"][b] = {"ranks": ranks, "wall_s": time.time() - t0}
        except Exception:
            partial = {}
            for fn in sorted(os.listdir(args["partial_dir"])):
                with open(os.path.join(args["partial_dir"], fn)) as f:
                    partial[fn] = json.load(f)
            report["backends"][b] = {"error": traceback.format_exc(), "partial": partial, "wall_s": time.time() - t0}
        shutil.rmtree(args["partial_dir"], ignore_errors=True)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:  # after every backend, so a later hang still leaves results
            json.dump(report, f, indent=1, default=str)
    report["summary"] = summarize(report)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print("\n".join(report["summary"]))
    print(f"# wrote {a.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", "8G")  # heap (1 GiB) + gather-mode slots for the nvshmem part
    sys.exit(main())
