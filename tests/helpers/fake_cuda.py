"""A fake CUDA runtime on host memory for testing the GPU layer on CPUs (``tests/cpu/test_interop_cpu.py``,
``tests/cpu/test_graphs_cpu.py``).

:class:`FakeGPU` stands in for ``cuda.bindings.runtime`` and ``driver`` (the calls the copy executor
makes), :class:`FakeDriverCalls` for the ctypes driver entry points, :class:`HostAlloc` for device
memory; :func:`install` puts them in place with a pytest ``monkeypatch``.

Stream capture (what ``torch.cuda.graph`` does) is modelled: :meth:`FakeGPU.begin_graph` starts a
capture sequence on a stream; a stream that waits on an event recorded in the capture joins it; work
enqueued on capturing streams is recorded, not run; :meth:`FakeGPU.end_graph` fails like
``cudaStreamEndCapture`` (``cudaErrorStreamCaptureUnjoined``) unless every joined stream's work was
joined back into the origin stream, and returns a :class:`FakeGraph` whose ``replay()`` runs the
recorded copies. The rules CUDA enforces are enforced: a capturing stream waiting on an event from
outside its capture (``cudaErrorStreamCaptureIsolation``), any use of an event last recorded in an
ended capture (``cudaErrorCapturedEvent``), a batch copy under capture
(``cudaErrorStreamCaptureUnsupported``: the call has no graph-node form).
"""

from dwdp_comm.backends.cuda import copies, driver, memory

__all__ = ["FakeGPU", "FakeDriverCalls", "FakeGraph", "HostAlloc", "install"]

# cudaError_t values the fake returns
UNSUPPORTED, INVALIDATED, UNJOINED, ISOLATION, CAPTURED_EVENT = 900, 901, 904, 905, 907


class FakeGraph:
    """A finished capture: the copies it recorded, in enqueue order (a valid topological order)."""

    def __init__(self, fake, ops):
        self.fake, self.ops = fake, [op for op in ops if op[0] == "copy"]
        self.replays = 0

    def replay(self):
        """Run every recorded copy now (as if launched on an idle stream and completed)."""
        import ctypes
        with self.fake.lock:
            for op in self.ops:
                ctypes.memmove(op[1], op[2], op[3])
                self.fake.done.append(("copy", "graph", op[1], op[2], op[3]))
        self.replays += 1


class _Capture:
    """One capture sequence: recorded ops, per-stream op counts, and what each stream is known to
    have joined (``frontier[s][t]`` = ops of ``t`` that ``s`` is ordered after)."""

    def __init__(self, cid, origin):
        self.id, self.origin, self.ops, self.ended = cid, origin, [], False
        self.count = {origin: 0}
        self.frontier = {origin: {}}


