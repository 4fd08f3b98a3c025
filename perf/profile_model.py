"""Where a converted model's prefill time goes: host vs GPU, host syncs, top kernels, against HF's own.

A diagnosis tool, not a benchmark of record (``perf/bench_sizes.py`` is that). The model is
bench_sizes' 4-layer Qwen3-30B-A3B shape; ``ours`` is a copy after
:func:`dwdp_comm.integrations.transformers.convert` on a one-rank ``cuda_ipc`` group. Per prefill
size and variant:

- ``wall_ms``: per forward over ``--calls`` back-to-back forwards (synchronised at the end);
- ``host_ms``: the host's time to enqueue them (close to ``wall_ms`` when the host is the bound or
  waits for the GPU inside a forward);
- ``gpu_ms``: one forward bracketed by CUDA events after a sync (includes the GPU's idle gaps);
- ``syncs``: CUDA runtime calls per forward that can make the host wait (stream/event/device
  synchronize, memcpy calls, ``aten::_local_scalar_dense``) and the copies by direction (``Memcpy
  DtoH`` etc., GPU side), from torch.profiler;
- ``top``: the ten CUDA kernels with the most GPU time per forward.
Usage: python3 -m perf.profile_model [--prefill 256,1024,4096] [--calls 20] [--json FILE]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from dwdp_comm.bench import record
from dwdp_comm.bench.split_weights import single_rank_group

from .bench_sizes import qwen3_model

SYNC_NAMES = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy",
              "aten::_local_scalar_dense", "aten::item", "cudaStreamWaitEvent", "cuStreamWaitValue32",
              "Memcpy DtoH", "Memcpy HtoD", "Memcpy DtoD")  # the last three: the copies' direction (GPU side)


def log(*a) -> None:
    print(*a, flush=True)


def measure(fn, calls: int) -> dict:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / calls
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    gpu = []
    for _ in range(5):
        torch.cuda.synchronize()
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        gpu.append(e0.elapsed_time(e1))
    gpu.sort()
    return dict(wall_ms=wall * 1e3, host_ms=host * 1e3, gpu_ms=gpu[len(gpu) // 2])


def profile(fn, n: int = 3) -> dict:
    from torch.profiler import ProfilerActivity, profile as tprofile
    fn()
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    syncs, kernels = {}, []
    for ev in prof.key_averages():
        if any(s in ev.key for s in SYNC_NAMES):
            syncs[ev.key] = ev.count / n
        dev_t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if dev_t and ev.device_type.name == "CUDA":
            kernels.append((dev_t / n / 1e3, ev.count / n, ev.key[:90]))
    kernels.sort(reverse=True)
    return dict(syncs=syncs, top=[dict(ms=round(t, 4), calls=c, name=k) for t, c, k in kernels[:10]],
                kernel_ms=sum(t for t, _, _ in kernels))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill", default="256,1024,4096")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        log("needs a CUDA GPU")
        return 2
    from dwdp_comm.integrations.transformers import convert
    dev = torch.device("cuda")
    hf = qwen3_model(a.layers, dev, False)
    ours = copy.deepcopy(hf)
    rows = []
    with single_rank_group("cuda_ipc") as group, torch.no_grad(), convert(ours, group, depth=2):
        for t in [int(v) for v in a.prefill.split(",")]:
            ids = torch.randint(0, hf.config.vocab_size, (1, t), device=dev)
            for name, m in (("hf", hf), ("ours", ours)):
                fn = (lambda m=m: m(ids).logits)
                r = dict(tokens=t, variant=name, **measure(fn, a.calls), **profile(fn))
                rows.append(r)
                log(f"T={t:5d} {name:4s} wall {r['wall_ms']:.3f} ms, host {r['host_ms']:.3f}, gpu {r['gpu_ms']:.3f}, "
                    f"kernels {r['kernel_ms']:.3f}; syncs/forward {r['syncs']}")
                for k in r["top"][:6]:
                    log(f"      {k['ms']:.4f} ms x{k['calls']:.0f} {k['name']}")
    record.write_json(record.result_path(a.json, "profile_model.json"),
                      dict(env=record.env_info(dev, modules=("transformers", "triton")), args=vars(a),
                           method=__doc__.splitlines()[0], results=rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
