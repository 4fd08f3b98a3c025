"""Device memory figures for result files: what torch's allocator holds, what the device has in use.

The memory scripts (``perf/hf_memory.py``, ``perf/quant_memory.py``) report both: the symmetric heap
and prefetch slots are VMM allocations outside torch's allocator, seen only in the device's figure.
"""

from __future__ import annotations

__all__ = ["torch_allocated", "device_used"]


def torch_allocated(device) -> int | None:
    """Bytes torch's caching allocator has handed out on ``device`` after the device finishes its
    queued work (blocking: synchronizes ``device``); None on CPU (not measured there)."""
    import torch
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def device_used(device) -> int | None:
    """Bytes in use on ``device`` by every allocator and process (``cudaMemGetInfo``: total - free);
    None on CPU. Ranks sharing one GPU see the same figure."""
    import torch
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return total - free