class FakeGPU:
    """Just enough of cuda.bindings.runtime (plus the ctypes driver calls) for CopyExecutor, on host
    memory, with real stream semantics: every stream is a FIFO of operations that run in order; an
    event wait or a flag wait (cuStreamBatchMemOp, cyclic >=) holds its stream until satisfied;
    ``progress()`` runs whatever can run. Several fake ranks (executors) share one fake GPU, so
    flag writes of one rank release waits of another. Thread-safe (ranks may run in threads).

    ``log`` is host (enqueue) order: ("wait", stream, event), ("record", event, stream), ("copy",
    stream, n), ("batch", stream, count), ("memop", stream, op, addr, value). ``done`` is execution
    order: ("copy", stream, dst, src, n), ("write", stream, addr, value, bits), ("wait", stream, addr,
    value, bits).
    """

    class cudaError_t:
        cudaSuccess, cudaErrorNotReady = 0, 600

    class cudaMemcpyKind:
        cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice = 2, 3

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeGlobal, cudaStreamCaptureModeThreadLocal, cudaStreamCaptureModeRelaxed = 0, 1, 2

    cudaStreamNonBlocking, cudaEventDisableTiming, cudaEventDefault = 1, 2, 0

    def __init__(self, hang_timeout=10.0):
        import threading
        self.lock = threading.RLock()
        self.log, self.done, self._next, self._mem = [], [], 1000, {}
        self.streams, self.events = {}, {}  # handle -> deque / [recorded, completed]
        self.seq, self.in_capture, self.event_capture = {}, {}, {}  # id -> _Capture; stream -> id; event -> (id, frontier)
        self.hang_timeout = hang_timeout
        self.event_time = {}  # event -> host perf_counter when its last record ran (timing events)

    def _handle(self):
        self._next += 1
        return self._next

    # -- the engine of the fake --------------------------------------------------------------------------
    # -- stream capture (torch.cuda.graph) ---------------------------------------------------------------
    def begin_graph(self, stream):
        """Start capturing ``stream`` (cudaStreamBeginCapture, global mode); return the capture id."""
        with self.lock:
            s = int(stream)
            assert s not in self.in_capture, "stream already capturing"
            cid = self._handle()
            self.seq[cid] = _Capture(cid, s)
            self.in_capture[s] = cid
            return cid

    def end_graph(self, stream):
        """End the capture begun on ``stream``: every stream that joined must have been joined back."""
        with self.lock:
            s = int(stream)
            cap = self.seq[self.in_capture[s]]
            assert cap.origin == s, "end_graph on a stream that did not begin the capture"
            seen = cap.frontier[s]
            unjoined = [t for t, n in cap.count.items() if t != s and seen.get(t, 0) < n]
            for t in cap.count:
                self.in_capture.pop(t, None)
            cap.ended = True
            if unjoined:
                raise driver.CudaError("cudaStreamEndCapture", UNJOINED, f"streams {unjoined} were not joined back")
            return FakeGraph(self, cap.ops)

    def _capture_of_stream(self, s):
        cid = self.in_capture.get(int(s))
        return self.seq[cid] if cid is not None else None

    def enqueue(self, stream, op):
        import collections
        with self.lock:
            s = int(stream)
            cap = self._capture_of_stream(s)
            if cap is not None:
                cap.ops.append(op)
                cap.count[s] += 1
                return
            self.streams.setdefault(s, collections.deque()).append(op)
            self.progress()

    @staticmethod
    def _read(addr, bits):
        import ctypes
        return (ctypes.c_uint64 if bits == 64 else ctypes.c_uint32).from_address(addr).value

    @staticmethod
    def _ge(cur, value, bits):  # CU_STREAM_WAIT_VALUE_GEQ: (intN_t)(*addr - value) >= 0
        return ((cur - value) & ((1 << bits) - 1)) < (1 << (bits - 1))

    def _ready(self, op):
        if op[0] == "waitev":
            return self.events[op[1]][1] >= op[2]
        if op[0] == "wait":
            return self._ge(self._read(op[1], op[3]), op[2], op[3])
        return True

    def _run(self, s, op):
        import ctypes
        kind = op[0]
        if kind == "copy":
            ctypes.memmove(op[1], op[2], op[3])
            self.done.append(("copy", s, op[1], op[2], op[3]))
        elif kind == "record":
            import time
            self.events[op[1]][1] = max(self.events[op[1]][1], op[2])
            self.event_time[op[1]] = time.perf_counter()
        elif kind == "write":
            (ctypes.c_uint64 if op[3] == 64 else ctypes.c_uint32).from_address(op[1]).value = op[2]
            self.done.append(("write", s, op[1], op[2], op[3]))
        elif kind == "wait":
            self.done.append(("wait", s, op[1], op[2], op[3]))
        elif kind == "memset":
            ctypes.memset(op[1], op[2], op[3])

    def progress(self):
        with self.lock:
            moved = True
            while moved:
                moved = False
                for s, q in list(self.streams.items()):
                    while q and self._ready(q[0]):
                        self._run(s, q.popleft())
                        moved = True

    def pending(self, stream=None):
        with self.lock:
            self.progress()
            if stream is None:
                return sum(len(q) for q in self.streams.values())
            return len(self.streams.get(int(stream), ()))

    # -- runtime API ----------------------------------------------------------------------------------------
    def cudaStreamCreateWithPriority(self, flags, priority):
        import collections
        with self.lock:
            h = self._handle()
            self.streams[h] = collections.deque()
            return 0, h

    def cudaStreamGetCaptureInfo(self, s):
        with self.lock:
            cap = self._capture_of_stream(s)
            if cap is not None:
                return 0, (2 if getattr(cap, "invalid", False) else 1), cap.id, None, None, None, 0
            return 0, 0, 0, None, None, None, 0

    def cudaStreamSynchronize(self, s):
        import time
        if self._capture_of_stream(s) is not None:
            return (UNSUPPORTED,)
        t0 = time.monotonic()
        while self.pending(s):
            if time.monotonic() - t0 > self.hang_timeout:
                raise AssertionError(f"fake stream {int(s)} would hang: {list(self.streams[int(s)])[:3]}")
            time.sleep(1e-3)
        return (0,)

    def cudaStreamQuery(self, s):
        return (600,) if self.pending(s) else (0,)

    def cudaStreamDestroy(self, s):
        with self.lock:
            assert not self.streams.get(int(s)), "destroying a stream with work left"
            self.streams.pop(int(s), None)
        return (0,)

    def cudaEventCreateWithFlags(self, flags):
        with self.lock:
            h = self._handle()
            self.events[h] = [0, 0]
            return 0, h

    def cudaEventDestroy(self, ev):
        return (0,)

    def cudaEventRecord(self, ev, s):
        with self.lock:
            self.log.append(("record", int(ev), int(s)))
            cap = self._capture_of_stream(s)
            if cap is not None:  # a captured record: it orders work inside the capture only
                front = dict(cap.frontier[int(s)])
                front[int(s)] = cap.count[int(s)]
                self.event_capture[int(ev)] = (cap.id, front)
                return (0,)
            self.event_capture.pop(int(ev), None)
            e = self.events[int(ev)]
            e[0] += 1
            self.enqueue(s, ("record", int(ev), e[0]))
        return (0,)

    def cudaStreamWaitEvent(self, s, ev, flags):
        with self.lock:
            s, ev = int(s), int(ev)
            self.log.append(("wait", s, ev))
            mine = self._capture_of_stream(s)
            got = self.event_capture.get(ev)
            if got is not None:
                cap = self.seq[got[0]]
                if cap.ended:
                    return (CAPTURED_EVENT,)
                if mine is None:  # the fork: s joins the capture
                    self.in_capture[s] = cap.id
                    cap.count.setdefault(s, 0)
                    cap.frontier[s] = {}
                    mine = cap
                if mine is not cap:
                    return (ISOLATION,)
                front = cap.frontier[s]
                for t, n in got[1].items():
                    front[t] = max(front.get(t, 0), n)
                return (0,)
            if mine is not None:
                return (ISOLATION,)  # an eager event waited on inside a capture
            seq = self.events[ev][0]
            if seq:
                self.enqueue(s, ("waitev", ev, seq))
        return (0,)

    def cudaEventSynchronize(self, ev):
        import time
        if int(ev) in self.event_capture:
            return (CAPTURED_EVENT,)
        t0 = time.monotonic()
        while True:
            self.progress()
            e = self.events[int(ev)]
            if e[1] >= e[0]:
                return (0,)
            if time.monotonic() - t0 > self.hang_timeout:
                raise AssertionError(f"fake event {int(ev)} would hang")
            time.sleep(1e-3)

    def cudaEventQuery(self, ev):
        if int(ev) in self.event_capture:
            return (CAPTURED_EVENT,)
        self.progress()
        e = self.events[int(ev)]
        return (0,) if e[1] >= e[0] else (600,)

    def cudaEventElapsedTime(self, a, b):
        """Milliseconds between the last runs of two completed records (the host clock of the fake)."""
        for ev in (a, b):
            if self.cudaEventQuery(ev)[0] or int(ev) not in self.event_time:
                return (600, None)
        return 0, (self.event_time[int(b)] - self.event_time[int(a)]) * 1e3

    def cudaDeviceSynchronize(self):
        import time
        t0 = time.monotonic()
        while self.pending():
            if time.monotonic() - t0 > self.hang_timeout:
                raise AssertionError("the fake device would hang")
            time.sleep(1e-3)
        return (0,)

    def cudaMemcpyAsync(self, d, s, n, kind, stream):
        with self.lock:
            self.log.append(("copy", int(stream), n))
            self.enqueue(stream, ("copy", int(d), int(s), int(n)))
        return (0,)

    def cudaMemsetAsync(self, p, value, n, stream):
        self.enqueue(stream, ("memset", int(p), int(value), int(n)))
        return (0,)

    def cudaMalloc(self, n):
        import ctypes
        buf = ctypes.create_string_buffer(n)
        self._mem[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaFree(self, p):
        self._mem.pop(int(p), None)
        return (0,)

    # -- driver (cuda.bindings.driver) ------------------------------------------------------------------
    class CUdevice_attribute:
        CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS = 122

    bits64 = 1

    def cuDeviceGet(self, ordinal):
        return 0, ordinal

    def cuDeviceGetAttribute(self, attr, dev):
        assert attr == 122
        return 0, self.bits64


class FakeDriverCalls:
    """DriverCopyCalls on the fake GPU: the same calls, in the same log."""

    def __init__(self, fake: FakeGPU, memops=True):
        self.fake = fake
        if not memops:
            self.memops = None

    def memcpy(self, d, s, n, stream):
        with self.fake.lock:
            self.fake.log.append(("copy", int(stream), n, int(d)))
            self.fake.enqueue(stream, ("copy", int(d), int(s), int(n)))
        return 0

    def batch(self, dptr, sptr, nptr, count, attrs_ptr, idx_ptr, nattrs, stream):
        import ctypes
        import numpy as np
        assert nattrs == 1 and attrs_ptr == 12345
        if self.fake._capture_of_stream(stream) is not None:
            self.fake.log.append(("batch-refused", int(stream), count))
            return UNSUPPORTED  # cuMemcpyBatchAsync has no graph-node form
        arr = lambda p: np.ctypeslib.as_array(ctypes.cast(p, ctypes.POINTER(ctypes.c_uint64)), (count,))  # noqa: E731
        with self.fake.lock:
            self.fake.log.append(("batch", int(stream), count))
            for d, s, n in zip(arr(dptr).tolist(), arr(sptr).tolist(), arr(nptr).tolist()):
                self.fake.enqueue(stream, ("copy", d, s, n))
        return 0

    def memops(self, stream, count, ptr, flags):
        import ctypes
        import numpy as np
        assert flags == 0 and 0 < count < 256
        ops = np.frombuffer((ctypes.c_char * (48 * count)).from_address(ptr), dtype=copies.MEMOP_DTYPE).copy()
        with self.fake.lock:
            for op in ops:
                code, addr, value = int(op["operation"]), int(op["address"]), int(op["value"])
                self.fake.log.append(("memop", int(stream), code, addr, value))
                assert int(op["flags"]) == 0, "GEQ waits and default (fenced) writes only"
                if code in (copies.OP_WAIT_VALUE_32, copies.OP_WAIT_VALUE_64):
                    bits = 64 if code == copies.OP_WAIT_VALUE_64 else 32
                    self.fake.enqueue(stream, ("wait", addr, value & ((1 << bits) - 1), bits))
                else:
                    assert code in (copies.OP_WRITE_VALUE_32, copies.OP_WRITE_VALUE_64), code
                    bits = 64 if code == copies.OP_WRITE_VALUE_64 else 32
                    self.fake.enqueue(stream, ("write", addr, value & ((1 << bits) - 1), bits))
        return 0

    def batch_attributes(self, overlap_hint):
        return object(), 12345

    def error(self, code, api, context):
        return driver.CudaError(api, code, context)


class HostAlloc(memory.Alloc):
    def __init__(self, data):
        self.data = data
        super().__init__(data.ctypes.data, data.nbytes, 0)

    def release(self):
        pass




def install(monkeypatch, gpu=None):
    """Put a :class:`FakeGPU` in place of cuda.bindings for ``dwdp_comm.backends.cuda`` (and its
    driver calls) until the test ends; return it."""
    gpu = gpu or FakeGPU()
    monkeypatch.setattr(driver.bindings, "rt", gpu)
    monkeypatch.setattr(driver.bindings, "dr", gpu)
    monkeypatch.setattr(copies.DriverCopyCalls, "instance", FakeDriverCalls(gpu))
    return gpu
