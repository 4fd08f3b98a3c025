"""``dwdp-bench``: the copy-plane contention benchmark, its model, and the model's checks.

Usage (nccl-tests style flags)::

    dwdp-bench contention [-g G] [-b 8M] [-e 1G] [-f 2] [--chunk 8M,0] [-s parallel,naive,round_robin]
                          [-p full,ring] [--skew 0|random|X] [-n 10] [-w 3]
                          [--backend auto|cuda_ipc|nvshmem|sim|model] [--engine-option streams=3 ...]
                          [--json FILE] [--plot FILE.png] [--inject-corruption]
    dwdp-bench calibrate      # the model against the 4 x H200 table, every row with its error
    dwdp-bench predict [-g 8] # model predictions for larger groups

``contention`` launches one process per rank itself (``dwdp_comm.launch``), or, under
``torchrun`` (``RANK`` and ``WORLD_SIZE`` set), runs as the rank torchrun made. Rank 0 prints.
Without GPUs, ``--backend auto`` runs the ``sim`` backend (CPU processes) and says so. The exit
status is 1 when any byte was wrong, 2 for bad arguments, 3 when nothing was produced (every row
skipped, or ``--plot`` not written), 0 otherwise. ``-c`` and ``-o`` are not used: nccl-tests
gives them other meanings (check, op); use ``--chunk`` and ``--engine-option``.
``python -m dwdp_comm.bench`` is the same as ``dwdp-bench``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ..errors import InvalidArgumentError, InvalidTypeError, bad_arg
from . import record
from . import report as R
from .contention import BenchConfig, run_model, run_rank
from .patterns import SCHEDULES, canonical_pattern, parse_option, parse_schedule
from .units import parse_size

__all__ = ["main", "build_parser", "EXIT_NOTHING"]

# Exit status when the run produced nothing it was asked for: every row skipped, or --plot not written.
EXIT_NOTHING = 3

# Defaults per backend kind: (min bytes, max bytes, factor, chunks, schedules, iters, warmup)
_DEFAULTS = {
    "gpu": ("64M", "1G", 4, "8M", "parallel,naive,rotated,round_robin,batch", 10, 3),
    "sim": ("64K", "1M", 4, "64K", "naive,rotated,round_robin", 3, 1),
    "model": ("8M", "1G", 2, "8M", "parallel,naive,rotated,round_robin,batch,tdm", 3, 0),
}


def _sizes(lo: int, hi: int, factor: int) -> list[int]:
    if lo <= 0 or hi < lo:
        raise bad_arg("-b/-e", (lo, hi), "0 < minbytes <= maxbytes")
    if factor < 2:
        raise bad_arg("-f/--stepfactor", factor, "an int >= 2")
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= factor
    return out


def _csv(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


_ARBITRATION_HELP = ("how the model lets a source GPU serve the peers that read it at once: fair = they share "
                     "its egress max-min fairly; fifo = it serves one transfer at a time in arrival order (the "
                     "pessimistic bracket)")


class _Renamed(argparse.Action):
    """A short option that was dropped: a clear error naming the long option to use."""

    def __init__(self, option_strings, dest, long_option: str, reason: str, **kw):
        super().__init__(option_strings, dest, **kw)
        self.long_option, self.reason = long_option, reason

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was dropped ({self.reason}); use {self.long_option}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dwdp-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("contention", help="copy-plane contention benchmark",
                       description="Every rank pulls bytes from its peers under a traffic pattern and a copy "
                                   "schedule; prints time, per-rank and aggregate GB/s, % of ideal (n/a on sim) and "
                                   "#wrong per (pattern, schedule, chunk, size). Schedules: "
                                   + ", ".join(SCHEDULES) + ", or policy[+key=value...]. Exit status: 0 ok, "
                                   "1 wrong bytes, 2 bad arguments, 3 nothing produced (every row skipped, or "
                                   "--plot not written).")
    c.add_argument("-g", "--group-size", type=int, default=None,
                   help="ranks (default: the GPUs visible; 4 on sim and model; WORLD_SIZE under torchrun)")
    c.add_argument("-b", "--minbytes", default=None, help="smallest bytes per source (default: 64M GPU, 64K sim, 8M model)")
    c.add_argument("-e", "--maxbytes", default=None, help="largest bytes per source (default: 1G GPU, 1M sim, 1G model)")
    c.add_argument("-f", "--stepfactor", type=int, default=None, help="size multiplier (default: 4; 2 on model)")
    c.add_argument("--chunk", default=None, help="comma list of chunk sizes; 0 = one copy per source "
                                                 "(default: 8M; 64K on sim)")
    c.add_argument("-s", "--schedules", default=None, help="comma list (default: parallel,naive,rotated,round_robin,"
                                                           "batch on GPUs; naive,rotated,round_robin on sim; +tdm on model)")
    c.add_argument("-p", "--patterns", default="full",
                   help="comma list of pair, swap, ring, all-to-one, one-from-all, full (default: full)")
    c.add_argument("--skew", default="0", help="0: ranks start together; 'random' or X > 0: each rank starts at a "
                                               "uniform random time in [0, X x ideal layer time] (random = 1; default: 0)")
    c.add_argument("-n", "--iters", type=int, default=None, help="timed iterations (default: 10 GPU, 3 sim/model)")
    c.add_argument("-w", "--warmup", type=int, default=None, help="warm-up iterations (default: 3 GPU, 1 sim, 0 model)")
    c.add_argument("--backend", default="auto", choices=["auto", "cuda_ipc", "nvshmem", "sim", "model"],
                   help="auto: what dwdp_comm.init(backend='auto') picks (sim without GPUs); model: the fluid "
                        "model of the copy plane, no bytes move (default: auto)")
    c.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="copy-engine option for every schedule (repeatable), e.g. streams=3, api=batch")
    for short, long_, theirs in (("-c", "--chunk", "check"), ("-o", "--engine-option", "op")):
        c.add_argument(short, action=_Renamed, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs="?",
                       help=argparse.SUPPRESS, long_option=long_, reason=f"nccl-tests' {short} means {theirs}")
    c.add_argument("--json", metavar="FILE", help="write every row (and settings) as JSON")
    c.add_argument("--plot", metavar="FILE.png", help="bandwidth per schedule and a per-rank model timeline "
                                                      "(needs matplotlib: pip install 'dwdp-comm[plot]')")
    c.add_argument("--trace", metavar="FILE", help="write a Chrome-trace / Perfetto JSON of every copy job, per rank "
                   "and source (real backends whose copy engine times its copies)")
    c.add_argument("--inject-corruption", action="store_true",
                   help="sim only: flip one byte of the first copy of every job (shows #wrong and the exit status)")
    c.add_argument("--seed", type=int, default=0, help="seed of the byte patterns and the skew draws (default: 0)")
    c.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds for the whole run, spawned ranks only (default: 1800)")
    m = c.add_argument_group("model backend")
    m.add_argument("--fabric", default="auto", choices=["auto", "h200", "nvl72"],
                   help="auto: h200 up to 8 GPUs, nvl72 above (default: auto)")
    m.add_argument("--executor", default="per_stream", choices=["per_stream", "issue_fifo"],
                   help="per_stream: one process per GPU, every copy stream progresses on its own (the DWDP "
                        "deployment); issue_fifo: one host thread issues every copy, each source GPU serves its "
                        "copies in issue order (the calibration harness) (default: per_stream)")
    m.add_argument("--arbitration", default="fair", choices=["fair", "fifo"],
                   help=_ARBITRATION_HELP + " (default: fair)")
    m.add_argument("--issue-order", default="stream", choices=["stream", "slot"],
                   help="issue_fifo only: copies issued stream by stream, or slot by slot (default: stream)")
    c.set_defaults(func=_contention)

    k = sub.add_parser("calibrate", help="the model against the 4 x H200 measurements, every row; or, with "
                                         "--write FILE, this machine's fabric measured for advise --fabric FILE")
    k.add_argument("--write", metavar="FILE", help="measure this machine's GPUs (a pair copy, a swap, chunked and "
                                                   "local copies: a few seconds) and write a fabric file")
    k.add_argument("--base", default="auto", help="with --write: the preset of the fields not measured (auto: "
                                                  "this GPU's, else h200) (default: auto)")
    k.add_argument("-b", "--bytes", default="1G", help="with --write: bytes of each whole copy (default: 1G)")
    k.set_defaults(func=_calibrate)
    p = sub.add_parser("predict", help="model predictions of the full exchange for a group size",
                       description="Predictions of the copy-plane model (dwdp_comm.bench.model), not measurements. "
                                   + _ARBITRATION_HELP + ".")
    p.add_argument("-g", "--group-size", type=int, default=8, help="ranks (default: 8)")
    p.add_argument("-b", "--bytes", default="1G", help="bytes per source (default: 1G)")
    p.add_argument("--fabric", default="auto", choices=["auto", "h200", "nvl72"],
                   help="auto: h200 up to 8 GPUs, nvl72 above (default: auto)")
    p.add_argument("--skew", type=float, default=0.0,
                   help="each rank starts at a uniform random time in [0, X x ideal time] (default: 0)")
    p.add_argument("--trials", type=int, default=3, help="skew draws averaged (default: 3)")
    p.add_argument("--exact", action="store_true",
                   help="also compute the rows only the event simulation can (fifo with several copy streams, "
                        "skewed chunked copies: minutes at -g 72); without it they read n/a above 100K copies")
    p.set_defaults(func=_predict)
    from .advise_cli import add_parser as _add_advise
    _add_advise(sub)  # dwdp-bench advise: will DWDP beat DEP here (dwdp_comm.bench.advise)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dwdp-bench``; returns the exit status."""
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except (InvalidArgumentError, InvalidTypeError) as exc:
        print(f"dwdp-bench: error: {exc}", file=sys.stderr)
        return 2


