"""The `hyperrouter` command: train, eval, adaptive, finetune, compare, analyze, scaling, data,
bench.

Bad input ends with one line on stderr and a non-zero exit (2); `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from hyperrouter.errors import HyperRouterError

EXIT_USER_ERROR = 2
EXIT_DISTRIBUTED = 3
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool stopped by a closed pipe


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


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    return values


def _str_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError("expected at least one comma-separated value")
    return values


def check_writable(path: str | os.PathLike, flag: str, *, folder: bool) -> None:
    """Fail before any work is done when `path` cannot be written: the output of `flag` is a
    folder (`folder`) or a file, created with its missing parent folders."""
    p = Path(path)
    if p.exists():
        if folder and not p.is_dir():
            raise HyperRouterError(f"{flag} {path}: is a file, not a folder")
        if not folder and p.is_dir():
            raise HyperRouterError(f"{flag} {path}: is a folder, not a file")
    existing = p if folder else p.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise HyperRouterError(f"{flag} {path}: {existing} is a file, not a folder")
    try:  # an unnamed temporary file: works for root, read-only mounts and /proc alike
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        cause = err.strerror or type(err).__name__
        raise HyperRouterError(f"{flag} {path}: cannot write in {existing} ({cause})") from None


def _os_error_message(err: OSError) -> str:
    """`path: cause` for an operating-system error on a file (e.g. `runs/x: Permission denied`)."""
    cause = err.strerror or str(err)
    if err.filename is None:
        return cause
    paths = str(err.filename) + (f" -> {err.filename2}" if err.filename2 else "")
    return f"{paths}: {cause}"


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
        help="2048 tokens, 3 repeats, no forced backends: about 35 s on 2 idle CPU cores "
        "(60 s with transformers' peers; several times longer on a busy machine)",
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
    layer.add_argument(
        "--router",
        type=_str_list,
        default=("smoe",),
        metavar="NAME,NAME",
        help="registered routers whose MoE layers are timed side by side against the same floor "
        "(default smoe; routers that route by token id get synthetic ids)",
    )
    layer.set_defaults(handler=_bench_layer)

    serve = what.add_parser(
        "serve",
        help="load-test hyperrouter serve: goodput, latency, k and utility per policy and rate",
        description="Starts the server on a free loopback port for each policy and sends "
        "open-loop Poisson (or bursty) traffic at each rate for a bounded time (127.0.0.1 only; "
        "it stops by itself). Writes JSON and a plot (goodput, quality, utility against rate).",
    )
    serve.add_argument("run", metavar="RUN_DIR")
    serve.add_argument(
        "--policies",
        type=_str_list,
        default=("static:1", "rule", "learned"),
        help="static:K, rule, learned (default static:1,rule,learned plus static at every "
        "k of the policy file's profile)",
    )
    serve.add_argument(
        "--rates",
        type=_float_list,
        help="requests/s (default: 0.5, 1, 1.5, 2, 3 x the closed-loop capacity at k = E)",
    )
    serve.add_argument("--duration", type=float, default=10.0, help="seconds per rate (10)")
    serve.add_argument("--pattern", choices=("poisson", "bursty"), default="poisson")
    serve.add_argument("--deadline-ms", type=float, default=1000.0)
    serve.add_argument("--max-batch", type=int, default=8)
    serve.add_argument("--max-wait-ms", type=float, default=5.0)
    serve.add_argument("--max-queue", type=int, default=64)
    serve.add_argument("--threads", type=int, help=SERVING_THREADS_HELP)
    serve.add_argument("--max-tokens", type=int, help="default: the profile's")
    serve.add_argument("--prompt-tokens", type=int, help="default: the profile's")
    serve.add_argument("--policy-file", metavar="PATH", help="default RUN_DIR/serve/policy.json")
    serve.add_argument("--json", metavar="PATH", help="default RUN_DIR/serve/bench.json")
    serve.set_defaults(handler=_bench_serve)

    model = what.add_parser(
        "model",
        help="time a whole model at every k against its multiply-add count and dense twin",
        description=(
            "Times inference (one evaluation segment with memory, no autograd) and training "
            "(forward, backward and an Adam step) of a Transformer-XL MoE model at each k, next "
            "to its dense twin (MoE FFNs replaced by dense FFNs of width k x d_expert), "
            "round-robin after a warm-up, and prints medians with their spread, the analytic "
            "multiply-adds per token by part, and the measured speedup over k = E against the "
            "one the multiply-add count predicts. Time it alone on the machine."
        ),
    )
    model.add_argument("path", nargs="?", metavar="RUN_DIR", help="a trained run (or checkpoint)")
    model.add_argument("--config", metavar="PRESET", help="a preset, freshly initialised")
    model.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    model.add_argument(
        "--vocab-size",
        type=int,
        default=256,
        help="vocabulary of a freshly initialised preset (default 256, bytes)",
    )
    model.add_argument("--top-k", type=_int_list, metavar="K,K", help="default: eval.top_ks")
    model.add_argument("--modes", type=_str_list, default=("infer", "train"))
    model.add_argument("--repeats", type=int, default=5, help="timed calls each (default 5)")
    model.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    model.add_argument("--no-dense", action="store_true", help="skip the dense twins")
    model.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    model.add_argument("--json", metavar="PATH", help="write the records as JSON")
    model.add_argument(
        "--profile", action="store_true", help="also break one inference call down by part"
    )
    model.add_argument(
        "--compile",
        action="store_true",
        help="run the attention blocks under torch.compile (compiled once per model and "
        "shape before the warm-up; eager with a note where this torch cannot compile)",
    )
    model.set_defaults(handler=_bench_model)


def _transformer_xl_only(command: str, config) -> None:
    """Commands built on Transformer-XL's internals (its memory, its softmax module, its layers)
    refuse the other architectures with one line."""
    if config.model.arch != "transformer_xl":
        raise HyperRouterError(
            f"{command} supports model.arch transformer_xl only, not {config.model.arch} "
            f"(train, eval, compare and analyze support every arch)"
        )


def _bench_model(args: argparse.Namespace) -> int:
    import torch

    from hyperrouter import bench, bench_model
    from hyperrouter.train.config import load_config
    from hyperrouter.train.evaluate import load_trained, pick_device

    if (args.path is None) == (args.config is None):
        raise HyperRouterError("bench model takes a RUN_DIR or --config PRESET (one of them)")
    if args.vocab_size < 2:
        raise HyperRouterError(f"--vocab-size must be >= 2, got {args.vocab_size}")
    if args.json:
        check_writable(args.json, "--json", folder=False)
    device = pick_device(args.device or "auto")
    if args.path is not None:
        if args.overrides:
            raise HyperRouterError("--set applies to --config only (a run keeps its own config)")
        run = load_trained(args.path, device=device)
        model, config = run.model, run.config
        _transformer_xl_only("bench model", config)
    else:
        config = load_config(args.config, args.overrides)
        _transformer_xl_only("bench model", config)
        torch.manual_seed(config.train.seed)
        model = config.build_model(args.vocab_size).to(device)
    records = bench_model.run_model_bench(
        model,
        config,
        ks=list(args.top_k) if args.top_k else None,
        modes=tuple(args.modes),
        repeats=args.repeats,
        warmup=args.warmup,
        dense=not args.no_dense,
        progress=sys.stderr.isatty(),
        compile=args.compile,
    )
    compiled = " (attention under torch.compile)" if any(r.compiled for r in records) else ""
    print(f"# {bench.machine_description()}{compiled}")
    print(bench_model.format_table(records))
    if args.profile:
        for k in sorted({r.top_k for r in records if r.model == "moe"}):
            print()
            print(bench_model.profile_model(model, config, k))
    if args.json:
        bench_model.write_json(records, args.json)
        print(f"wrote {len(records)} records to {args.json}")
    return 0


SERVING_THREADS_HELP = (
    "torch threads of the model (default: the cores less one, at least 1; the HTTP server and "
    "a local load generator need a core: on 2 cores, 2 threads served 2.5x fewer requests)"
)


def _serving_app_factory(engine, args: argparse.Namespace):
    """policy -> the FastAPI app of a `Server` on `engine` with the command's serving options."""
    from hyperrouter.serve.app import Server, create_app

    def app_factory(policy):
        return create_app(
            Server(
                engine,
                policy,
                deadline_ms=args.deadline_ms,
                max_batch=args.max_batch,
                max_wait_ms=args.max_wait_ms,
                max_queue=args.max_queue,
            )
        )

    return app_factory


