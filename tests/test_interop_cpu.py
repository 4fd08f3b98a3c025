"""CPU-testable parts of the GPU layer: stream resolution, lazy imports, probes and their error
messages, engine options, the peer-access check, fd passing."""

import importlib.util
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import dwdp_comm as dc
import rankfns
from dwdp_comm.backends import _cuda
from dwdp_comm.interop.streams import resolve_stream


# ---- resolve_stream -------------------------------------------------------------------------------
class _Proto:
    def __init__(self, ret):
        self._ret = ret

    def __cuda_stream__(self):
        return self._ret


class _PropProto:  # early cuda.core releases made it a property
    __cuda_stream__ = (0, 77)


def _fake_cupy_stream(ptr):
    cls = type("Stream", (), {"__module__": "cupy.cuda.stream", "ptr": ptr})
    return cls()


def test_resolve_stream_accepts():
    assert resolve_stream(None) == (torch.cuda.current_stream().cuda_stream if torch.cuda.is_available() else 0)
    assert resolve_stream(0) == 0 and resolve_stream(1234) == 1234
    assert resolve_stream(_Proto((0, 99))) == 99
    assert resolve_stream(_PropProto()) == 77
    assert resolve_stream(_fake_cupy_stream(4242)) == 4242


@pytest.mark.skipif(importlib.util.find_spec("cuda.bindings") is None, reason="cuda-python is not installed")
def test_resolve_stream_cuda_bindings_handles():
    from cuda.bindings import driver, runtime
    assert resolve_stream(driver.CUstream(5)) == 5
    assert resolve_stream(runtime.cudaStream_t(6)) == 6


@pytest.mark.parametrize("bad, err", [
    (True, dc.InvalidTypeError), (1.5, dc.InvalidTypeError), ("s", dc.InvalidTypeError), (object(), dc.InvalidTypeError),
    (-1, dc.InvalidArgumentError), (_Proto((1, 5)), dc.InvalidArgumentError), (_Proto(5), dc.InvalidArgumentError),
])
def test_resolve_stream_rejects(bad, err):
    with pytest.raises(err, match="^stream: "):
        resolve_stream(bad)


