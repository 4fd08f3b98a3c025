"""Comm, the object exchange under every collective step: agreed_error returns one answer on every
rank (what a benchmark records for a copy engine some rank could not create)."""
import dwdp_comm as dc


def agreed_errors(group):
    """Three steps: nobody fails; ranks 1 and 2 fail alike; ranks 0 and 2 fail differently."""
    r, comm = group.rank, group.comm
    return [comm.agreed_error(None, "none"),
            comm.agreed_error("no memory" if r in (1, 2) else None, "alike"),
            comm.agreed_error({0: "a", 2: "b"}.get(r), "different")]


def test_agreed_error_is_the_same_on_every_rank():
    res = dc.testing.launch(agreed_errors, 3)
    assert res == [[None, "no memory", "rank 0: a; rank 2: b"]] * 3