# ---- contention -----------------------------------------------------------------------------------
def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _gpus() -> int:
    from ..launch import gpu_count
    return gpu_count()


def _kind(backend: str) -> str:
    if backend == "model":
        return "model"
    if backend == "sim" or (backend == "auto" and _gpus() == 0):
        return "sim"
    return "gpu"


def _config(args) -> tuple[BenchConfig, str]:
    kind = _kind(args.backend)
    lo, hi, fac, chunk, scheds, iters, warm = _DEFAULTS[kind]
    if _under_torchrun():
        G = int(os.environ["WORLD_SIZE"])
        if args.group_size not in (None, G):
            raise bad_arg("-g/--group-size", args.group_size, f"WORLD_SIZE={G} under torchrun")
    elif args.group_size is not None:
        G = args.group_size
    else:
        G = _gpus() if kind == "gpu" else 4
    if G < 2:
        raise bad_arg("-g/--group-size", G, "an int >= 2 (a pattern needs a peer)")
    sizes = _sizes(parse_size(args.minbytes or lo, "-b/--minbytes"), parse_size(args.maxbytes or hi, "-e/--maxbytes"),
                   args.stepfactor or fac)
    if any(n % 4 for n in sizes):
        raise bad_arg("sizes", sizes, "multiples of 4 bytes (sources hold 32-bit words)")
    chunks = [parse_size(x, "--chunk") for x in _csv(args.chunk or chunk)]
    if not chunks:
        raise bad_arg("--chunk", args.chunk, "at least one chunk size")
    schedules = _csv(args.schedules or scheds)
    for s in schedules:
        parse_schedule(s)  # raise early, with the list of valid names
    patterns = [canonical_pattern(p) for p in _csv(args.patterns)]
    skew_text = str(args.skew).strip().lower()
    if skew_text == "random":
        skew = 1.0
    else:
        try:
            skew = float(skew_text.removeprefix("random:"))
        except ValueError:
            raise bad_arg("--skew", args.skew, "0, 'random' or a number >= 0") from None
    if not skew >= 0:
        raise bad_arg("--skew", args.skew, "0, 'random' or a number >= 0")
    iters = iters if args.iters is None else args.iters
    warm = warm if args.warmup is None else args.warmup
    if iters < 1 or warm < 0:
        raise bad_arg("-n/-w", (iters, warm), "iters >= 1 and warmup >= 0")
    opts = dict(parse_option(o) for o in args.engine_option)
    if args.inject_corruption and kind != "sim":
        raise bad_arg("--inject-corruption", True, "the sim backend (--backend sim, or auto without GPUs)")
    cfg = BenchConfig(group_size=G, sizes=sizes, chunks=chunks, schedules=schedules, patterns=patterns, skew=skew,
                      iters=iters, warmup=warm, engine_options=opts, seed=args.seed,
                      inject_corruption=args.inject_corruption, backend=args.backend, fabric=args.fabric,
                      executor=args.executor, arbitration=args.arbitration, issue_order=args.issue_order,
                      timeline=bool(args.plot) and args.backend == "model", trace=bool(args.trace))
    if args.trace and kind == "model":
        raise bad_arg("--trace", args.trace, "a real backend (sim or GPU): the model moves no bytes")
    return cfg, kind