def set_serving_threads(threads: int | None) -> int:
    """torch's threads for serving: `threads`, or the cores less one (module docstring of
    serve.app: the event loop must not fight the model's threads for the cores)."""
    import torch

    if threads is None:
        threads = max(1, (os.cpu_count() or 2) - 1)
    if threads < 1:
        raise HyperRouterError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


def _bench_serve(args: argparse.Namespace) -> int:
    try:
        import hyperrouter.serve.app  # noqa: F401 (the serve extra must be installed)
    except ImportError as err:
        raise HyperRouterError(
            f"bench serve needs the serve extra ({err.name} is missing): "
            f"bash scripts/setup.sh serve"
        ) from None
    from hyperrouter.serve import loadtest
    from hyperrouter.serve.engine import Engine
    from hyperrouter.serve.policies import build_policy, load_policy_file
    from hyperrouter.serve.profile import profile_prompts
    from hyperrouter.train.evaluate import load_trained

    if args.duration <= 0 or args.duration > 600:
        raise HyperRouterError(f"--duration must be in (0, 600] seconds, got {args.duration}")
    set_serving_threads(args.threads)
    from hyperrouter.train.checkpoint import run_folder

    run_dir = run_folder(args.run)
    policy_file = Path(args.policy_file) if args.policy_file else run_dir / "serve" / "policy.json"
    _, profile = load_policy_file(policy_file)
    specs = list(args.policies)
    if not args.policies or tuple(args.policies) == ("static:1", "rule", "learned"):
        specs = [f"static:{k}" for k in profile.ks] + ["rule", "learned"]
    parsed = loadtest.parse_policies(specs)
    json_path = Path(args.json) if args.json else run_dir / "serve" / "bench.json"
    check_writable(json_path, "--json", folder=False)
    run = load_trained(args.run)
    _transformer_xl_only("bench serve", run.config)
    engine = Engine(run, max_tokens_limit=max(512, args.max_tokens or 0))
    policies = {
        label: build_policy(
            kind,
            k=k,
            num_experts=engine.num_experts,
            deadline_ms=args.deadline_ms,
            max_batch=args.max_batch,
            policy_file=policy_file,
        )
        for label, kind, k in parsed
    }
    max_tokens = args.max_tokens or profile.max_tokens
    prompt_tokens = args.prompt_tokens or profile.prompt_tokens
    rates = list(args.rates) if args.rates else None
    prompts = profile_prompts(engine, prompt_tokens)
    app_factory = _serving_app_factory(engine, args)

    if rates is None:  # around what the real server sustains at k = E, closed loop
        server = loadtest.LocalServer(
            app_factory(
                build_policy(
                    "static",
                    k=None,
                    num_experts=engine.num_experts,
                    deadline_ms=args.deadline_ms,
                    max_batch=args.max_batch,
                    policy_file=None,
                )
            )
        )
        try:
            capacity = loadtest.closed_loop_capacity(
                server.url, args.max_batch, min(10.0, args.duration), prompts, max_tokens
            )
        finally:
            server.stop()
        print(f"closed-loop capacity at k = {engine.num_experts}: {capacity:.2f} requests/s")
        rates = [round(capacity * f, 2) for f in (0.5, 1.0, 1.5, 2.0, 3.0)]
    print(f"load test of {run_dir}: rates {rates} requests/s, {args.duration:g} s each")
    records = loadtest.run_load(
        app_factory,
        policies,
        rates=rates,
        duration_s=args.duration,
        deadline_ms=args.deadline_ms,
        pattern=args.pattern,
        prompts=prompts,
        max_tokens=max_tokens,
        quality=profile.quality,
        progress=sys.stderr.isatty(),
    )
    from hyperrouter.bench import machine_description

    print(f"# {machine_description()}")
    print(loadtest.format_records(records))
    meta = {
        "run": str(run_dir),
        "machine": machine_description(),
        "deadline_ms": args.deadline_ms,
        "max_batch": args.max_batch,
        "duration_s": args.duration,
        "pattern": args.pattern,
        "max_tokens": max_tokens,
        "prompt_tokens": prompt_tokens,
    }
    meta["targets"] = loadtest.targets(records, list(profile.ks))
    print(loadtest.format_targets(meta["targets"]))
    png = loadtest.write_outputs(records, meta, json_path)
    print(f"wrote {json_path}" + (f" and {png}" if png else ""))
    return 0


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
    if args.json:
        check_writable(args.json, "--json", folder=False)
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
        routers=args.router,
    )
    print(f"# {bench.machine_description()}")
    print(bench.format_table(records))
    print(bench.LEGEND)
    note = bench.peers_note(records, peers=not args.no_peers)
    if note:
        print(note)
    if args.json:
        bench.write_json(records, args.json)
        print(f"wrote {len(records)} records to {args.json}")
    return 0


