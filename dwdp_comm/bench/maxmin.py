"""Max-min fair rates by progressive filling: how concurrent transfers share the ports of a fabric."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["maxmin_rates"]


def maxmin_rates(ports: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Max-min fair rates by progressive filling.

    Parameters
    ----------
    ports : numpy.ndarray
        ``int64 [num_flows, k]``: the ports each flow uses (``-1``: none).
    caps : numpy.ndarray
        ``float64 [num_ports]``: capacity of each port.

    Returns
    -------
    numpy.ndarray
        ``float64 [num_flows]`` rates; every flow is limited by some saturated port.
    """
    nf = ports.shape[0]
    rate = np.zeros(nf)
    if nf == 0:
        return rate
    valid = ports >= 0
    if not valid.any(axis=1).all():
        raise ValueError("a flow uses no port")
    fi = np.nonzero(valid)[0]  # one entry per (flow, port) incidence
    pi = ports[valid]
    cap = np.asarray(caps, dtype=np.float64)
    npt = cap.shape[0]
    rem = cap.copy()
    tol = 1e-9 * np.maximum(cap, 1.0)
    live = np.ones(nf, dtype=bool)
    live_e = np.ones(fi.shape[0], dtype=bool)
    share = np.empty(npt)
    while True:
        cnt = np.bincount(pi[live_e], minlength=npt)
        busy = cnt > 0
        share.fill(np.inf)
        np.divide(rem, cnt, out=share, where=busy)
        inc = float(share.min())
        if not math.isfinite(inc):
            raise ValueError("a flow uses no finite port")
        rate[live] += inc
        rem -= inc * cnt
        sat = busy & (rem <= tol)
        if not sat.any():  # rounding: freeze at the tightest port
            sat = busy & (share <= inc * (1 + 1e-12))
        live[fi[live_e & sat[pi]]] = False
        if not live.any():
            return rate
        live_e &= live[fi]