def _settings_lines(cfg: BenchConfig, launcher: str, backend: str) -> list[str]:
    sz = cfg.sizes
    lines = [f"group size: {cfg.group_size} ({launcher})",
             f"sizes (bytes per source): {', '.join(R.format_size(n) for n in sz)}; chunks: "
             + ", ".join("whole" if c == 0 else R.format_size(c) for c in cfg.chunks),
             f"patterns: {', '.join(cfg.patterns)}; schedules: {', '.join(cfg.schedules)}",
             ("skew: none (ranks start together)" if cfg.skew == 0 else
              f"skew: each rank starts at a uniform random time in [0, {cfg.skew:g} x ideal time of the case], "
              "per iteration"),
             f"iterations: {cfg.iters} timed after {cfg.warmup} warm-up; engine options: {cfg.engine_options or '{}'}; "
             f"seed {cfg.seed}" + ("; INJECTED CORRUPTION (sim corrupt_copy=0)" if cfg.inject_corruption else ""),
             "time: largest rank time (end - own start) of an iteration, mean over iterations",
             ("ideal, %ideal: n/a on sim (its copy threads share one CPU memory system: the port bound at the "
              "pair rate bounds nothing there; compare GB/s between schedules instead)" if backend == "sim" else
              "ideal: the pattern's port bound at the pair reference rate (full, ring: G x pair); "
              "pair reference = rank 0 <- 1, one copy, alone, same size")]
    return lines