# --------------------------------------------------------------------------- train / eval


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain a Transformer-XL language model (quick preset on the built-in corpus)",
        description=(
            "Train a Transformer-XL LM with MoE layers. With no arguments: the `quick` preset on "
            "the built-in tiny-Shakespeare corpus, ending with a table of test BPC per k."
        ),
    )
    p.add_argument(
        "--config",
        metavar="NAME_OR_PATH",
        help="preset name or YAML file (default: quick; see --list-configs)",
    )
    p.add_argument("--data", metavar="PATH", help="corpus file or folder (overrides data.path)")
    p.add_argument(
        "--out",
        metavar="RUN_DIR",
        help="run folder (default runs/<preset>, or runs/<preset>-2 ... if taken)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.steps=500 (repeatable)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out with its own config (config.json). --config, --set and "
        "--data may be repeated to check them: --set/--data alone are compared with the run's "
        "values; --config is resolved as for a new run (with the run's data path unless --data "
        "is given) and compared key by key. Any difference is an error naming the keys.",
    )
    p.add_argument("--list-configs", action="store_true", help="list presets and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_distributed_flags(p)
    p.set_defaults(handler=_train)


def _add_distributed_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group(
        "distributed (under torchrun --nproc_per_node N -m hyperrouter ...; docs/DISTRIBUTED.md)"
    )
    group.add_argument(
        "--expert-parallel",
        type=int,
        default=1,
        metavar="P",
        help="spread every MoE layer's experts over groups of P ranks (P divides the world size "
        "and the number of experts; default 1: data parallelism only)",
    )
    group.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="collective timeout: a rank that dies or hangs stops the job after at most this "
        "long (default 300)",
    )


def _start_distributed(args: argparse.Namespace, device: str) -> None:
    """Join torchrun's process group (a no-op without torchrun)."""
    from hyperrouter import distributed

    distributed.init_from_env(
        device, expert_parallel=args.expert_parallel, timeout_s=args.dist_timeout
    )


def _train(args: argparse.Namespace) -> int:
    from hyperrouter.train.checkpoint import read_json
    from hyperrouter.train.config import list_presets, load_config, resume_config
    from hyperrouter.train.trainer import train_run

    if args.list_configs:
        return _print_presets(list_presets())
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.path={args.data}")
    if args.resume and not args.out:
        raise HyperRouterError("--resume needs --out RUN_DIR (the run to continue)")
    config = None
    if not args.resume:
        config = load_config(args.config, overrides)
    _start_distributed(args, config.train.device if config is not None else "auto")
    from hyperrouter import distributed

    if args.resume and (args.config or overrides):
        config = distributed.on_main(
            lambda: (
                resume_config(read_json(Path(args.out, "config.json")), args.config, overrides)
                if Path(args.out, "config.json").is_file()
                else None
            )
        )

    def output_folder() -> str:
        out = args.out or _fresh_dir(f"runs/{config.name}")
        check_writable(out, "--out", folder=True)
        return out

    out = distributed.on_main(output_folder)
    results = train_run(config, out, resume=args.resume, progress=not args.no_progress)
    if distributed.current().is_main:
        print(_results_table(results))
        print(f"results: {out}/results.json")
    return 0


