"""Copy-plane benchmarks and the contention model (``dwdp-bench``).

Modules:

* :mod:`~dwdp_comm.bench.patterns`: traffic patterns (pair, swap, ring, all-to-one, one-from-all,
  full) and schedules (planner policy + copy-engine options), with a timeline of each.
* :mod:`~dwdp_comm.bench.fabric`: what the model runs on (port caps, per-copy costs) and its presets.
* :mod:`~dwdp_comm.bench.model`: a fluid model of copy engines, port caps, per-copy costs, streams,
  time division and skew.
* :mod:`~dwdp_comm.bench.calibrate`: the model against ``calibration_h200x4.json``, predictions.
* :mod:`~dwdp_comm.bench.contention`: the runner (real backends through ``Backend``; the model).
* :mod:`~dwdp_comm.bench.report`, :mod:`~dwdp_comm.bench.plot`: text, JSON and the figure.
* :mod:`~dwdp_comm.bench.advise`: will DWDP beat DEP for a model, group and load.
* :mod:`~dwdp_comm.bench.units`: byte sizes as the flags take them.
* :mod:`~dwdp_comm.bench.cli`: ``dwdp-bench contention | calibrate | predict | advise``.

Nothing here imports a GPU package; matplotlib is imported only to plot.
"""