def _schedule_width(cfg: BenchConfig) -> int:
    return max([len(s) for s in cfg.schedules] + [8]) + 1


def _print_preamble(rep: R.Reporter, cfg: BenchConfig, backend: str, backend_line: str, launcher: str,
                    extra=()) -> None:
    rep.comment("dwdp-bench contention: copy-plane contention (dwdp_comm)")
    for line in record.machine_lines():
        rep.comment(line)
    rep.comment(backend_line)
    for line in list(extra) + _settings_lines(cfg, launcher, backend):
        rep.comment(line)
    rep.comment()


def _backend_line(backend: str, reason: str, device: str) -> str:
    line = f"backend: {backend} ({reason}); device {device}"
    if backend == "sim":
        line += (" -- NO GPU: the sim backend (CPU processes over POSIX shared memory, a copy thread per rank); "
                 "times are CPU memcpy times, not GPU copy-engine times")
    return line


class _Printer:
    """Rank 0's row printer: the header once, pair references as comments."""

    def __init__(self, rep: R.Reporter):
        self.rep, self.started = rep, False

    def reference(self, nbytes: int, Bps: float) -> None:
        self.rep.comment(f"pair reference {nbytes} B ({R.format_size(nbytes)}): {Bps / 1e9:.2f} GB/s")

    def row(self, r: dict) -> None:
        if not self.started:
            self.rep.header()
            self.started = True
        self.rep.row(r)


