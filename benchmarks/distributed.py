"""Training throughput and expert-parallel all-to-all volume of `hyperrouter train`, in one process
or under torchrun.

    python benchmarks/distributed.py OUT_DIR [--steps N] [--expert-parallel P] [-- --set ...]
    torchrun --standalone --nproc_per_node 2 benchmarks/distributed.py OUT_DIR --expert-parallel 2

Trains the `quick` preset (on the built-in corpus unless --data is given) for --steps steps with
validation only at the end, and prints one JSON line (rank 0): world size, threads, training
tokens/s (from results.json), and for expert parallelism the bytes each rank sent to other ranks
through all_to_all_single per training step, next to the uniform-routing formula

    4 x (MoE layers) x (tokens per rank per step) x k x (P - 1) / P x d_model x bytes per value

(forward: rows out and results back; backward: the same two exchanges for the gradients). The
gradient all-reduce of data parallelism (`distributed.average_gradients`) is not counted here; its
volume is the trainable non-expert parameters' gradient bytes x 2 (W - 1) / W per rank and step
(ring all-reduce), printed from the model's size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from hyperrouter import cli
from hyperrouter.train import trainer

K = 2  # a trainable top-2 router (smoe), k fixed: the usual sparse setting
SENT = {"bytes": 0, "calls": 0}
IN_TRAINING = {"on": False}


def _counting_all_to_all(original):
    def wrapped(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
        if IN_TRAINING["on"]:
            rank = dist.get_rank(group)
            rows = input.shape[0] if input.dim() else 1
            row_bytes = input.element_size() * (input.numel() // max(rows, 1))
            splits = input_split_sizes or [
                rows // dist.get_world_size(group)
            ] * dist.get_world_size(group)
            SENT["bytes"] += sum(n for j, n in enumerate(splits) if j != rank) * row_bytes
            SENT["calls"] += 1
        return original(output, input, output_split_sizes, input_split_sizes, group=group, **kw)

    return wrapped


def _counting_step(original):
    def wrapped(*args, **kwargs):
        IN_TRAINING["on"] = True
        try:
            return original(*args, **kwargs)
        finally:
            IN_TRAINING["on"] = False

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--expert-parallel", type=int, default=1)
    parser.add_argument("--data")
    parser.add_argument("extra", nargs="*", help="more `train` arguments after --")
    args = parser.parse_args()
    dist.all_to_all_single = _counting_all_to_all(dist.all_to_all_single)
    trainer.training_step = _counting_step(trainer.training_step)
    train = ["train", "--config", "quick", "--out", args.out, "--no-progress"]
    train += ["--set", f"train.steps={args.steps}", "--set", f"train.eval_interval={args.steps}"]
    train += ["--set", "eval.max_valid_batches=2", "--set", "eval.top_ks=[2]"]
    train += ["--set", "moe.router=smoe"]
    train += ["--set", f"train.top_k_min={K}", "--set", f"train.top_k_max={K}"]
    train += ["--expert-parallel", str(args.expert_parallel)]
    if args.data:
        train += ["--data", args.data]
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (the train table; the JSON goes to stderr)
    code = cli.main([*train, *args.extra])
    sys.stdout = sys.__stdout__
    if code:
        raise SystemExit(code)
    results = json.loads(open(os.path.join(args.out, "results.json")).read())
    config = json.loads(open(os.path.join(args.out, "config.json")).read())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    record = {
        "world_size": world,
        "threads_per_process": torch.get_num_threads(),
        "expert_parallel": args.expert_parallel,
        "steps": args.steps,
        "train_tokens_per_second": results["tokens_per_second"]["train"],
    }
    m, t, moe = config["model"], config["train"], config["moe"]
    layers = len(moe["layers"]) if moe["layers"] is not None else m["n_layer"]
    tokens_per_rank = t["batch_size"] * t["tgt_len"] // world
    d, h, e = m["d_model"], moe["d_expert"], moe["num_experts"]
    expert_params = layers * e * (2 * d * h + h + d)
    dense_params = results["parameters"]["trainable"] - (
        expert_params if args.expert_parallel > 1 else 0
    )
    record["ddp_allreduce_bytes_per_rank_step"] = 4 * dense_params * 2 * (world - 1) / world
    if args.expert_parallel > 1:
        p = args.expert_parallel
        record["a2a_bytes_sent_per_step"] = SENT["bytes"] / args.steps
        record["a2a_calls_per_step"] = SENT["calls"] / args.steps
        record["a2a_formula_bytes_per_step"] = (
            4 * layers * tokens_per_rank * K * (p - 1) / p * d * 4
        )
    print(f"rank {rank}: {json.dumps(record)}", file=sys.stderr)


if __name__ == "__main__":
    main()
