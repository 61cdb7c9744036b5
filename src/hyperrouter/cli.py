"""The `hyperrouter` command: train, eval, finetune, compare, analyze, data, bench.

Bad input ends with one line on stderr and a non-zero exit (2); `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from hyperrouter.errors import HyperRouterError

EXIT_USER_ERROR = 2


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


# --------------------------------------------------------------------------- bench


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="speed benchmarks")
    what = bench.add_subparsers(dest="bench_what", required=True, metavar="WHAT")
    layer = what.add_parser(
        "layer",
        help="time the MoE layer vs its equal-compute dense floor and peer implementations",
        description=(
            "Times train mode (forward + backward) and inference mode (forward, no grad) of the "
            "MoE layer for each k, next to a dense FFN of hidden width k * d_hidden (the floor) "
            "and, when transformers is installed, HuggingFace's Mixtral sparse block with the "
            "same weights. Prints a table of medians."
        ),
    )
    layer.add_argument(
        "--quick",
        action="store_true",
        help="2048 tokens, 3 repeats, no forced backends: under a minute on 2 CPU cores",
    )
    layer.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    layer.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    layer.add_argument(
        "--dtype", help="float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on CUDA)"
    )
    layer.add_argument(
        "--top-k",
        type=_int_list,
        default=(1, 2, 4, 8, 16),
        metavar="K,K",
        help="values of k (default 1,2,4,8,16)",
    )
    layer.add_argument("--tokens", type=int, help="tokens per call (default 8192; quick 2048)")
    layer.add_argument("--repeats", type=int, help="timed repeats per case (default 7; quick 3)")
    layer.add_argument(
        "--experts",
        type=_str_list,
        default=("relu", "swiglu"),
        help="expert groups: relu (vs ReLU floor), swiglu (vs SwiGLU floor and "
        "peers); default both",
    )
    layer.add_argument(
        "--modes", type=_str_list, default=("train", "infer"), help="train, infer or both (default)"
    )
    layer.add_argument("--no-peers", action="store_true", help="skip peer implementations")
    layer.set_defaults(handler=_bench_layer)


def _bench_layer(args: argparse.Namespace) -> int:
    from hyperrouter import bench

    for name, values, valid in (
        ("--experts", args.experts, ("relu", "swiglu")),
        ("--modes", args.modes, ("train", "infer")),
    ):
        bad = [v for v in values if v not in valid]
        if bad or not values:
            raise HyperRouterError(f"{name} takes {', '.join(valid)}; got {','.join(values)}")
    if args.device and args.device not in ("cpu", "cuda"):
        raise HyperRouterError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.dtype and args.dtype not in ("float32", "bfloat16", "float16"):
        raise HyperRouterError(f"--dtype must be float32, bfloat16 or float16, got {args.dtype!r}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise HyperRouterError("--device cuda was asked for but CUDA is not available")
    records = bench.run_layer_bench(
        quick=args.quick,
        device=args.device,
        dtype=args.dtype,
        ks=args.top_k,
        tokens=args.tokens,
        repeats=args.repeats,
        experts=args.experts,
        modes=args.modes,
        peers=not args.no_peers,
        progress=sys.stderr.isatty(),
    )
    print(f"# {bench.machine_description()}")
    print(bench.format_table(records))
    if args.json:
        bench.write_json(records, args.json)
        print(f"wrote {len(records)} records to {args.json}")
    return 0


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperrouter",
        description="Sparse Mixture-of-Experts language models with trained, frozen or "
        "hypernetwork-generated routers.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_bench]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except HyperRouterError as err:
        if args.debug:
            raise
        print(f"hyperrouter: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("hyperrouter: interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    sys.exit(main())