def _print_presets(presets: dict[str, str]) -> int:
    width = max(map(len, presets))
    for name, description in presets.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _fresh_dir(base: str) -> str:
    """`base`, or base-2, base-3, ... : the first that does not hold files yet."""
    candidate, n = base, 1
    while Path(candidate).exists() and any(Path(candidate).iterdir()):
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def _results_table(results: dict) -> str:
    metric = results["metric"]
    speed = results.get("tokens_per_second", {})
    cost = results.get("cost", {})
    macs, ms = cost.get("macs_per_token", {}), cost.get("ms_per_1000_tokens", {})
    lines = [f"{'k':>4}  {metric:>8}  {'tokens/s':>10}  {'ms/1k tokens':>12}  {'MACs/token':>12}"]
    nan = float("nan")
    for k, value in results["by_top_k"].items():
        lines.append(
            f"{k:>4}  {value:>8.4f}  {speed.get(k, nan):>10.0f}  {ms.get(k, nan):>12.2f}  "
            f"{macs.get(k, nan):>12,.0f}"
        )
    score = results.get("aiq", {})
    if "by_macs" in score:
        by_time = f", by time {score['by_time']:.4f}" if "by_time" in score else ""
        lines.append(
            f"AIQ of {score['quality']} (RouterBench; higher is better): by multiply-adds "
            f"{score['by_macs']:.4f}{by_time}"
        )
    return "\n".join(lines)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a trained run at several inference k",
        description="Evaluate a run (its best all-experts checkpoint) or a checkpoint folder.",
    )
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--top-k", type=_int_list, help="k values (default: the run's eval.top_ks)")
    p.add_argument("--split", choices=("valid", "test"), default="test")
    p.add_argument("--data", metavar="PATH", help="corpus (default: the one the run used)")
    p.add_argument(
        "--checkpoint",
        default="best_all_experts",
        choices=("best_all_experts", "best_train_k", "latest"),
        help="which checkpoint of a run folder (default best_all_experts)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> int:
    from hyperrouter.train.checkpoint import write_json_atomic
    from hyperrouter.train.evaluate import evaluate_checkpoint

    if args.json:
        check_writable(args.json, "--json", folder=False)
    results = evaluate_checkpoint(
        args.path,
        top_ks=args.top_k,
        split=args.split,
        data=args.data,
        which=args.checkpoint,
        progress=not args.no_progress,
    )
    print(f"{results['split']} split, checkpoint {results['checkpoint']}")
    print(_results_table(results))
    if args.json:
        write_json_atomic(Path(args.json), results)
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------- adaptive


def _add_adaptive(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adaptive",
        help="k chosen per token and per input: cost-quality sweeps scored by AIQ",
        description="Evaluate a trained MoE run at static k, under per-token policies (top-p, "
        "weight-ratio skipping) and per-input policies (oracle, predictor, cascade), each a "
        "sweep of quality against multiply-adds per token and measured time, scored by "
        "RouterBench's AIQ over the static curve's cost range. Writes RUN/adaptive.json (and "
        "adaptive.png with matplotlib). Time it alone on the machine.",
    )
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--top-k", type=_int_list, help="static k values (default: the run's)")
    p.add_argument(
        "--top-p",
        type=_float_list,
        default=(0.3, 0.5, 0.7, 0.8, 0.9, 0.95),
        help="top-p values, each in (0, 1] (default 0.3,0.5,0.7,0.8,0.9,0.95; empty: none)",
    )
    p.add_argument(
        "--ratio",
        type=_float_list,
        default=(0.05, 0.1, 0.2, 0.4, 0.6),
        help="weight-ratio skip thresholds in [0, 1] (default 0.05,0.1,0.2,0.4,0.6)",
    )
    p.add_argument("--k-max", type=int, help="most experts a token may keep (default all E)")
    p.add_argument(
        "--per-input",
        type=_str_list,
        default=("oracle", "predictor", "cascade"),
        help="per-input policies (default oracle,predictor,cascade; 'none' for none)",
    )
    p.add_argument(
        "--tolerance",
        type=_float_list,
        default=(0.0, 0.01, 0.02, 0.05, 0.1, 0.2),
        help="oracle/predictor loss tolerances in nats per token (default 0,0.01,...,0.2)",
    )
    p.add_argument(
        "--cascade",
        type=_int_list,
        default=None,
        metavar="SMALL,LARGE",
        help="the cascade's two k (default: the smallest and largest static k)",
    )
    p.add_argument(
        "--escalate",
        type=_float_list,
        default=(0.1, 0.25, 0.5, 0.75),
        help="shares of validation inputs the cascade's thresholds escalate",
    )
    p.add_argument("--split", choices=("valid", "test"), default="test")
    p.add_argument("--data", metavar="PATH", help="corpus (default: the one the run used)")
    p.add_argument("--max-batches", type=int, help="evaluate only the first N batches")
    p.add_argument("--out", metavar="PATH", help="JSON output (default RUN_DIR/adaptive.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_adaptive)


def _adaptive(args: argparse.Namespace) -> int:
    from hyperrouter.analysis.adaptive import PER_INPUT, SweepSpec, adaptive_sweep, format_report
    from hyperrouter.moe.policies import TopP, WeightRatio
    from hyperrouter.train.checkpoint import write_json_atomic
    from hyperrouter.train.config import check_top_ks
    from hyperrouter.train.evaluate import inference_ks, load_matching_corpus, load_trained

    per_input = [x for x in args.per_input if x != "none"]
    unknown = sorted(set(per_input) - set(PER_INPUT))
    if unknown:
        raise HyperRouterError(
            f"--per-input: unknown {', '.join(unknown)}; valid: {', '.join(PER_INPUT)}, none"
        )
    for p_value in args.top_p:
        TopP(p=p_value)  # one-line errors for values out of range
    for r in args.ratio:
        WeightRatio(r=r)
    if any(t < 0 for t in args.tolerance):
        raise HyperRouterError(f"--tolerance values must be >= 0, got {list(args.tolerance)}")
    if any(not 0 <= s <= 1 for s in args.escalate):
        raise HyperRouterError(f"--escalate shares must be in [0, 1], got {list(args.escalate)}")
    if args.max_batches is not None and args.max_batches < 2:
        raise HyperRouterError(f"--max-batches must be >= 2, got {args.max_batches}")
    out = Path(args.out) if args.out else Path(args.run) / "adaptive.json"
    check_writable(out, "--out", folder=False)
    run = load_trained(args.run)
    _transformer_xl_only("adaptive", run.config)
    model = run.model
    if not model.moe_layers():
        raise HyperRouterError(f"{args.run} is a dense model: there is no k to choose")
    experts = model.num_experts
    ks = list(args.top_k) if args.top_k else inference_ks(model, run.config)
    check_top_ks(ks, experts, "--top-k values")
    ks = sorted(set(ks))
    if args.k_max is not None and not 1 <= args.k_max <= experts:
        raise HyperRouterError(f"--k-max must be in [1, {experts}], got {args.k_max}")
    if args.cascade:
        cascade = tuple(args.cascade)
    else:  # the smallest and largest static k (1 and E when there is a single one)
        cascade = (ks[0], ks[-1]) if ks[0] < ks[-1] else (1, experts)
    if len(cascade) != 2 or not 1 <= cascade[0] < cascade[1] <= experts:
        shown = ",".join(str(k) for k in cascade)
        raise HyperRouterError(
            f"--cascade needs two k, SMALL < LARGE in [1, {experts}], got {shown}"
        )
    corpus = load_matching_corpus(run, args.data)
    spec = SweepSpec(
        ks=ks,
        top_ps=list(args.top_p),
        ratios=list(args.ratio),
        k_max=args.k_max,
        per_input=per_input,
        tolerances=list(args.tolerance),
        cascade_ks=cascade,
        escalate=list(args.escalate),
    )
    device = next(model.parameters()).device
    result = adaptive_sweep(
        model,
        run.config,
        run.kind,
        corpus.valid,
        getattr(corpus, args.split),
        spec,
        device,
        max_batches=args.max_batches,
        progress=not args.no_progress,
    )
    result["split"] = args.split
    result["checkpoint"] = str(run.folder)
    write_json_atomic(out, result)
    print(format_report(result))
    print(f"wrote {out}")
    try:
        from hyperrouter.analysis.plots import plot_adaptive
    except ImportError:
        return 0
    png = out.with_suffix(".png")
    if plot_adaptive(result, png):
        print(f"wrote {png}")
    return 0


# --------------------------------------------------------------------------- serve


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a run over HTTP (OpenAI-compatible), k chosen per request by a load policy",
        description="`hyperrouter serve RUN` starts an HTTP server (FastAPI + uvicorn; install "
        "with `bash scripts/setup.sh serve`): POST /v1/completions (OpenAI-compatible, with an "
        "extension field k), POST /v1/score, GET /health, GET /metrics. "
        "Requests join the running ones between generation steps (continuous batching), each "
        "with its own k. `hyperrouter serve train-policy RUN` measures the per-k cost profile, "
        "fits it to the real server (--calibrate) and searches the learned policy in "
        "simulation, writing RUN/serve/policy.json.",
    )
    p.add_argument("target", nargs="+", metavar="RUN_DIR | train-policy RUN_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--policy", default="static", help="static, rule or learned (default static: --k or E)"
    )
    p.add_argument("--k", type=int, help="the static policy's k (default: all experts)")
    p.add_argument("--policy-file", metavar="PATH", help="default RUN_DIR/serve/policy.json")
    p.add_argument("--deadline-ms", type=float, default=1000.0, help="per request (default 1000)")
    p.add_argument(
        "--max-batch", type=int, default=8, help="requests generated together (default 8)"
    )
    p.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="when idle, wait for more requests (5)"
    )
    p.add_argument("--max-queue", type=int, default=64, help="queued requests before 429 (64)")
    p.add_argument("--max-prompt", type=int, default=4096, help="prompt limit, bytes (4096)")
    p.add_argument("--max-tokens-limit", type=int, default=512, help="largest max_tokens (512)")
    p.add_argument("--threads", type=int, help=SERVING_THREADS_HELP)
    group = p.add_argument_group("train-policy")
    group.add_argument("--ks", type=_int_list, help="k values to choose from (default eval.top_ks)")
    group.add_argument("--prompt-tokens", type=int, default=64, help="profiled prompt (64)")
    group.add_argument("--max-tokens", type=int, default=32, help="profiled answer length (32)")
    group.add_argument(
        "--passes", type=int, default=2, help="policy-search rounds over the table (2)"
    )
    group.add_argument("--repeats", type=int, default=5, help="profile repeats (5)")
    group.add_argument(
        "--calibrate",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="fit the profile to the real server (loopback) with a load of this many seconds "
        "(10; 0: the engine's times as measured)",
    )
    group.add_argument(
        "--keep-profile",
        action="store_true",
        help="reuse the measured and fitted profile of the existing policy file; only learn again",
    )
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from hyperrouter.serve.engine import Engine
    from hyperrouter.train.evaluate import inference_ks, load_trained

    target = list(args.target)
    training = target[0] == "train-policy"
    if training:
        target = target[1:]
    if len(target) != 1:
        raise HyperRouterError("serve takes RUN_DIR, or train-policy RUN_DIR")
    for name, value, low in (
        ("--max-batch", args.max_batch, 1),
        ("--max-queue", args.max_queue, 1),
        ("--max-prompt", args.max_prompt, 1),
        ("--max-tokens-limit", args.max_tokens_limit, 1),
        ("--prompt-tokens", args.prompt_tokens, 1),
        ("--max-tokens", args.max_tokens, 1),
        ("--passes", args.passes, 1),
        ("--repeats", args.repeats, 1),
        ("--port", args.port, 0),
    ):
        if value < low:
            raise HyperRouterError(f"{name} must be >= {low}, got {value}")
    if not args.deadline_ms > 0 or args.max_wait_ms < 0:
        raise HyperRouterError("--deadline-ms must be > 0 and --max-wait-ms >= 0")
    set_serving_threads(args.threads)
    from hyperrouter.train.checkpoint import run_folder

    run_dir = run_folder(target[0])
    policy_file = Path(args.policy_file) if args.policy_file else run_dir / "serve" / "policy.json"
    run = load_trained(target[0])
    _transformer_xl_only("serve", run.config)
    engine = Engine(run, max_prompt=args.max_prompt, max_tokens_limit=args.max_tokens_limit)
    if training:
        from hyperrouter.serve.profile import format_simulation, train_policy

        if not run.model.moe_layers():
            raise HyperRouterError(f"{target[0]} is a dense model: there is no k to choose")
        ks = sorted(set(args.ks)) if args.ks else inference_ks(run.model, run.config)
        for k in ks:
            engine.check_k(k, "--ks")
        check_writable(policy_file, "--policy-file", folder=False)
        kept = None
        if args.keep_profile:
            from hyperrouter.serve.policies import load_policy_file

            _, kept = load_policy_file(policy_file)
            bad = [k for k in kept.ks if not 1 <= k <= engine.num_experts]
            if bad:
                raise HyperRouterError(
                    f"{policy_file}'s profile has k = {bad}, outside [1, {engine.num_experts}]"
                )
        if args.calibrate < 0 or args.calibrate > 600:
            raise HyperRouterError(f"--calibrate must be in [0, 600] seconds, got {args.calibrate}")
        app_factory = None
        if args.calibrate > 0:
            try:
                import hyperrouter.serve.app  # noqa: F401 (the serve extra must be installed)
            except ImportError as err:
                raise HyperRouterError(
                    f"--calibrate needs the serve extra ({err.name} is missing): "
                    f"bash scripts/setup.sh serve, or --calibrate 0"
                ) from None

            app_factory = _serving_app_factory(engine, args)

        result = train_policy(
            engine,
            run_dir=run_dir,
            out=policy_file,
            ks=ks,
            deadline_ms=args.deadline_ms,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            prompt_tokens=args.prompt_tokens,
            max_tokens=args.max_tokens,
            repeats=args.repeats,
            passes=args.passes,
            calibrate_seconds=args.calibrate,
            app_factory=app_factory,
            profile=kept,
        )
        profile = result["profile"]
        print(f"profile ({profile.machine}): prefill of {profile.prompt_tokens} tokens and one")
        print("generation step with n running requests, ms (before the fitted scale):")
        header = " ".join(f"{'n=' + str(n):>8}" for n in profile.batch_sizes)
        print(f"{'k':>4} {'prefill':>8} {header}")
        for k in profile.ks:
            steps = " ".join(f"{t:>8.2f}" for t in profile.step_ms[str(k)])
            print(f"{k:>4} {profile.prefill_ms[str(k)]:>8.2f} {steps}")
        print(f"fitted: overhead {profile.overhead_ms:.1f} ms per request, scale {profile.scale:g}")
        sustained = ", ".join(f"k={k} {profile.sustained[str(k)]:.1f}/s" for k in profile.ks)
        print(f"simulated sustained rate (< 1 % misses): {sustained}")
        learned = result["learned"]
        print(
            f"policy search: mean simulated utility {learned.trained['utility_rule']:.4f} (rule) "
            f"-> {learned.trained['utility_learned']:.4f} (learned), "
            f"{len(learned.table)} cells changed"
        )
        print("simulated (60 s of Poisson arrivals per rate):")
        print(format_simulation(result["table"]))
        print(f"wrote {policy_file}")
        return 0
    try:
        import uvicorn

        from hyperrouter.serve.app import Server, create_app
    except ImportError as err:
        raise HyperRouterError(
            f"serving needs the serve extra ({err.name} is missing): bash scripts/setup.sh serve"
        ) from None
    from hyperrouter.serve.policies import build_policy

    if args.k is not None:
        engine.check_k(args.k, "--k")
    policy = build_policy(
        args.policy,
        k=args.k,
        num_experts=engine.num_experts,
        deadline_ms=args.deadline_ms,
        max_batch=args.max_batch,
        policy_file=policy_file,
    )
    server = Server(
        engine,
        policy,
        deadline_ms=args.deadline_ms,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
    )
    print(f"serving {run_dir} on http://{args.host}:{args.port} (policy {policy.kind})", flush=True)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    return 0


# --------------------------------------------------------------------------- finetune


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained run on SST-2, SST-5, IMDB or BANKING77",
        description=(
            "Fine-tune the best all-experts checkpoint of a pretraining run (--init) on a "
            "classification task, choose the checkpoint on a validation split that is not the "
            "reported test split, and report test accuracy at every inference k. Without --init "
            "the same model is trained from scratch (a control)."
        ),
    )
    p.add_argument("--task", help="sst2, sst5, imdb or banking77 (overrides the preset's)")
    p.add_argument("--data", metavar="PATH", help="task data folder (see hyperrouter.data.tasks)")
    p.add_argument("--init", metavar="RUN_DIR", help="pretrained run (omit to train from scratch)")
    p.add_argument(
        "--config",
        metavar="NAME_OR_PATH",
        help="finetune preset or YAML (default: <task>-cpu; see --list-configs)",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", metavar="RUN_DIR", help="output folder (default runs/finetune-<task>)")
    p.add_argument("--list-configs", action="store_true", help="list finetune presets and exit")
    p.add_argument("--no-progress", action="store_true")
    _add_distributed_flags(p)
    p.set_defaults(handler=_finetune)


def _finetune(args: argparse.Namespace) -> int:
    from hyperrouter.data.tasks import TASKS
    from hyperrouter.train.config import list_presets
    from hyperrouter.train.finetune import finetune_run, load_finetune_config

    if args.list_configs:
        return _print_presets(list_presets("finetune"))
    if args.task is not None and args.task not in TASKS:
        raise HyperRouterError(f"unknown task {args.task!r}; valid: {', '.join(TASKS)}")
    overrides = list(args.overrides)
    if args.task:
        overrides.append(f"task={args.task}")
    if args.data:
        overrides.append(f"data={args.data}")
    config = load_finetune_config(args.config or f"{args.task or 'sst2'}-cpu", overrides)
    if args.expert_parallel != 1:
        raise HyperRouterError("--expert-parallel is not supported by finetune yet (only by train)")
    _start_distributed(args, config.device)
    from hyperrouter import distributed

    def output_folder() -> str:
        out = args.out or _fresh_dir(f"runs/finetune-{config.task}")
        check_writable(out, "--out", folder=True)
        return out

    out = distributed.on_main(output_folder)
    results = finetune_run(config, out, init=args.init, progress=not args.no_progress)
    if not distributed.current().is_main:
        return 0
    print(f"{'k':>4}  {'accuracy':>8}  {'examples/s':>10}")
    for k, value in results["by_top_k"].items():
        print(f"{k:>4}  {value:>8.4f}  {results['examples_per_second'][k]:>10.0f}")
    print(f"results: {out}/results.json")
    return 0


# --------------------------------------------------------------------------- compare / analyze


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="train several routers under one budget; table, CSV, JSON and plots",
        description=(
            "Train several methods from one base config with several seeds, evaluate each at "
            "every inference k, analyse the routers, and write table.md, table.csv, "
            "summary.json and PNG plots into --out. Re-running continues an interrupted sweep; "
            "finished runs are reused. Methods: the presets of configs/compare/methods.yaml "
            "(hyperrouter, smoe_dropout, smoe, all_experts, dense_ffn, dense_ffn_dropout, "
            "switch, gshard, ...) and every registered router name."
        ),
    )
    p.add_argument(
        "--methods",
        default="hyperrouter,smoe_dropout,smoe,dense_ffn,dense_ffn_dropout",
        help="comma-separated methods (default: the paper's five: hyperrouter, smoe_dropout, "
        "smoe, dense_ffn, dense_ffn_dropout)",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    p.add_argument(
        "--config", metavar="BASE", help="base preset or YAML (default enwik8-hyperrouter-cpu)"
    )
    p.add_argument("--data", metavar="PATH", help="corpus (overrides data.path)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a base config key (repeatable)",
    )
    p.add_argument(
        "--experts",
        type=_int_list,
        metavar="E,E",
        help="grid axis: moe.num_experts values, e.g. 4,8,16,32 (k clipped to E; run folders "
        "<method>-E<E>-...)",
    )
    p.add_argument(
        "--sizes",
        type=_int_list,
        metavar="D,D",
        help="grid axis: model.d_model values, e.g. 64,128,256; d_inner, d_expert, d_head scale "
        "by D / base d_model (run folders <method>-...-d<D>-seed<S>)",
    )
    p.add_argument("--out", required=True, metavar="SWEEP_DIR")
    p.add_argument("--no-progress", action="store_true")
    _add_distributed_flags(p)
    p.set_defaults(handler=_compare)


def _compare(args: argparse.Namespace) -> int:
    from hyperrouter import distributed
    from hyperrouter.analysis.compare import run_compare

    _start_distributed(args, "auto")
    distributed.on_main(lambda: check_writable(args.out, "--out", folder=True))
    summary = run_compare(
        args.out,
        args.methods,
        seeds=args.seeds,
        base=args.config,
        data=args.data,
        overrides=args.overrides,
        progress=False if args.no_progress else None,
        experts=list(args.experts) if args.experts else None,
        sizes=list(args.sizes) if args.sizes else None,
    )
    if summary is not None:
        print(Path(args.out, "table.md").read_text())
    return 0


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="router entropy, expert load and diversity of a trained run",
        description=(
            "Per MoE layer on validation tokens at the training k: router entropy (mean, "
            "histogram), expert load and its coefficient of variation, expert diversity (mean "
            "pairwise cosine similarity of expert outputs), and routing changes between the "
            "run's checkpoints. Writes analysis.json and routing.png."
        ),
    )
    p.add_argument("path", metavar="RUN_DIR")
    p.add_argument("--data", metavar="PATH", help="corpus (default: the run's own)")
    p.add_argument("--out", metavar="DIR", help="output folder (default RUN_DIR/analysis)")
    p.add_argument("--tokens", type=int, default=8192, help="validation tokens to analyse")
    p.add_argument(
        "--nodes",
        type=int,
        default=2,
        help="virtual nodes for the off-node share (experts placed contiguously; default 2)",
    )
    p.add_argument(
        "--top-k", type=int, help="k to analyse the routing at (default: the training k)"
    )
    p.set_defaults(handler=_analyze)


def _analyze(args: argparse.Namespace) -> int:
    from hyperrouter.analysis.analyze import analysis_dir, analyze_run

    if args.tokens < 1:
        raise HyperRouterError(f"--tokens must be >= 1, got {args.tokens}")
    if args.out:
        check_writable(args.out, "--out", folder=True)
    if args.nodes < 1:
        raise HyperRouterError(f"--nodes must be >= 1, got {args.nodes}")
    result = analyze_run(
        args.path,
        data=args.data,
        max_tokens=args.tokens,
        out_dir=args.out,
        nodes=args.nodes,
        top_k=args.top_k,
    )
    out = analysis_dir(args.path, args.out)
    if not result["layers"]:
        print(result["note"])
        print(f"wrote {out / 'analysis.json'}")
        return 0
    layer = result["layers"][0]
    experts = len(layer["tokens_per_expert"])
    print(
        f"checkpoint {result['checkpoint']} (router {result['router']}) at k = {result['top_k']} "
        f"of {experts} experts, {layer['tokens']} validation tokens per layer"
    )
    if result["top_k"] >= experts:
        print(
            f"note: at k = {experts} of {experts} every token uses every expert, so the load CV "
            f"is 0 by construction; --top-k 1 shows how the router spreads first choices"
        )
    print(
        f"{'layer':>5}  {'entropy':>8}  {'load CV':>8}  {'dropped':>8}  {'off-node':>8}  "
        f"{'expert cos':>10}"
    )
    for layer in result["layers"]:
        entropy = layer["entropy_mean"]
        print(
            f"{layer['layer']:>5}  {'-' if entropy is None else f'{entropy:.3f}':>8}  "
            f"{layer['load_cv']:>8.3f}  {layer['dropped_fraction']:>8.3f}  "
            f"{layer['off_node_fraction']:>8.3f}  {layer['expert_similarity']:>10.3f}"
        )
    written = [p for p in (out / "analysis.json", out / "routing.png") if p.is_file()]
    print("wrote " + " and ".join(str(p) for p in written))
    return 0


# --------------------------------------------------------------------------- scaling


def _add_scaling(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scaling", help="fit the routed scaling law of Clark et al. (2022)")
    what = p.add_subparsers(dest="scaling_what", required=True, metavar="WHAT")
    fit = what.add_parser(
        "fit",
        help="fit log L = a log N + b log E' + c log N log E' + d to runs",
        description=(
            "Reads run folders (config.json + results.json) or sweep folders (runs/*/), takes "
            "N = the parameters a token uses (dense-equivalent size), E = experts per MoE layer "
            "(1 for dense models) and L = test loss in nats at inference k = --top-k, and fits "
            "Clark et al.'s law per router (dense runs join every router's fit) by least squares. "
            "Prints coefficients with standard errors, R^2 and RMSE of log L; writes "
            "scaling.json and scaling.png into --out. With one model size or one expert count "
            "the reduced law is fitted and the output says so."
        ),
    )
    fit.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP")
    fit.add_argument("--out", metavar="DIR", help="write scaling.json and scaling.png here")
    fit.add_argument(
        "--top-k", type=int, default=1, help="inference k whose test loss is used (default 1)"
    )
    fit.add_argument(
        "--saturate",
        action="store_true",
        help="E' = Clark et al.'s saturating transform of E with fitted E_start, E_max (the form "
        "later papers quote; see hyperrouter.analysis.scaling)",
    )
    fit.add_argument(
        "--router", type=_str_list, metavar="NAME,NAME", help="fit only these routers' runs"
    )
    fit.set_defaults(handler=_scaling_fit)


def _scaling_fit(args: argparse.Namespace) -> int:
    from hyperrouter.analysis.scaling import format_report, run_scaling_fit

    if args.out:
        check_writable(args.out, "--out", folder=True)
    result = run_scaling_fit(
        args.paths,
        args.out,
        top_k=args.top_k,
        saturate=args.saturate,
        routers=list(args.router) if args.router else None,
    )
    print(format_report(result))
    for path in result.get("files", []):
        print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- data


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="download and prepare corpora")
    what = p.add_subparsers(dest="data_what", required=True, metavar="WHAT")
    get = what.add_parser(
        "get",
        help="download (or take --from) and prepare a corpus",
        description="Download, verify and prepare enwik8, text8, wikitext-103, wikitext-2 or ptb.",
    )
    get.add_argument("name", help="enwik8, text8, wikitext-103, wikitext-2 or ptb")
    get.add_argument("--dir", required=True, metavar="DIR", help="where DIR/NAME is prepared")
    get.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE",
        help="prepare from an archive or file you already have (no network)",
    )
    get.set_defaults(handler=_data_get)


