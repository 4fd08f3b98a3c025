"""Quick start: 4 ranks on this machine shard 16 experts and prefetch the ones they lack.

Runs anywhere (no GPU needed): ``dwdp_comm.testing.launch`` spawns one process per rank, sets up
torch.distributed (gloo) and the DWDP group on the ``sim`` backend (CPU processes over shared
memory), and runs ``rank_main(group)`` on each. Every expert's weights are filled with its global
id, so after the prefetch each rank can check that it holds every expert, in global order.
"""
import torch

import dwdp_comm as dc

NUM_EXPERTS, HIDDEN, FFN = 16, 64, 32


def rank_main(group):
    layout = dc.ExpertLayout(num_experts=NUM_EXPERTS, group_size=group.size, rank=group.rank)
    # This rank's shard: its own experts only, [num_local_experts, 2 * FFN, HIDDEN].
    ids = torch.tensor(list(layout.local_experts), dtype=torch.float32)
    w13_local = ids.view(-1, 1, 1).expand(-1, 2 * FFN, HIDDEN).contiguous()
    store = dc.WeightStore(group, layout)
    store.register(layer=0, name="w13", shard=w13_local)
    store.commit()                                      # collective: the shards go into the heap
    pf = dc.Prefetcher(store, depth=2, schedule="round_robin", chunk_nbytes=64 << 10)
    h = pf.prefetch(layer=0)                            # returns at once; copies run in the background
    h.wait()                                            # on sim the host waits for the copies
    w13 = h.weights("w13")                              # [NUM_EXPERTS, 2 * FFN, HIDDEN], global order
    want = torch.arange(NUM_EXPERTS, dtype=torch.float32).view(-1, 1, 1).expand_as(w13)
    ok = bool(torch.equal(w13, want))
    h.release()
    pf.close()
    store.close()
    return {"rank": group.rank, "backend": group.backend, "local": len(layout.local_experts),
            "shape": tuple(w13.shape), "ok": ok}


if __name__ == "__main__":
    results = dc.testing.launch(rank_main, 4, backend="sim")
    for r in results:
        print(f"rank {r['rank']} ({r['backend']}): owns {r['local']} experts, sees {list(r['shape'])}: "
              + ("every expert correct" if r["ok"] else "WRONG WEIGHTS"))
    if not all(r["ok"] for r in results):
        raise SystemExit("quickstart FAILED: some prefetched weights were wrong")
    print("quickstart passed: each rank prefetched the experts of its peers and checked them")
