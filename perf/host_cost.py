"""Host cost of the experts path and of a converted model's layers: torch ops dispatched, Triton
launches, capture checks, CUDA runtime calls and host time per call, with tiny tensors.

At small token counts the experts forward is bound by the host (``perf/results/
bench_sizes_h100_before.json``: the GPU work is equal or better under CUDA graphs, eager is
slower). This script counts, per call, what the host does:

- ``ops``: aten ops that reach the dispatcher (a ``TorchDispatchMode``), split into ``launch``
  (ops that run a kernel on CUDA), ``view`` (metadata only) and ``alloc`` (``empty*``);
- ``triton``: Triton kernel launches (the wrappers of :mod:`dwdp_comm.kernels.triton_moe` and
  :mod:`dwdp_comm.kernels.triton_route`, counted at their entry);
- ``capture_checks``: ``torch.cuda.is_current_stream_capturing()`` calls;
- ``rt_calls``: cuda.bindings runtime calls (events, stream waits: the copy engine; CUDA only);
- ``host_us``: host time per call, median of ``--calls`` (on CUDA with the device idle at each
  call's start, so it is the host's own time, not a wait for the GPU; on CPU, by default, with the
  grouped GEMMs stubbed by an allocation of their result: their CPU compute is no host cost on
  CUDA, ``--real-gemm`` keeps it); ``cpu_us``: this thread's
  CPU time per call (robust on a loaded machine; on CPU torch runs one thread here, and the tiny
  kernels' own CPU work is included).

CPU emulation of the CUDA path (default on CPU, ``--no-emulate`` to measure the plain CPU path):
the Triton kernels do not run on CPU, so their wrappers are replaced by torch implementations that
run outside the op count and outside the timed host time, and counted as one launch each; the
callers then take the branches CUDA takes. Branches on ``x.is_cuda`` (split weights' host reads,
worker streams) still take the CPU side: the whole-tensor path counted here has none.

Parts: ``experts`` (per family: ours and HF's ``grouped_mm_experts_forward`` on the same weights
and routing) and ``model`` (a tiny Qwen3-MoE model converted on a one-rank group: per layer, the
experts call and the pipeline / prefetch-handle work around it).

On CPU the host times exclude the Triton launches' own host cost (emulated) and, by default, the
grouped GEMMs' CPU compute: they are a proxy of Python and dispatch overhead; the op counts are exact.
On CUDA everything is real. The model part runs on ``sim`` on CPU (its host waits on the copy
thread are sim's own) and on ``cuda_ipc`` on CUDA.

Usage: python3 -m perf.host_cost [--parts experts,model] [--families ...] [--tokens 16,128]
       [--calls 200] [--no-emulate] [--real-gemm] [--json FILE]   (default $OUT/host_cost.json when $OUT is set)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dwdp_comm.bench import record

FAMILIES = ("qwen3_moe", "olmoe", "mixtral", "deepseek_v3", "gpt_oss")
_VIEWS = {"view", "_unsafe_view", "transpose", "t", "slice", "select", "as_strided", "expand", "unsqueeze",
          "squeeze", "permute", "alias", "detach", "split", "split_with_sizes", "unbind", "narrow", "_reshape_alias",
          "view_as", "reshape", "chunk", "lift_fresh", "_to_copy_view", "diagonal", "unfold"}
_ALLOCS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


def log(*a) -> None:
    print(*a, flush=True)


class OpCounter(TorchDispatchMode):
    """Counts aten ops per scope (the innermost scope of :meth:`scope` gets them; ``"*"`` all)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.paused = 0
        self._scopes: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            name = func.overloadpacket.__name__
            self.counts["*"][name] += 1
            if self._scopes:
                self.counts[self._scopes[-1]][name] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def scope(self, name: str):
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()


def classify(counts: collections.Counter) -> dict:
    views = sum(n for op, n in counts.items() if op in _VIEWS)
    allocs = sum(n for op, n in counts.items() if op in _ALLOCS)
    total = sum(counts.values())
    return {"ops": total, "launch": total - views - allocs, "view": views, "alloc": allocs,
            "by_op": dict(counts.most_common())}


