"""Rank functions of tests/cpu/test_graphs_cpu.py: the prefetcher and the pipeline under (fake) CUDA
graph capture, with real sim heaps of several ranks as the copy sources.

Each rank installs its own :class:`~tests.helpers.fake_cuda.FakeGPU` and swaps its group's backend for
:class:`FakeCudaOverSim`: the committed sim heaps (every peer's mapped) are the sources, slots are
host memory, the copy engine is the real ``CopyExecutor`` on the fake runtime. Every tensor is in
gather mode (no composites), so a slot holds a layer's whole ``[num_experts, ...]`` tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dwdp_comm as dc
from dwdp_comm.moe import DwdpPipeline
from dwdp_comm import engine_options
from dwdp_comm.backends.cuda import copies, driver, executor, memory, streams, sync_flags, time_division
from dwdp_comm.interop.streams import resolve_stream
from tests.helpers import fake_cuda

SPECS = {"w13": ((10, 7), torch.float32), "w2": ((3, 5), torch.bfloat16)}  # not page multiples: gather mode


class _HostSlot(memory.DeviceBuffer):
    """A slot in host memory: the executor sees a DeviceBuffer, ``tensor()`` gives CPU views."""

    def __init__(self, nbytes: int):
        self.data = np.zeros(max(nbytes, 1), dtype=np.uint8)
        super().__init__(fake_cuda.HostAlloc(self.data), nbytes)

    def tensor(self, offset: int = 0, nbytes: int | None = None) -> torch.Tensor:
        nbytes = self.nbytes - offset if nbytes is None else nbytes
        return torch.from_numpy(self.data[offset:offset + nbytes])


class FakeCudaOverSim:
    """The backend interface the prefetcher uses, on the fake runtime, over a committed sim heap.
    ``current`` is the fake's "current torch stream" (what stream=None means)."""

    name, map_granularity, private_composites = "fake_cuda", None, False

    def __init__(self, sim, fake):
        self.sim, self.fake, self.device, self.alloc_alignment = sim, fake, sim.device, sim.alloc_alignment
        self.comm = sim.comm
        self.current = streams.CudaStream()
        self.slots = []  # the prefetcher's slots, in allocation (= slot index) order
        streams.resolve_stream = lambda s=None: self.current.handle if s is None else resolve_stream(s)

    def copy_engine(self, heap, **options):
        self._views = [np.frombuffer(m.mm, dtype=np.uint8) for m in heap.peers]  # keep the addresses alive
        opts = engine_options.parse_engine_options(options, self.name)
        sync = opts.pop("sync")
        where = dict(device=0, rank=self.comm.rank, group_size=self.comm.size,
                     src_ptrs=[int(v.ctypes.data) for v in self._views], src_nbytes=heap.nbytes)
        if sync == "none":
            return executor.CopyExecutor(**where, **opts)
        # local flag words: enough to build the engine (no job is submitted)
        G = self.comm.size
        self._words = np.zeros(sync_flags.SyncFlags.num_words(sync, G, opts["streams"]), dtype=np.uint64)
        flags = sync_flags.SyncFlags(mode=sync, rank=self.comm.rank, group_size=G, num_lanes=opts["streams"],
                                     distribute=opts["distribute"], bits=64, local_ptr=int(self._words.ctypes.data),
                                     peer_ptrs=[int(self._words.ctypes.data)] * G)
        return time_division.TimeDivisionExecutor(flags=flags, **where, **opts)

    def alloc_buffer(self, nbytes, boundaries=()):
        self.slots.append(_HostSlot(nbytes))
        return self.slots[-1]

    def capture_id(self, *, stream=None):
        return streams.stream_capture_id(streams.resolve_stream(stream))

    def record_event(self, *, stream=None):
        s = streams.resolve_stream(stream)
        return streams.CudaEvent().record(s, streams.stream_capture_id(s))

    def synchronize(self):
        self.fake.progress()

    def close(self):
        self.sim.close()


def _truth(seed, layer, name, expert):
    shape, dtype = SPECS[name]
    g = torch.Generator().manual_seed(seed * 1000 + layer * 10 + expert + (7 if name == "w2" else 0))
    return torch.randn(shape, generator=g).to(dtype)


def _setup(group, seed, num_experts, layers):
    fake = fake_cuda.FakeGPU()
    driver.bindings.rt = driver.bindings.dr = fake  # a rank process of its own: nothing to restore
    copies.DriverCopyCalls.instance = fake_cuda.FakeDriverCalls(fake)
    lay = dc.ExpertLayout(num_experts, group.size, group.rank)
    st = dc.WeightStore(group, lay)
    for l in layers:
        for name in SPECS:
            st.register(l, name, torch.stack([_truth(seed, l, name, e) for e in lay.local_experts]))
    st.commit()
    group.impl = FakeCudaOverSim(group.impl, fake)
    return fake, st


