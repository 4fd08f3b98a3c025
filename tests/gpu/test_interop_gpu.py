"""Single-GPU checks of the shared CUDA layer: streams, events, zero-copy views, the executor, VMM
composites. Runs in the pytest process (skipped without a GPU)."""

import importlib.util

import pytest
import torch

import dwdp_comm as dc
from dwdp_comm import engine_options
from dwdp_comm.backends.cuda import copies, driver, executor, memory, streams, sync_flags, vmm
from dwdp_comm.planner import CopyRange, make_plan

pytestmark = pytest.mark.gpu

MiB = 1 << 20


@pytest.fixture(scope="module")
def cuda_device():
    """This process's GPU, current for cuda.bindings (its primary context made)."""
    index = torch.cuda.current_device()
    driver.set_device(index)
    return index


def test_resolve_stream_torch_and_cuda_core(cuda_device):
    from dwdp_comm.interop.streams import resolve_stream
    s = torch.cuda.Stream()
    assert resolve_stream(s) == s.cuda_stream
    with torch.cuda.stream(s):
        assert resolve_stream(None) == s.cuda_stream
    assert resolve_stream(None) == torch.cuda.current_stream().cuda_stream
    try:
        from cuda.core import Device
    except ImportError:
        from cuda.core.experimental import Device
    d = Device(torch.cuda.current_device())
    d.set_current()
    cs = d.create_stream()
    assert resolve_stream(cs) == int(cs.handle)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="CuPy is not installed")
def test_cupy_views_and_streams(cuda_device):
    import cupy as cp
    from dwdp_comm.interop import cupy as dcp
    from dwdp_comm.interop.streams import resolve_stream
    from dwdp_comm.interop.torch import as_torch
    s = cp.cuda.Stream(non_blocking=True)
    assert resolve_stream(s) == s.ptr
    t = torch.arange(12, dtype=torch.float32, device="cuda").view(3, 4)
    c = dcp.as_cupy(t)
    assert c.data.ptr == t.data_ptr() and c.shape == (3, 4)
    c[1, 2] = 100.0
    assert t[1, 2].item() == 100.0  # same memory
    back = as_torch(c)
    assert back.data_ptr() == t.data_ptr()
    b = torch.zeros(4, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(dc.InvalidArgumentError, match="bits=True"):
        dcp.as_cupy(b)
    assert dcp.as_cupy(b, bits=True).dtype == cp.uint16
    ev = streams.CudaEvent().record(resolve_stream(s))
    dcp.stream_wait(ev, stream=cp.cuda.Stream(non_blocking=True))
    ev.synchronize()
    assert ev.is_done


def test_tensor_from_ptr_is_zero_copy(cuda_device):
    from dwdp_comm.interop.torch import tensor_from_ptr
    base = torch.arange(256, dtype=torch.uint8, device="cuda")
    v = tensor_from_ptr(base.data_ptr() + 16, 32, torch.cuda.current_device(), owner=base)
    assert v.data_ptr() == base.data_ptr() + 16 and v.shape == (32,)
    v[0] = 7
    assert base[16].item() == 7
    assert tensor_from_ptr(0, 0, torch.cuda.current_device()).numel() == 0


def test_events(cuda_device):
    s = torch.cuda.Stream()
    ev = streams.CudaEvent()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)
    ev.record(s.cuda_stream)
    other = torch.cuda.Stream()
    ev.wait(stream=other)  # non-blocking for the host
    ev.synchronize()
    assert ev.is_done


@pytest.mark.parametrize("opts", [{}, {"api": "batch"}, {"streams": 3, "distribute": "slot"},
                                  {"streams": 2, "api": "batch", "distribute": "source", "overlap_hint": True},
                                  {"api": "memcpy", "streams": 2, "distribute": "slot"}])
def test_executor_local_plan(cuda_device, opts):
    """The executor on one rank (group of 1): local copies, scattered ranges, several chunk sizes."""
    dev = torch.cuda.current_device()
    n = 8 * MiB
    src = memory.DeviceBuffer(memory.MallocAlloc(n, dev))
    dst = memory.DeviceBuffer(memory.MallocAlloc(n, dev))
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
    src.tensor().copy_(data)
    dst.tensor().zero_()
    torch.cuda.synchronize()
    ranges = [CopyRange(0, 0, 4 * MiB, 3 * MiB), CopyRange(0, 3 * MiB + 17, 2 * MiB + 17, MiB), CopyRange(0, 6 * MiB, MiB, 2048)]
    plan = make_plan(ranges, rank=0, group_size=1, chunk_nbytes=512 * 1024)
    eng = executor.CopyExecutor(device=dev, rank=0, group_size=1, src_ptrs=[src.ptr], src_nbytes=n,
                                  **{k: v for k, v in engine_options.parse_engine_options(opts, "test").items()
                                     if k != "sync"})
    for job in range(2):
        dst.tensor().zero_()
        gate = streams.CudaEvent().record(torch.cuda.current_stream().cuda_stream)
        done = eng.submit(plan, src_base=0, dst=dst, dst_base=0, after=[gate])
        done.wait(stream=torch.cuda.current_stream())
        out = dst.tensor()
        for r in ranges:
            assert torch.equal(out[r.dst_offset:r.dst_offset + r.nbytes], data[r.src_offset:r.src_offset + r.nbytes])
    bad = make_plan([CopyRange(0, 0, n - 10, 100)], rank=0, group_size=1)
    with pytest.raises(dc.InvalidArgumentError, match="inside the heap"):
        eng.submit(bad, src_base=0, dst=dst, dst_base=0)
    eng.close()
    print(opts, "api used:", eng.api, eng.api_reason)


