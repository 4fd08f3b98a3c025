"""The GPU layer both GPU backends (:mod:`..cuda_ipc`, :mod:`..nvshmem`) share, one concept a module.

* :mod:`.driver` - cuda.bindings loaded on first use, checked calls, :class:`~.driver.CudaError`.
* :mod:`.streams` - streams, events, capture ids.
* :mod:`.memory` - device allocations and buffers.
* :mod:`.vmm` - VMM allocations and composite views.
* :mod:`.fd_passing` - file descriptors between processes (``pidfd_getfd``).
* :mod:`.peers` - the peer-access check, collective error helpers.
* :mod:`.copies` - ctypes copy and stream-memory entry points.
* :mod:`.sync_flags` - the flag words of ``sync`` copy engines.
* :mod:`.time_division` - the time-division executor (``sync``) and its flag program.
* :mod:`.executor` - the copy executor.
* :mod:`.backend` - the probe and the base class of both backends.

Conventions: each rank is one process driving one GPU (``torch.cuda.set_device(local_rank)`` happens
before the backend is created, and the backend uses that device for everything); nothing here imports
cuda.bindings before it is used. Importing this package imports none of its modules.
"""