def _write_local(st, seed, layers):
    """Overwrite this rank's experts in its heap (peers read the new bytes from now on)."""
    lay = st.layout
    for l in layers:
        for name in SPECS:
            e = st.placement(l, name)
            new = torch.stack([_truth(seed, l, name, x) for x in lay.local_experts])
            raw = new.contiguous().view(torch.uint8).reshape(-1)
            st.heap.local.tensor(e.heap_offset, raw.numel()).copy_(raw)


def _check_slot(pf, h, seed, num_experts):
    """The slot of handle ``h`` holds every expert of its layer (bytes equal to the truth)."""
    for name in SPECS:
        got = h.weights(name) if not h.released else None
        want = torch.stack([_truth(seed, h.layer, name, e) for e in range(num_experts)])
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (h.layer, name)


def captured_pipeline(group, seed):
    """Eager forward, then a captured one replayed with changing sources, then eager again."""
    E, layers, depth = 5, [0, 2, 4], 2
    fake, st = _setup(group, seed, E, layers)
    be = group.impl
    C = be.current.handle
    pf = dc.Prefetcher(st, depth=depth, chunk_nbytes=96, engine_options={"streams": 2})
    pipe = DwdpPipeline(pf, layers)

    def forward(check_seed):
        pipe.begin()
        for l in layers:
            h = pipe.acquire(l)
            if check_seed is not None:
                fake.progress()
                _check_slot(pf, h, check_seed, E)
            pipe.release(h)

    forward(seed)  # eager: prefetches of the next forward are in flight afterwards
    out = {"eager_batch_calls": sum(1 for e in fake.log if e[0] == "batch")}
    # A capture must not start on a pipeline holding eager prefetches.
    cid = fake.begin_graph(C)
    with pytest.raises(dc.GraphCaptureError, match="prepare_capture"):
        pipe.begin()
    fake.end_graph(C)
    pipe.prepare_capture()
    fake.log.clear()
    cid = fake.begin_graph(C)
    pipe.begin()
    assert pipe.capturing
    handles = []
    for l in layers:
        h = pipe.acquire(l)
        assert h.capture == cid
        with pytest.raises(dc.GraphCaptureError):
            h.synchronize()
        handles.append(h)
        pipe.release(h)
    assert not pipe.capturing, "the captured forward did not close itself"
    graph = fake.end_graph(C)  # raises if a copy stream was not joined back
    out["captured_batch_calls"] = sum(1 for e in fake.log if e[0] in ("batch", "batch-refused"))
    out["captured_copies"] = len(graph.ops)
    on_c = {e[1] for e in fake.log if e[0] == "record" and e[2] == C}
    out["forks"] = len({e[1] for e in fake.log if e[0] == "wait" and e[1] != C and e[2] in on_c})
    # Replays with new source bytes: the last depth layers' slots hold their (new) experts.
    for k in range(3):
        group.barrier()
        _write_local(st, seed + k + 1, layers)
        group.barrier()
        graph.replay()
        for h in handles[-depth:]:
            for name in SPECS:
                want = torch.stack([_truth(seed + k + 1, h.layer, name, e) for e in range(E)]).view(torch.uint8)
                got = be.slots[h.slot].tensor(st.placement(h.layer, name).slot_offset, want.numel())
                assert torch.equal(got, want.reshape(-1)), (k, h.layer, name)
        group.barrier()
    # Eager again after the capture: the slots' captured fences are replaced by the current stream.
    forward(seed + 3)
    forward(seed + 3)
    # An eager prefetch waited inside a capture, and a captured one waited outside, both raise.
    pipe.prepare_capture()
    early = pf.prefetch(layers[0])
    cid = fake.begin_graph(C)
    with pytest.raises(dc.GraphCaptureError, match="issued before the capture"):
        early.wait()
    inside = pf.prefetch(layers[1])  # the other slot: free, its fence retired
    inside.wait()
    with pytest.raises(dc.GraphCaptureError, match="issued outside this capture"):
        pf.prefetch(layers[2])  # the slot of 'early', held by a prefetch from before the capture
    inside.release()
    fake.end_graph(C)
    early.release()
    pf.prepare_capture()
    cid = fake.begin_graph(C)
    h = pf.prefetch(layers[1])
    with pytest.raises(driver.CudaError, match="not joined back"):  # never waited: the capture fails, as CUDA's
        fake.end_graph(C)
    with pytest.raises(dc.GraphCaptureError, match="recorded in a capture"):
        h.wait()
    h.release()  # outside its capture: allowed (an abandoned capture), records nothing
    pf.close()
    # Time division under capture: refused at prefetch(), naming the option, before anything is queued.
    pfs = dc.Prefetcher(st, depth=2, engine_options={"sync": "slot", "api": "memcpy"})  # collective engine
    cid = fake.begin_graph(C)
    fake.log.clear()
    with pytest.raises(dc.GraphCaptureError, match=r"sync='slot'.*not supported under CUDA graph capture"):
        pfs.prefetch(layers[0])
    out["sync_refused_cleanly"] = not any(e[0] == "copy" for e in fake.log)
    fake.end_graph(C)
    pfs.close()  # collective: every rank submitted the same (zero) jobs
    out["ok"] = True
    st.close()
    group.impl = be.sim
    return out