# ---- imports stay lazy ---------------------------------------------------------------------------------
def test_import_needs_no_gpu_package():
    # torch itself may import cuda.bindings (some builds do): count only what dwdp_comm adds.
    code = ("import sys, torch, numpy; before = set(sys.modules); "
            "import dwdp_comm, dwdp_comm.interop, dwdp_comm.interop.streams, dwdp_comm.interop.torch, "
            "dwdp_comm.interop.cupy, dwdp_comm.backends.cuda_ipc, dwdp_comm.backends.nvshmem, dwdp_comm.backends._cuda; "
            "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('cupy', 'cuda', 'nvshmem')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_cupy_interop_without_cupy(monkeypatch):
    from dwdp_comm.interop import MissingDependencyError
    from dwdp_comm.interop import cupy as dcp
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(MissingDependencyError, match="pip install cupy") as info:
        dcp.as_cupy(torch.zeros(3))
    assert isinstance(info.value, ImportError) and isinstance(info.value, dc.DwdpError)


# ---- probes and backend errors ------------------------------------------------------------------------
def test_probe_names_missing_package(monkeypatch):
    from dwdp_comm import backends
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    reason = backends.probe("cuda_ipc")
    assert "cuda.bindings" in reason and "pip install" in reason
    if importlib.util.find_spec("nvshmem") is None:
        reason = backends.probe("nvshmem")
        assert "nvshmem4py" in reason and "cuda_ipc" in reason and "sim" in reason


@pytest.mark.skipif(dc.testing.gpu_count() > 0, reason="checks the error on machines without GPUs")
@pytest.mark.parametrize("backend", ["cuda_ipc", "nvshmem"])
def test_gpu_backend_unavailable_on_every_rank(backend):
    res = dc.testing.launch(rankfns.init_report, 2, backend, backend=None, timeout=120)
    for status, kind, msg in res:
        assert (status, kind) == ("error", "BackendUnavailableError")
        assert f"backend {backend!r} is unavailable" in msg and "rank 0" in msg and "rank 1" in msg
        assert "sim" in msg


def test_engine_options():
    assert _cuda.parse_engine_options({}, "x") == {"streams": 1, "api": "batch", "distribute": "source",
                                                    "overlap_hint": False}
    with pytest.raises(dc.InvalidArgumentError, match="streamz"):
        _cuda.parse_engine_options({"streamz": 2}, "cuda_ipc")
    with pytest.raises(dc.InvalidArgumentError, match="streams"):
        _cuda.parse_engine_options({"streams": 0}, "cuda_ipc")
    with pytest.raises(dc.InvalidTypeError, match="streams"):
        _cuda.parse_engine_options({"streams": True}, "cuda_ipc")
    with pytest.raises(dc.InvalidArgumentError, match="api"):
        _cuda.parse_engine_options({"api": "fast"}, "cuda_ipc")
    with pytest.raises(dc.InvalidArgumentError, match="distribute"):
        _cuda.parse_engine_options({"distribute": "random"}, "cuda_ipc")


def test_peer_access_problems_name_the_pair():
    infos = [{"host": "h", "device": d, "pci": f"0000:{d:02x}:00.0"} for d in range(3)]
    infos.append({"host": "other", "device": 0, "pci": "0000:00:00.0"})  # another host: not checked
    visible = {i["pci"]: i["device"] for i in infos[:3]}
    no_pair = {(0, 2), (2, 0)}
    probs = _cuda.peer_access_problems(infos, 0, visible, lambda a, b: (a, b) not in no_pair)
    assert probs == ["rank 0 (GPU 0, 0000:00:00.0) cannot access the memory of rank 2 (GPU 2, 0000:02:00.0)"]
    assert _cuda.peer_access_problems(infos, 1, visible, lambda a, b: (a, b) not in no_pair) == []


def test_raise_gathered_lists_every_rank():
    with pytest.raises(dc.PeerAccessError, match=r"(?s)failed on 2 of 3 ranks.*rank 0: a.*rank 2: b.*use sim"):
        _cuda.raise_gathered(["a", None, "b"], "opening", dc.PeerAccessError, "use sim")
    _cuda.raise_gathered([None, None], "opening")


@pytest.mark.skipif(importlib.util.find_spec("cuda.bindings") is None, reason="cuda-python is not installed")
def test_check_names_api_and_error():
    from cuda.bindings import runtime
    assert _cuda.check((runtime.cudaError_t.cudaSuccess, 5), "x") == 5
    assert _cuda.check((runtime.cudaError_t.cudaSuccess,), "x") is None
    with pytest.raises(_cuda.CudaError, match=r"cudaMemcpyAsync failed: cudaErrorInvalidValue \(1\): ctx"):
        _cuda.check((runtime.cudaError_t.cudaErrorInvalidValue,), "cudaMemcpyAsync", "ctx")


def test_pidfd_getfd_duplicates_a_descriptor():
    with tempfile.TemporaryFile() as f:
        f.write(b"dwdp")
        f.flush()
        try:
            fd = _cuda.pidfd_getfd(os.getpid(), f.fileno())
        except OSError as exc:  # old kernel (ENOSYS) or a sandbox that forbids it (EPERM)
            pytest.skip(f"pidfd_getfd unavailable here: {exc}")
        try:
            assert os.pread(fd, 4, 0) == b"dwdp"
        finally:
            os.close(fd)
    with pytest.raises(OSError, match="pidfd_getfd"):
        _cuda.pidfd_getfd(os.getpid(), 987654)


# ---- the executor's logic on a fake CUDA runtime (host memory, memmove copies) --------------------------
class _FakeRuntime:
    """Just enough of cuda.bindings.runtime for CopyExecutor, on host memory, logging every call."""

    class cudaError_t:
        cudaSuccess, cudaErrorNotReady = 0, 600

    class cudaMemcpyKind:
        cudaMemcpyDeviceToDevice = 3

    class cudaMemcpySrcAccessOrder:
        cudaMemcpySrcAccessOrderStream = 1

    class cudaMemcpyFlags:
        cudaMemcpyFlagPreferOverlapWithCompute = 1

    class cudaMemcpyAttributes:
        srcAccessOrder = 0
        flags = 0

    cudaStreamNonBlocking, cudaEventDisableTiming = 1, 2

    def __init__(self):
        self.log, self._next, self._mem = [], 1000, {}

    def _handle(self):
        self._next += 1
        return self._next

    def cudaStreamCreateWithPriority(self, flags, priority):
        return 0, self._handle()

    def cudaStreamSynchronize(self, s):
        return (0,)

    def cudaStreamDestroy(self, s):
        return (0,)

    def cudaEventCreateWithFlags(self, flags):
        return 0, self._handle()

    def cudaEventDestroy(self, ev):
        return (0,)

    def cudaEventRecord(self, ev, s):
        self.log.append(("record", int(ev), int(s)))
        return (0,)

    def cudaStreamWaitEvent(self, s, ev, flags):
        self.log.append(("wait", int(s), int(ev)))
        return (0,)

    def cudaMemcpyAsync(self, d, s, n, kind, stream):
        import ctypes
        ctypes.memmove(d, s, n)
        self.log.append(("copy", int(stream), n))
        return (0,)

    def cudaMemcpyBatchAsync(self, dsts, srcs, sizes, count, attrs, idxs, nattrs, stream):
        assert count == len(dsts) == len(srcs) == len(sizes) and nattrs == len(attrs) == len(idxs) == 1
        assert attrs[0].srcAccessOrder == 1
        import ctypes
        for d, s, n in zip(dsts, srcs, sizes):
            ctypes.memmove(d, s, n)
        self.log.append(("batch", int(stream), count))
        return (0,)

    def cudaMalloc(self, n):
        import ctypes
        buf = ctypes.create_string_buffer(n)
        self._mem[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaFree(self, p):
        self._mem.pop(int(p), None)
        return (0,)


class _FakeDriver:
    """DriverCopyCalls on host memory: the same calls, logged like the fake runtime's."""

    def __init__(self, fake: _FakeRuntime):
        self.fake = fake

    def memcpy(self, d, s, n, stream):
        import ctypes
        ctypes.memmove(d, s, n)
        self.fake.log.append(("copy", int(stream), n))
        return 0

    def batch(self, dptr, sptr, nptr, count, attrs_ptr, idx_ptr, nattrs, stream):
        import ctypes
        import numpy as np
        assert nattrs == 1 and attrs_ptr == 12345
        arr = lambda p: np.ctypeslib.as_array(ctypes.cast(p, ctypes.POINTER(ctypes.c_uint64)), (count,))
        for d, s, n in zip(arr(dptr).tolist(), arr(sptr).tolist(), arr(nptr).tolist()):
            ctypes.memmove(d, s, n)
        self.fake.log.append(("batch", int(stream), count))
        return 0

    def batch_attributes(self, overlap_hint):
        return object(), 12345

    def error(self, code, api, context):
        return _cuda.CudaError(api, code, context)


class _HostAlloc(_cuda._Alloc):
    def __init__(self, data):
        self.data = data
        super().__init__(data.ctypes.data, data.nbytes, 0)

    def _free(self):
        pass


@pytest.mark.parametrize("opts, remote_rank", [
    ({"streams": 2}, None), ({"streams": 1, "api": "memcpy"}, None), ({"streams": 3, "distribute": "slot"}, None),
    ({"streams": 2, "api": "memcpy"}, 2), ({"streams": 2}, 2), ({"api": "memcpy", "streams": 2}, 0)])
def test_executor_logic_on_fake_runtime(monkeypatch, opts, remote_rank):
    import numpy as np
    from dwdp_comm.planner import CopyRange, make_plan
    fake = _FakeRuntime()
    monkeypatch.setattr(_cuda, "_rt", fake)
    monkeypatch.setattr(_cuda, "_dr", object())
    monkeypatch.setattr(_cuda.DriverCopyCalls, "_instance", _FakeDriver(fake))
    G, rank, n = 3, 1, 1 << 16
    rng = np.random.default_rng(0)
    heaps = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(G)]
    dst_data = np.zeros(n, dtype=np.uint8)
    dst = _cuda.DeviceBuffer(_HostAlloc(dst_data))
    ptrs = [int(h.ctypes.data) for h in heaps]
    gets = []

    def remote_get(d, sym_src, nbytes, pe, stream):  # an NVSHMEM get: symmetric address -> PE's copy
        import ctypes
        gets.append((pe, nbytes))
        ctypes.memmove(d, ptrs[pe] + (sym_src - ptrs[rank]), nbytes)

    src_ptrs = [None if r == remote_rank else p for r, p in enumerate(ptrs)]
    eng = _cuda.CopyExecutor(device=0, rank=rank, group_size=G, src_ptrs=src_ptrs, src_nbytes=n,
                             remote_get=remote_get if remote_rank is not None else None,
                             sym_ptr=ptrs[rank] if remote_rank is not None else None,
                             **_cuda.parse_engine_options(opts, "test"))
    assert eng.api == opts.get("api", "batch")  # the batch probe passed on the fake
    src_base, dst_base = 4096, 512
    ranges = [CopyRange(0, 0, 0, 5000), CopyRange(2, 100, 6000, 7000), CopyRange(1, 300, 20000, 3000),
              CopyRange(0, 9000, 30000, 1234)]
    plan = make_plan(ranges, rank=rank, group_size=G, chunk_nbytes=1024)
    after = _cuda.CudaEvent()
    fake.log.clear()
    done = eng.submit(plan, src_base=src_base, dst=dst, dst_base=dst_base, after=[after])
    for r in ranges:
        got = dst_data[dst_base + r.dst_offset:dst_base + r.dst_offset + r.nbytes]
        want = heaps[r.src_rank][src_base + r.src_offset:src_base + r.src_offset + r.nbytes]
        assert np.array_equal(got, want), r
    # Every copy stream waited for the 'after' event before its first copy; the done event is last.
    streams_used = []
    for e in fake.log:
        if e[0] in ("copy", "batch") and e[1] not in streams_used:
            streams_used.append(e[1])
    for s in streams_used:
        first = next(i for i, e in enumerate(fake.log) if e[0] in ("copy", "batch") and e[1] == s)
        assert ("wait", s, after.handle) in fake.log[:first]
    assert fake.log[-1] == ("record", done.handle, eng.streams[0]) or fake.log[-1][0] == "record"
    assert len(streams_used) <= eng.num_streams
    if remote_rank is not None:
        assert gets and {pe for pe, _ in gets} == {remote_rank}
    bad = make_plan([CopyRange(0, n - 100, 0, 4096)], rank=rank, group_size=G)
    with pytest.raises(dc.InvalidArgumentError, match="inside the heap"):
        eng.submit(bad, src_base=0, dst=dst, dst_base=0)
    eng.close()
    with pytest.raises(dc.ClosedError):
        eng.submit(plan, src_base=0, dst=dst, dst_base=0)