def _rank_main(group, cfg: BenchConfig, launcher: str) -> dict:
    """One rank of the benchmark (module level: spawned ranks unpickle it)."""
    printer = None
    if group.rank == 0:
        rep = R.Reporter(schedule_width=_schedule_width(cfg))
        _print_preamble(rep, cfg, group.backend, _backend_line(group.backend, group.backend_reason, str(group.device)),
                        launcher)
        printer = _Printer(rep)
    res = run_rank(group, cfg, on_row=printer.row if printer else None,
                   on_reference=printer.reference if printer else None)
    return res


def _contention(args) -> int:
    cfg, kind = _config(args)
    argv = sys.argv[1:]
    if kind == "model":
        rep = R.Reporter(schedule_width=_schedule_width(cfg))
        from .contention import model_fabric
        fab = model_fabric(cfg)
        extra = [f"model: fabric {fab.name}: egress {fab.egress_Bps / 1e9:.0f} GB/s, ingress {fab.ingress_Bps / 1e9:.0f}, "
                 f"duplex {(fab.duplex_Bps or 0) / 1e9:.0f}, per copy {1e6 * fab.copy_overhead_s:.1f} us, batch "
                 f"{1e6 * fab.batch_call_overhead_s:.1f} + {1e6 * fab.batch_copy_overhead_s:.1f} us/copy, "
                 f"flag {1e6 * fab.flag_latency_s:.1f} us, "
                 + (f"one-thread harness {1e6 * fab.harness_copy_overhead_s:.1f} us/copy, "
                    if fab.harness_copy_overhead_s is not None else "") +
                 f"{fab.max_streams} hardware queues ({fab.notes})",
                 f"model: executor {cfg.executor}, arbitration {cfg.arbitration}"
                 + (f", issue order {cfg.issue_order}" if cfg.executor == "issue_fifo" else "")
                 + "; no bytes move (#wrong: -); with skew, one simulation per iteration"]
        _print_preamble(rep, cfg, "model", "backend: model (requested: a fluid model of the copy plane, dwdp_comm.bench.model)",
                        "in-process model", extra)
        printer = _Printer(rep)
        res = run_model(cfg, on_row=printer.row, on_reference=printer.reference)
        launcher = "in-process model"
    elif _under_torchrun():
        res, launcher, rank = _torchrun(cfg)
        if rank != 0:  # rank 0 reports; every rank has the same rows
            return 1 if any(r["wrong"] for r in res["rows"]) else 0
    else:
        from ..launch import launch
        launcher = f"{cfg.group_size} processes spawned by dwdp_comm.launch"
        sys.stdout.flush()
        res = launch(_rank_main, cfg.group_size, cfg, launcher, backend=args.backend, timeout=args.timeout)[0]
    return _finish(args, cfg, res, launcher, argv)


def _torchrun(cfg: BenchConfig):
    import torch
    import torch.distributed as dist

    from ..group import init
    launcher = f"torchrun, WORLD_SIZE={os.environ['WORLD_SIZE']}"
    if cfg.backend not in ("sim", "model") and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])) % torch.cuda.device_count())
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo")
    try:
        with init(cfg.backend) as group:
            res = _rank_main(group, cfg, launcher)
            rank = group.rank
    finally:
        if own:
            dist.destroy_process_group()
    return res, launcher, rank