class Probes:
    """Counters patched into the library for one measurement (see the module docstring)."""

    def __init__(self, emulate: bool, device: torch.device):
        self.emulate, self.device = emulate, device
        self.counter: OpCounter | None = None
        self.triton = collections.Counter()
        self.capture_checks = 0
        self.rt_calls = collections.Counter()
        self.stub_s = self.stub_cpu_s = 0.0  # time spent in emulated kernels (taken out of host_us, cpu_us)
        self.last_counts: dict = {}  # per scope, of the last counted call

    def reset(self) -> None:
        self.triton.clear()
        self.rt_calls.clear()
        self.capture_checks = 0
        self.stub_s = 0.0

    @contextlib.contextmanager
    def installed(self):
        patches = []

        def patch(obj, name, new):
            patches.append((obj, name, getattr(obj, name)))
            setattr(obj, name, new)

        real_capturing = torch.cuda.is_current_stream_capturing

        def capturing():
            self.capture_checks += 1
            return real_capturing()
        patch(torch.cuda, "is_current_stream_capturing", capturing)
        for mod, names in _triton_wrappers():
            for name in names:
                patch(mod, name, self._wrap(name, getattr(mod, name), _EMULATED.get(name)))
            if self.emulate and self.device.type != "cuda":
                patch(mod, "unavailable_reason", _EMULATED_REASONS[mod.__name__.rsplit(".", 1)[1]])
        if self.device.type == "cuda":
            from dwdp_comm.backends.cuda import driver
            driver.load()
            patch(driver.bindings, "rt", _CountingModule(driver.bindings.rt, self.rt_calls))
        try:
            yield self
        finally:
            for obj, name, old in reversed(patches):
                setattr(obj, name, old)

    @contextlib.contextmanager
    def paused(self):
        """Ops inside are not counted and their host time is not timed (emulated GPU work)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        c = self.counter
        if c is not None:
            c.paused += 1
        try:
            yield
        finally:
            if c is not None:
                c.paused -= 1
            self.stub_cpu_s += time.thread_time() - c0
            self.stub_s += time.perf_counter() - t0

    def _wrap(self, name, real, emulated):
        def run(*a, **kw):
            self.triton[name] += 1
            if not (self.emulate and self.device.type != "cuda"):
                return real(*a, **kw)
            return emulated(self, *a, **kw)
        return run


class _CountingModule:
    """A proxy of ``cuda.bindings.runtime`` counting the calls made through it."""

    def __init__(self, mod, counts):
        object.__setattr__(self, "_mod", mod)
        object.__setattr__(self, "_counts", counts)

    def __getattr__(self, name):
        v = getattr(self._mod, name)
        if callable(v) and name.startswith("cuda") and not isinstance(v, type):
            counts = self._counts

            def call(*a, **kw):
                counts[name] += 1
                return v(*a, **kw)
            return call
        return v


def _triton_wrappers():
    from dwdp_comm.kernels import triton_moe
    out = [(triton_moe, ("gated_activation", "combine"))]
    try:
        from dwdp_comm.kernels import triton_route
        out.append((triton_route, ("route", "count")))
    except ImportError:  # before the fused route existed
        pass
    return out


# ---- torch stand-ins of the Triton kernels (CPU emulation of the CUDA path) ------------------------
def _emu_gated(probes, h, out, *, interleaved=False, limit=None, row_weights=None, bias=None, row_experts=None):
    with probes.paused():
        return _emu_gated_math(h, out, interleaved, limit, row_weights, bias, row_experts)


def _emu_gated_math(h, out, interleaved, limit, row_weights, bias, row_experts):
    rows = h.shape[0] if limit is None else min(int(limit.reshape(-1)[0]), h.shape[0])
    inter = out.shape[1]
    hh = h[:rows].float()
    if bias is not None:
        hh = hh + bias[row_experts[:rows].long()].float()
    g, u = (hh[:, 0::2], hh[:, 1::2]) if interleaved else (hh[:, :inter], hh[:, inter:])
    a = torch.nn.functional.silu(g) * u
    if row_weights is not None:
        a = a * row_weights[:rows].float().unsqueeze(1)
    out[:rows] = a.to(out.dtype)
    return out


def _emu_combine(probes, base, src, out, weights=None, **kw):
    with probes.paused():
        return _emu_combine_math(base, src, out, weights, **kw)


def _emu_combine_math(base, src, out, weights=None, **kw):
    stride = kw.get("row_stride") or 1
    flat = base.reshape(-1)
    t, hidden = out.shape
    offs = src.long() * stride
    idx = offs.clamp(min=0).unsqueeze(-1) + torch.arange(hidden)
    rows = flat[idx.reshape(-1)].view(t, -1, hidden).float() * (offs >= 0).unsqueeze(-1)
    if weights is not None:
        rows = rows * weights.float().unsqueeze(-1)
    out.copy_(rows.sum(1))
    return out


def _emu_count(probes, ids, num_experts):
    """The two-pass route's first pass: its buffer is allocated (as on CUDA), its values not computed."""
    from dwdp_comm.kernels import triton_route as tr
    blocks = -(-ids.numel() // (tr.CHUNK * tr.PER_BLOCK))
    return torch.zeros(blocks, tr.padded_experts(num_experts), dtype=torch.int32)


def _emu_route(probes, x, top_k_index, top_k_weights, num_experts, out_stride=None, passes=None):
    """The wrapper's own allocations and torch ops are counted (as on CUDA), the kernels' work is not."""
    from dwdp_comm.kernels import triton_route as tr
    from dwdp_comm.moe import lean
    t, k = top_k_index.shape
    got = tr.Route(torch.empty(t * k, x.shape[1], dtype=x.dtype), torch.empty(0, dtype=torch.int32),
                   torch.empty(t, k, dtype=torch.int64), torch.empty(t * k, dtype=top_k_weights.dtype))
    if not (tr.one_pass(t * k, num_experts) if passes is None else passes == 1):
        torch.cumsum(tr.count(top_k_index, num_experts), 0, dtype=torch.int32)  # count: wrapped, counted
    with probes.paused():
        ref = lean.route_torch(x, top_k_index, top_k_weights, num_experts)[0]
    return tr.Route(ref.rows, ref.offsets, ref.src, ref.row_weights) if got else got


def _emu_reason_moe(t):
    return None if t.dtype in (torch.bfloat16, torch.float16, torch.float32) else f"dtype {t.dtype}"


def _emu_reason_route(x, num_rows, num_experts, max_rows=None):
    from dwdp_comm.kernels import triton_route as r
    ok = (r.fits(num_rows, num_experts) if max_rows is None else num_rows <= max_rows) and x.stride(-1) == 1
    return _emu_reason_moe(x) if ok else "size"


_EMULATED = {"gated_activation": _emu_gated, "combine": _emu_combine, "route": _emu_route, "count": _emu_count}
_EMULATED_REASONS = {"triton_moe": _emu_reason_moe, "triton_route": _emu_reason_route}


# ---- measuring ----------------------------------------------------------------------------------------
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def stubbed_gemms(on: bool):
    """Grouped GEMMs replaced by an allocation of their result (CPU: their compute is not host cost)."""
    if not on:
        yield
        return
    import torch.nn.functional as F
    saved = [(torch, "_grouped_mm", torch._grouped_mm)]
    if hasattr(F, "grouped_mm"):
        saved.append((F, "grouped_mm", F.grouped_mm))

    def stub(a, b, offs=None, **kw):
        return torch.empty(a.shape[0], b.shape[-1], dtype=a.dtype, device=a.device)
    for mod, name, _ in saved:
        setattr(mod, name, stub)
    try:
        yield
    finally:
        for mod, name, real in saved:
            setattr(mod, name, real)


def measure(fn, probes: Probes, device, calls: int, stub_gemm: bool = False, before_timing=None) -> dict:
    """Counts of one call (after two warm-up calls), then the median host time of ``calls`` calls
    (with ``stub_gemm``, timed with the grouped GEMMs stubbed; they are counted real)."""
    for _ in range(2):
        fn()
    _sync(device)
    probes.reset()
    counter = OpCounter()
    probes.counter = counter
    with counter:
        fn()
    probes.counter = None
    probes.last_counts = counter.counts
    res = classify(counter.counts["*"])
    res.update(triton=sum(probes.triton.values()), triton_by=dict(probes.triton),
               capture_checks=probes.capture_checks, rt_calls=sum(probes.rt_calls.values()),
               rt_by=dict(probes.rt_calls))
    times, cpu = [], []
    with stubbed_gemms(stub_gemm):
        for _ in range(3):
            fn()
        if before_timing is not None:
            before_timing()
        _timed_calls(fn, probes, device, calls, times, cpu)
    _sync(device)
    times.sort()
    res.update(host_us=statistics.median(times) * 1e6, host_us_p10=times[len(times) // 10] * 1e6,
               cpu_us=statistics.median(cpu) * 1e6)
    return res


def _timed_calls(fn, probes, device, calls, times, cpu) -> None:
    for _ in range(calls):
        _sync(device)
        probes.stub_s = probes.stub_cpu_s = 0.0
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        c1, t1 = time.thread_time(), time.perf_counter()
        times.append(t1 - t0 - probes.stub_s)
        cpu.append(c1 - c0 - probes.stub_cpu_s)


def part_experts(args, device, probes, rows) -> None:
    from transformers.integrations import moe as hfmoe

    from perf.bench_sizes import experts_module, ours_fn, routing
    for family in args.families.split(","):
        m, k, rdt = experts_module(family, device, smoke=True)
        E, H = int(m.num_experts), int(getattr(m, "hidden_dim", None) or m.hidden_size)
        ours = ours_fn(m)
        for t in [int(v) for v in args.tokens.split(",")]:
            x = torch.randn(t, H, device=device, dtype=torch.bfloat16)
            idx, w = routing(t, E, k, rdt, device, t)
            for variant, fn in (("hf", lambda: hfmoe.grouped_mm_experts_forward(m, x, idx, w)),
                                ("ours", lambda: ours(x, idx, w))):
                with torch.no_grad():
                    r = measure(fn, probes, device, args.calls, stub_gemm=args.stub_gemm)
                r.update(part="experts", family=family, tokens=t, variant=variant)
                rows.append(r)
                log(f"experts {family:11s} T={t:5d} {variant:4s} ops={r['ops']:3d} (launch {r['launch']:3d}, "
                    f"view {r['view']:2d}, alloc {r['alloc']:2d}) triton={r['triton']} "
                    f"capture_checks={r['capture_checks']} host={r['host_us']:8.1f} us "
                    f"(p10 {r['host_us_p10']:.1f}, cpu {r['cpu_us']:.1f})")


def small_qwen3(layers: int, device):
    """A small Qwen3-MoE model whose expert blocks are whole 2 MiB pages (32 experts of 128 KiB / 64 KiB):
    on one rank every name is served in composite mode on VMM pages, as the real-size model is."""
    import transformers
    cfg = transformers.Qwen3MoeConfig(hidden_size=256, moe_intermediate_size=128, num_experts=32, num_experts_per_tok=8,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=64, intermediate_size=512, vocab_size=1024, max_position_embeddings=1024,
                                      decoder_sparse_step=1, mlp_only_layers=[])
    cfg._experts_implementation = "grouped_mm"
    cfg._attn_implementation = "sdpa"
    from perf.bench_sizes import random_bf16  # its buffers computed, not uninitialised memory
    return random_bf16(transformers.Qwen3MoeForCausalLM, cfg, device).eval()


def part_model(args, device, probes, rows) -> None:
    from dwdp_comm.bench.split_weights import single_rank_group
    from dwdp_comm.integrations import transformers as hfint
    hf = small_qwen3(args.layers, device)
    ours = copy.deepcopy(hf)
    backend = "cuda_ipc" if device.type == "cuda" else "sim"
    with single_rank_group(backend) as group, torch.no_grad(), hfint.convert(ours, group, depth=2) as dm:
        scopes = _ScopeTimers(probes)
        real_forward = hfint.experts_forward
        hfint.experts_forward = scopes.wrap("experts", real_forward)
        modes = sorted({dm.store.slot_mode(s.layer, n) for s in dm.sites for n in s.names})
        log(f"model: {len(dm.sites)} experts layers on {backend}, one rank; slot modes {modes}")
        runners = [(s.module, s.module.dwdp_run) for s in dm.sites]
        for mod, run in runners:
            mod.dwdp_run = scopes.wrap("layer", run)
        try:
            for t in [int(v) for v in args.model_tokens.split(",")]:
                ids = torch.randint(0, hf.config.vocab_size, (1, t), device=device)
                for variant, model in (("hf", hf), ("ours", ours)):
                    r = measure(lambda: model(ids), probes, device, args.calls_model, stub_gemm=args.stub_gemm,
                                before_timing=scopes.reset)
                    per = scopes.per_layer(len(dm.sites))
                    r.update(part="model", tokens=t, variant=variant, layers=len(dm.sites), slot_modes=modes, **per)
                    rows.append(r)
                    line = (f"model   T={t:5d} {variant:4s} forward: ops={r['ops']:4d} triton={r['triton']:2d} "
                            f"rt_calls={r['rt_calls']:3d} host={r['host_us']:8.1f} us "
                            f"(p10 {r['host_us_p10']:.1f}, cpu {r['cpu_us']:.1f})")
                    if variant == "ours":
                        line += (f" | per layer: experts ops={per['experts_ops']:.0f} {per['experts_us']:.1f} us, "
                                 f"pipeline ops={per['pipeline_ops']:.0f} rt_calls={per['pipeline_rt_calls']:.0f} "
                                 f"{per['pipeline_us']:.1f} us")
                    log(line)
        finally:
            hfint.experts_forward = real_forward
            for mod, run in runners:
                mod.dwdp_run = run


class _ScopeTimers:
    """Host time and runtime calls inside the layer runner and inside its experts call."""

    def __init__(self, probes: Probes):
        self.probes = probes
        self.reset()

    def reset(self) -> None:
        self.time = collections.Counter()
        self.calls = collections.Counter()
        self.rt = collections.Counter()

    def wrap(self, name, fn):
        def run(*a, **kw):
            c = self.probes.counter
            rt0, stub0 = sum(self.probes.rt_calls.values()), self.probes.stub_s
            t0 = time.perf_counter()
            try:
                with (c.scope(name) if c is not None else contextlib.nullcontext()):
                    return fn(*a, **kw)
            finally:
                self.time[name] += time.perf_counter() - t0 - (self.probes.stub_s - stub0)
                self.calls[name] += 1
                self.rt[name] += sum(self.probes.rt_calls.values()) - rt0
        return run

    def per_layer(self, layers: int) -> dict:
        """Per layer call: host time and runtime calls (all calls), ops (the counted forward)."""
        n = max(self.calls["layer"], 1)
        lay_us, exp_us = self.time["layer"] / n * 1e6, self.time["experts"] / n * 1e6
        counts = self.probes.last_counts
        pipe = classify(counts.get("layer", collections.Counter()))
        exp = classify(counts.get("experts", collections.Counter()))
        return {"layer_us": lay_us, "experts_us": exp_us, "pipeline_us": lay_us - exp_us,
                "experts_ops": exp["ops"] / layers, "pipeline_ops": pipe["ops"] / layers,
                "pipeline_by_op": pipe["by_op"], "pipeline_rt_calls": (self.rt["layer"] - self.rt["experts"]) / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="experts,model")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--tokens", default="16,128")
    ap.add_argument("--model-tokens", default="16,128")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--calls-model", type=int, default=30)
    ap.add_argument("--no-emulate", action="store_true", help="CPU: measure the plain CPU path (no Triton)")
    ap.add_argument("--real-gemm", action="store_true", help="CPU: time the grouped GEMMs' CPU compute too")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    emulate = device.type != "cuda" and not args.no_emulate
    args.stub_gemm = device.type != "cuda" and not args.real_gemm
    torch.manual_seed(0)
    if device.type != "cuda":
        torch.set_num_threads(1)  # host cost of one thread: thread CPU time is then the call's cost
    info = record.env_info(device)
    log(f"# host_cost {info['date']} device={device} emulate_cuda_path={emulate} stub_gemm={args.stub_gemm} "
        f"torch={info['torch']} "
        f"commit={info['git']['commit'][:12]} dirty={info['git']['dirty']}")
    probes = Probes(emulate, device)
    rows: list[dict] = []
    with probes.installed():
        if "experts" in args.parts.split(","):
            part_experts(args, device, probes, rows)
        if "model" in args.parts.split(","):
            part_model(args, device, probes, rows)
    result = dict(env=info, args=vars(args), emulate_cuda_path=emulate, method=__doc__.split("\n\n")[1], results=rows)
    path = record.write_json(record.result_path(args.json, "host_cost.json"), result)
    if path:
        log(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