def test_stream_memops_on_device(cuda_device):
    """The ctypes cuStreamBatchMemOp path on device memory: a one-rank flag handshake, and a
    wait-value (cyclic >=) that holds a stream until another stream writes the word."""
    import time

    import numpy as np
    dev = torch.cuda.current_device()
    bits = sync_flags.stream_memop_bits(dev)
    mem = memory.MallocAlloc(4096, dev)
    f = sync_flags.SyncFlags(mode="slot", rank=0, group_size=1, num_lanes=1, distribute="source", bits=bits,
                                 local_ptr=mem.ptr, peer_ptrs=[mem.ptr])
    f.zero()
    assert f.handshake(timeout_s=10) is None
    a, b = streams.CudaStream(), streams.CudaStream()
    word = f.word(0, 0, 0)
    wait = np.zeros(1, dtype=copies.MEMOP_DTYPE)
    wait["operation"], wait["address"], wait["value"] = f.wait_op, mem.ptr + 8 * word, f.value(3, 7)
    copies.issue_memops(a.handle, wait, "test wait")
    ev = streams.CudaEvent().record(a.handle)
    time.sleep(0.05)
    assert not ev.is_done, "the wait-value did not hold the stream"
    f.write_local([word], f.value(3, 7), b)
    b.synchronize()
    ev.synchronize()
    assert int(f.read_local(word, 1, b)[0]) == f.value(3, 7)
    a.close()
    b.close()
    mem.free()
    print(f"stream memory operations: {bits}-bit")


def test_vmm_composite_maps_pages_at_offsets(cuda_device):
    """Segments of two VMM ranges (at non-zero offsets of the ranges) mapped back to back: one
    zero-copy view; a piece that does not end on a segment boundary is refused."""
    dev = torch.cuda.current_device()
    g = vmm.vmm_granularity(dev)
    a = memory.DeviceBuffer(vmm.VmmAlloc.create(4 * g, dev, g, exportable=True, boundaries=[g, 3 * g]))
    b = memory.DeviceBuffer(vmm.VmmAlloc.create(3 * g, dev, g, exportable=False, boundaries=[g]))
    with pytest.raises(dc.InvalidArgumentError, match="segment boundaries"):
        vmm.CudaComposite([(a, 0, 2 * g)], dev, g)
    a.tensor().copy_(torch.randint(0, 256, (4 * g,), dtype=torch.uint8, device="cuda"))
    b.tensor().copy_(torch.randint(0, 256, (3 * g,), dtype=torch.uint8, device="cuda"))
    comp = vmm.CudaComposite([(b, g, 2 * g), (a, 0, g), (a, 3 * g, g)], dev, g)
    t = comp.tensor()
    want = torch.cat([b.tensor(g, 2 * g), a.tensor(0, g), a.tensor(3 * g, g)])
    assert torch.equal(t, want)
    t[g * 2] = (int(t[g * 2].item()) + 1) % 256  # writes land in a's page 0
    assert a.tensor(0, 1).item() == t[g * 2].item()
    with pytest.raises(dc.InvalidArgumentError):
        vmm.CudaComposite([(a, 1, g)], dev, g)
    comp.close()
    a.close()
    b.close()
    assert t.sum().item() >= 0  # the view keeps the mapping (and pages) alive after close()


@pytest.mark.parametrize("world_size, num_experts, want", [(2, 4, "composite"), (3, 9, "gather")])
def test_expert_blocks_on_page_boundaries_compose_on_cuda_ipc(world_size, num_experts, want, seed):
    """1 MiB experts on the H200's 2 MiB VMM pages (as Qwen3-30B-A3B's 3 MiB down_proj): 2 experts a
    rank make 2 MiB blocks, so the slot view is a zero-copy composite; 3 a rank (3 MiB blocks) end
    off a page: gather. Every byte of the view checked (ranks may share one GPU)."""
    from tests.helpers import prefetch_rankfns, stores
    if dc.testing.gpu_count() < 1:
        pytest.skip("needs a CUDA GPU")
    specs = {"half": ((1024, 512), torch.bfloat16), "w2": stores.SPECS["w2"]}
    res = dc.testing.launch(prefetch_rankfns.slot_views, world_size, num_experts, seed, specs, backend="cuda_ipc",
                            timeout=180)
    assert [r["half"] for r in res] == [want] * world_size and all(r["w2"] == "gather" for r in res)
