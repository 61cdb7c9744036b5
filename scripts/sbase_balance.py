"""How balanced is S-BASE's training-time choice on a trained model?

Runs a trained `sbase` run over a few validation batches (evaluation mode), captures every S-BASE
router's input, and routes those inputs again as in training (Sinkhorn-balanced top 1) at several
temperatures, next to the plain top 1 of evaluation. Prints, per layer, the coefficient of
variation of the expert counts of each 16 x 128-token call (mean over calls), the Sinkhorn
iterations and the final marginal error.

    python scripts/sbase_balance.py RUN_DIR --temperatures 1,0.3,0.1 --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hyperrouter.routers import RoutingContext
from hyperrouter.routers.sbase import SBaseRouter
from hyperrouter.train.evaluate import evaluate, load_matching_corpus, load_trained


def load_cv(expert_ids: torch.Tensor, num_experts: int) -> float:
    counts = torch.bincount(expert_ids.reshape(-1), minlength=num_experts).double()
    return float(counts.std(unbiased=False) / counts.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run folder trained with moe.router=sbase")
    parser.add_argument("--temperatures", default="1,0.3,0.1")
    parser.add_argument("--max-iters", type=int, default=5000)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    run = load_trained(args.run, which="last")
    routers = [m for m in run.model.modules() if isinstance(m, SBaseRouter)]
    if not routers:
        raise SystemExit(f"{args.run} has no sbase router")
    inputs: list[list[torch.Tensor]] = [[] for _ in routers]
    hooks = [
        r.register_forward_hook(lambda _m, inp, _o, i=i: inputs[i].append(inp[0].detach()))
        for i, r in enumerate(routers)
    ]
    corpus = load_matching_corpus(run, None)
    cfg = run.config
    evaluate(
        run.model,
        corpus.valid,
        batch_size=cfg.train.batch_size,
        tgt_len=cfg.train.tgt_len,
        mem_len=cfg.train.mem_len,
        top_k=1,
        device=torch.device("cpu"),
        max_batches=args.batches,
    )
    for hook in hooks:
        hook.remove()
    results = []
    for tau in (float(t) for t in args.temperatures.split(",")):
        for layer, router in enumerate(routers):
            router.temperature, router.max_iters = tau, args.max_iters
            train_cv, eval_cv, iters, errors = [], [], [], []
            for x in inputs[layer]:
                routing = router(x, RoutingContext(top_k=1, training=True))
                train_cv.append(load_cv(routing.expert_ids, router.num_experts))
                iters.append(router.last_sinkhorn[0])
                errors.append(router.last_sinkhorn[1])
                plain = router(x, RoutingContext(top_k=1, training=False))
                eval_cv.append(load_cv(plain.expert_ids, router.num_experts))
            row = {
                "temperature": tau,
                "layer": layer,
                "tokens_per_call": int(inputs[layer][0].shape[0]),
                "train_cv": sum(train_cv) / len(train_cv),
                "eval_cv": sum(eval_cv) / len(eval_cv),
                "max_iters_used": max(iters),
                "max_error": max(errors),
            }
            results.append(row)
            print(
                f"tau {tau:<4} layer {layer}: Sinkhorn top-1 CV {row['train_cv']:.3f}, "
                f"plain top-1 CV {row['eval_cv']:.3f}, {row['max_iters_used']} iterations, "
                f"error {row['max_error']:.1e}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"run": args.run, "rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