def _finish(args, cfg: BenchConfig, res: dict, launcher: str, argv) -> int:
    rows = res["rows"]
    wrong = sum(r["wrong"] or 0 for r in rows)
    skipped = sum(r["status"] != "ok" for r in rows)
    doc = {"schema": R.SCHEMA, "command": ["dwdp-bench", *argv], "date": record.utc_date(), "commit": record.commit(short=True),
           "machine": record.machine_lines(),
           "launcher": launcher, "backend": res["backend"], "backend_reason": res["backend_reason"],
           "group_size": res["group_size"], "config": cfg.as_dict(),
           "pair_reference_GBps": res["pair_reference"], "rows": rows, "wrong_total": wrong,
           "skipped": skipped, "model": res.get("model")}
    rep = R.Reporter()
    if args.json:
        R.to_json(doc, args.json)
        rep.comment(f"wrote {args.json}")
    plot_missing = None
    if args.plot:
        from .plot import plot
        written, msg = plot(doc, args.plot)
        rep.comment(msg)
        plot_missing = None if written else msg
    if args.trace:
        rep.comment(_write_trace(args.trace, res.get("telemetry") or []))
    checked = "" if res["backend"] == "model" else f"; {wrong} wrong bytes"
    rep.comment(f"{len(rows)} rows, {skipped} skipped{checked}")
    if wrong:
        rep.comment("FAILED: some bytes were wrong")
        return 1
    if rows and skipped == len(rows):
        print(f"dwdp-bench: error: every row ({len(rows)}) was skipped; nothing was measured", file=sys.stderr)
        return EXIT_NOTHING
    if plot_missing:
        print(f"dwdp-bench: error: {plot_missing}", file=sys.stderr)
        return EXIT_NOTHING
    return 0


def _write_trace(path: str, telemetries: list) -> str:
    from ..trace import write_trace
    tels = [t for t in telemetries if t is not None]
    if not tels or not any(t["prefetches"] for t in tels):
        return f"no trace written to {path}: the copy engine does not time its copies"
    write_trace(path, tels, title="dwdp-bench contention")
    return (f"wrote trace {path} ({sum(len(t['prefetches']) for t in tels)} copy jobs, {len(tels)} ranks; "
            "open it at https://ui.perfetto.dev)")


# ---- model checks ---------------------------------------------------------------------------------
def _calibrate(args) -> int:
    from . import calibrate
    if args.write:
        calibrate.write_fabric(args.write, args.base, parse_size(args.bytes, "-b/--bytes"),
                               command=["dwdp-bench", *sys.argv[1:]])
        return 0
    return calibrate.main([])


def _predict(args) -> int:
    from . import model as M
    from .calibrate import MAX_EVENT_COPIES, format_predictions, predict
    G = args.group_size
    fab = args.fabric if args.fabric != "auto" else ("h200" if G <= 8 else "nvl72")
    fabric = M.h200(G) if fab == "h200" else M.nvl72(G)
    n = parse_size(args.bytes, "-b/--bytes")
    rows = predict(fabric, n, skew=args.skew, trials=args.trials,
                   max_event_copies=None if args.exact else MAX_EVENT_COPIES)
    print("# dwdp-bench predict: numbers of the copy-plane MODEL (dwdp_comm.bench.model), not measurements; "
          "`dwdp-bench calibrate` shows how it fits the 4 x H200 measurements")
    print(f"# fabric {fabric.name}: egress {fabric.egress_Bps / 1e9:.0f} GB/s, ingress {fabric.ingress_Bps / 1e9:.0f} "
          f"GB/s per GPU ({fabric.notes})")
    print("# " + _ARBITRATION_HELP)
    print("# % of ideal: model time vs the full exchange's port bound; agg GB/s: all bytes / model time")
    print(format_predictions(rows, f"{fabric.name}, full exchange, {R.format_size(n)} per source, skew {args.skew:g}"))
    for r in rows:
        if r["skipped"]:
            print(f"# n/a: {r['schedule']}, {r['arbitration']}: {r['skipped']}; --exact computes it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
