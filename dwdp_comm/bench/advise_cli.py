"""The ``dwdp-bench advise`` subcommand: its arguments and its run (see :mod:`dwdp_comm.bench.advise`).

Exit status: 0 done, 2 bad arguments (raised as ``InvalidArgumentError`` and reported by
``dwdp-bench``'s main), 3 when ``--plot`` is asked and matplotlib is missing (table and JSON are
still written).
"""

from __future__ import annotations

import argparse
import sys

from ..errors import bad_arg
from . import advise as A
from . import record
from .fabric import PRESETS
from .units import parse_size

__all__ = ["add_parser", "run", "EXIT_NO_MATPLOTLIB"]

EXIT_NO_MATPLOTLIB = 3


def _csv(kind, what):
    def parse(text):
        try:
            return [kind(t) for t in str(text).split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}: got {text!r}, expected a comma list of {kind.__name__}")
    return parse


def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``advise`` to the ``dwdp-bench`` subparsers ``sub``."""
    a = sub.add_parser("advise", help="predict whether DWDP beats DEP for a model, group and load",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description=A.__doc__.split("\n\n")[0])
    a.add_argument("-m", "--model", default="deepseek-v3",
                   help=f"preset ({', '.join(sorted(A.PRESETS))}) or a HF config.json path")
    a.add_argument("--hidden", type=int, help="explicit shape: hidden size (with --intermediate, --experts, --top-k)")
    a.add_argument("--intermediate", type=int, help="explicit shape: routed expert width")
    a.add_argument("--experts", type=int, help="explicit shape: routed experts")
    a.add_argument("--top-k", type=int, help="explicit shape: experts per token")
    a.add_argument("--layers", type=int, default=None, help="explicit shape: MoE layers (memory)")
    a.add_argument("-g", "--group-size", type=int, default=4)
    a.add_argument("--weights", default="bf16", choices=["bf16", "fp8"])
    a.add_argument("-t", "--tokens", type=int, default=8192, help="mean tokens per rank per iteration")
    a.add_argument("--cv", type=float, default=0.2, help="coefficient of variation of the per-rank tokens")
    a.add_argument("--cvs", type=_csv(float, "--cvs"), default=None, help="CVs of the sweep (default 0 and --cv)")
    a.add_argument("--token-list", type=_csv(int, "--token-list"), default=None,
                   help="tokens of each rank (overrides --tokens/--cv for the asked point)")
    a.add_argument("--seq-len", type=int, default=8192, help="prompt length (0: one prompt per rank)")
    a.add_argument("--sweep", type=_csv(int, "--sweep"), default=None, help="tokens per rank of the curve")
    a.add_argument("--link-gbps", type=float, default=None, help="pair copy GB/s (default: measured or calibrated)")
    a.add_argument("--fabric", default="auto", metavar="auto|PRESET|FILE",
                   help="auto: the preset of the GPU this process sees (h200 without one, nvl72 above 8 GPUs; "
                        f"said when borrowed); a preset ({', '.join(PRESETS)}); or a fabric file measured by "
                        "dwdp-bench calibrate --write FILE")
    a.add_argument("--measure", default="auto", choices=["auto", "yes", "no", "cpu"],
                   help="measure compute on the local GPU (auto: when CUDA is available)")
    a.add_argument("--tflops", type=float, default=A.H200_EFFECTIVE_TFLOPS, help="modelled compute rate")
    a.add_argument("--interference", type=float, default=None, help="DWDP compute slowdown under a prefetch")
    a.add_argument("--a2a-efficiency", type=float, default=0.75, help="DEP all-to-all rate / pair rate")
    a.add_argument("-s", "--schedules", type=_csv(str, "--schedules"), default=["round_robin", "parallel", "batch"])
    a.add_argument("-c", "--chunks", default="8M,0", help="chunk candidates (0: one copy per source)")
    a.add_argument("--depths", type=_csv(int, "--depths"), default=[2, 3])
    a.add_argument("--routing", metavar="FILE", default=None,
                   help="routing histogram, per layer per expert routed-row counts: JSON as the telemetry records it "
                        "(or a whole telemetry file), plain JSON {layer: [counts]}, or CSV (layer,expert,count rows, "
                        "or one row per layer); adds the third answer, replicating only the hottest experts")
    a.add_argument("--hot-experts", type=_csv(int, "--hot-experts"), default=None,
                   help="with --routing: hot-set sizes to try (default: 1, 2, 4, ... up to half the experts)")
    a.add_argument("--json", metavar="FILE", help="write the result document")
    a.add_argument("--plot", metavar="FILE.png", help="speedup against tokens per rank, one line per CV (matplotlib)")
    a.set_defaults(func=run)
    return a


def _model(args):
    explicit = dict(hidden=args.hidden, moe_intermediate=args.intermediate, num_experts=args.experts,
                    top_k=args.top_k)
    given = {k: v for k, v in explicit.items() if v is not None}
    if not given:
        return args.model
    if len(given) != len(explicit):
        raise bad_arg("--hidden/--intermediate/--experts/--top-k", given, "all four for an explicit shape")
    return {"name": "explicit", **given, "num_layers": args.layers or 1}


def run(args) -> int:
    """Run ``advise`` from parsed arguments; print the table, write JSON and the plot."""
    chunks = [parse_size(c, "-c/--chunks") for c in str(args.chunks).split(",") if c.strip()]
    res = A.advise(_model(args), args.group_size, weights=args.weights, mean_tokens=args.tokens, cv=args.cv,
                   cvs=args.cvs, tokens=args.token_list, seq_len=args.seq_len or None, link_GBps=args.link_gbps,
                   fabric=args.fabric, measure=args.measure, tflops=args.tflops, interference=args.interference,
                   schedules=args.schedules, chunks=chunks, depths=args.depths, sweep=args.sweep,
                   a2a_efficiency=args.a2a_efficiency, routing=args.routing, hot_experts=args.hot_experts)
    res.update(command=["dwdp-bench", *sys.argv[1:]], date=record.utc_date(), commit=record.commit(short=True),
               machine=record.machine_lines())
    print(A.format_table(res))
    if args.json:
        from .report import to_json
        to_json(res, args.json)
        print(f"# wrote {args.json}")
    if args.plot:
        try:
            print("# " + A.plot_speedup(res, args.plot))
        except ImportError:
            print(f"dwdp-bench advise: error: --plot {args.plot}: matplotlib is not installed "
                  "(pip install matplotlib); table and JSON were written", file=sys.stderr)
            return EXIT_NO_MATPLOTLIB
    return 0