def _data_get(args: argparse.Namespace) -> int:
    from hyperrouter.data.download import get_dataset

    check_writable(args.dir, "--dir", folder=True)
    path = get_dataset(args.name, args.dir, from_file=args.from_file, progress=sys.stderr.isatty())
    print(path)
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


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_train,
    _add_eval,
    _add_adaptive,
    _add_serve,
    _add_finetune,
    _add_compare,
    _add_analyze,
    _add_scaling,
    _add_data,
    _add_bench,
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except HyperRouterError as err:
        if args.debug:
            raise
        _error_line(f"{_rank_prefix()}{err}")
        _settle()
        return EXIT_USER_ERROR
    except RuntimeError as err:  # torch.distributed's errors (DistError) are RuntimeErrors
        if args.debug or not _distributed_error(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        _error_line(
            f"{_rank_prefix()}distributed training stopped: {first} "
            f"(another rank died, hung past --dist-timeout, or cannot be reached)"
        )
        return EXIT_DISTRIBUTED
    except BrokenPipeError:  # `hyperrouter ... | head`: the reader left; stop quietly as Unix
        _silence_stdout()  # tools do (checkpoints are written atomically: nothing is half-written)
        return EXIT_BROKEN_PIPE
    except OSError as err:  # a path the user gave cannot be read or written
        if args.debug:
            raise
        _error_line(f"{_rank_prefix()}{_os_error_message(err)}")
        _settle()
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("hyperrouter: interrupted", file=sys.stderr)
        return 130
    finally:
        module = sys.modules.get("hyperrouter.distributed")
        if module is not None:
            module.shutdown()


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
        pass


def _error_line(message: str) -> None:
    """`hyperrouter: error: message` on stderr in one write (ranks sharing a pipe interleave
    whole lines only)."""
    sys.stderr.write(f"hyperrouter: error: {message}\n")
    sys.stderr.flush()


def _settle() -> None:
    """Under torchrun: let the other ranks print their own error before this one exits."""
    module = sys.modules.get("hyperrouter.distributed")
    if module is not None:
        module.settle()


def _rank_prefix() -> str:
    module = sys.modules.get("hyperrouter.distributed")
    if module is None or not module.current().enabled:
        return ""
    return f"rank {module.current().rank}: "


def _distributed_error(err: RuntimeError) -> bool:
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    from hyperrouter import distributed

    return distributed.current().enabled  # gloo reports a lost peer as a plain RuntimeError


def entry_point() -> None:
    sys.exit(main())
