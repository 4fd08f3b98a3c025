"""Rank functions of init and the launcher (tests/cpu/test_init.py, test_interop_cpu.py): backend
choice and its log, sub-groups, how launch reports ranks that raise, die or hang, the arrival board."""

from __future__ import annotations

import time

import dwdp_comm as dc
from tests.helpers.prefetch_rankfns import pipeline
from tests.helpers.stores import error_fields


# ---- init ----------------------------------------------------------------------------------------
def init_report(backend: str):
    """Call dwdp_comm.init (torch.distributed is up) and report what happened."""
    try:
        g = dc.init(backend)
    except dc.DwdpError as exc:
        return ("error", type(exc).__name__, str(exc))
    out = ("ok", g.backend, g.backend_reason, str(g.device), g.rank, g.size)
    g.close()
    return out


def init_logged(backend: str):
    """dwdp_comm.init's log records on the 'dwdp_comm' logger (auto says which backend it took)."""
    import logging
    records: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    log = logging.getLogger("dwdp_comm")
    log.setLevel(logging.INFO)
    log.addHandler(_Keep())
    g = dc.init(backend)
    out = (g.backend, records)
    g.close()
    return out


def default_and_sub_group(num_experts: int, seed: int):
    """group=None is the default (world) group; a sub-group gives its own ranks and runs a pipeline."""
    import torch.distributed as dist
    g = dc.init("sim")
    whole = (g.rank, g.size)
    g.close()
    sub = dist.new_group([1, 2])  # every rank calls new_group
    facts = checked = None
    if dist.get_rank() in (1, 2):
        g = dc.init("sim", group=sub)
        facts = (g.rank, g.size)
        checked = pipeline(g, num_experts, 3, 2, "round_robin", 3000, seed)["checked"]
        g.close()
    dist.barrier()
    return whole, facts, checked


def store_type_error():
    try:
        dc.init("sim", store="tcp://localhost:1")
    except dc.DwdpError as exc:
        return error_fields(exc)
    return None


def board_report(store_kind: str, stuck_rank: int, stuck_s: float):
    """dwdp_comm.init with an explicit store (``"tcp"``: a TCPStore rank 0 serves) or none
    (``"none"``, and no MASTER_ADDR); rank ``stuck_rank`` is late, the others report their barrier's
    error and whether the board's keys reached the store."""
    import os
    import torch.distributed as dist
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    store, server = None, None
    if store_kind == "tcp":
        port = [None]
        if dist.get_rank() == 0:
            server = dist.TCPStore("127.0.0.1", 0, dist.get_world_size(), is_master=True, wait_for_workers=False)
            port = [server.port]
        dist.broadcast_object_list(port, 0)
        store = server or dist.TCPStore("127.0.0.1", port[0], is_master=False)
    g = dc.init("sim", timeout=2, store=store)
    out = None
    if g.rank == stuck_rank:
        time.sleep(stuck_s)
    else:
        try:
            g.barrier()
        except dc.DwdpError as exc:
            out = error_fields(exc)
        if store is not None:
            out["board_keys"] = store.num_keys()
    dist.barrier()  # rank 0 serves the TCPStore: it must not exit before the others have read it
    g.abort()
    return out


# ---- launch's reports ----------------------------------------------------------------------------
MARK = "module"  # the parent changes it; a forked child would see the change, a spawned one does not


def launch_facts(group):
    import multiprocessing
    import torch.distributed as dist
    return group.rank, group.size, dist.get_backend(), MARK, multiprocessing.current_process().name


def rank_and_size(group):
    return group.rank, group.size


def raise_on_rank(group, bad_rank: int, others: str = "barrier"):
    if group.rank == bad_rank:
        raise ValueError(f"boom on rank {group.rank}")
    if others == "barrier":
        group.barrier()  # the others wait for the bad rank, which never comes
    else:
        time.sleep(3600)  # blocked in something that never notices the bad rank: launch must kill it
    return "unreachable"


def die_on_rank(group, bad_rank: int):
    import os
    if group.rank == bad_rank:
        os._exit(3)
    group.barrier()
    return "unreachable"


def sleep_forever(group):
    time.sleep(3600)


def fail_some(group, first: int, later: int):
    """Rank ``first`` raises at once, rank ``later`` 0.5 s after, the others never finish."""
    if group.rank == first:
        raise ValueError(f"first failure on rank {group.rank}")
    if group.rank == later:
        time.sleep(0.5)
        raise RuntimeError(f"later failure on rank {group.rank}")
    time.sleep(3600)
