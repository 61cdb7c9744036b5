"""Expert parallelism over 2 CPU processes (gloo) against the single-process layer.

One spawned job runs every check (process start-up dominates the time): for every registered
router and every CPU backend, in training, the expert-parallel layer on each rank's tokens gives
the output, auxiliary losses, statistics and keep mask of the single-process layer on those
tokens, the same input and router gradients, and on each expert's owner the sum over ranks of the
single-process expert gradients; evaluation and bf16 autocast; edge cases (experts and ranks
without rows, a rank without tokens); capacity across the group against the single-process layer
on the concatenated tokens; the second router, shared experts and granularity; the trainer
helpers (one optimizer step of the recipe against a single-process step on the global batch,
unsharded checkpoints of the model and of Adam; a model under DistributedDataParallel); deep
copies; the one-line errors.
"""

from __future__ import annotations

import copy
import datetime
import os

import pytest
import torch
from torch import distributed as dist
from torch import multiprocessing as mp

from hyperrouter import HyperRouterError, MoE, distributed
from hyperrouter.models.transformer_xl import ModelConfig, MoEConfig, TransformerXL
from hyperrouter.moe.expert_parallel import (
    AllToAllDispatcher,
    expert_parameter_names,
    full_optimizer_state,
    full_state_dict,
    load_full_optimizer_state,
    load_full_state_dict,
    reduce_expert_grads,
    shard_experts,
)
from hyperrouter.moe.experts import grouped_mm_available
from hyperrouter.routers import ROUTERS
from hyperrouter.train.step import clip_grad_norm

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

WORLD, E, D, H, VOCAB = 2, 4, 16, 8, 50
TOKENS = (12, 9)  # tokens per rank
CLIP = 1e-3  # far below the gradient norm: every rank must scale by the whole model's norm
OPTIONS = {  # small sizes; token-id routers get a vocabulary; CompeteSMoE competes on every call
    "competesmoe": {"competition_rate": 1.0},
    "hash": {"vocab_size": VOCAB},
    "hyperrouter": {"hyper_hidden": 16},
    "stablemoe": {"vocab_size": VOCAB, "distill_dim": 8},
    "xmoe": {"low_dim": 8},
}
BACKENDS = ["reference", "grouped", "dense"] + (["grouped_mm"] if grouped_mm_available() else [])


# ----------------------------------------------------------------------------- helpers


def make_layer(router: str = "smoe", *, dtype=torch.float64, seed: int = 0, **kwargs) -> MoE:
    """A layer with O(1) expert weights and non-zero biases (every gradient is exercised)."""
    torch.manual_seed(seed)
    kwargs.setdefault("router_options", OPTIONS.get(router, {}))
    layer = MoE(D, kwargs.pop("num_experts", E), H, 2, router=router, **kwargs)
    with torch.no_grad():
        for name, p in layer.experts.named_parameters():
            p.normal_(0.0, 0.3 if name.startswith("w_") else 0.1)
    return layer.to(dtype).train()


def batch(rank: int, num_tokens: int, dtype: torch.dtype) -> dict:
    """Rank `rank`'s tokens, output gradient and ids: the same on every process."""
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(num_tokens, D, generator=gen, dtype=dtype)
    g = torch.randn(num_tokens, D, generator=gen, dtype=dtype)
    call = {  # the layer's keyword arguments
        "token_ids": (torch.arange(num_tokens) * 7 + 3 * rank) % VOCAB,
        "sequence_ids": torch.arange(num_tokens) // 5,
    }
    return {"x": x, "g": g, "call": call}


def run(layer: MoE, data: dict, seed: int, aux: bool = True) -> dict:
    """Forward and backward of (output * g).sum() (+ the auxiliary losses); grads by name."""
    layer.zero_grad(set_to_none=True)
    x = data["x"].clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same draws for stochastic routers in both layers
    out = layer(x, return_details=True, **data["call"])
    loss = (out.output * data["g"]).sum()
    if aux:
        loss = loss + sum(out.aux_losses.values(), torch.zeros((), dtype=x.dtype))
    loss.backward()
    grads = {
        name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for name, p in layer.named_parameters()
    }
    return {"out": out, "x_grad": x.grad, "grads": grads}


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    tol = 1e-10 if a.dtype == torch.float64 else 1e-5
    scale = max(b.abs().max().item(), 1.0) if b.numel() else 1.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    assert a.shape == b.shape and err <= tol * scale, f"{what}: max error {err:.3g}"


def check_against_single_process(full: MoE, datas: list[dict], rank: int, what: str) -> MoE:
    """Shard a copy of `full`; compare it on this rank's tokens with `full` on every rank's."""
    layer = shard_experts(copy.deepcopy(full), dist.group.WORLD)
    assert type(layer) is MoE and isinstance(layer.dispatcher, AllToAllDispatcher)
    got = run(layer, datas[rank], 100 + rank)
    refs = [run(full, data, 100 + i) for i, data in enumerate(datas)]
    want = refs[rank]
    close(got["out"].output, want["out"].output, f"{what}: output")
    assert sorted(got["out"].aux_losses) == sorted(want["out"].aux_losses), what
    for key, value in want["out"].aux_losses.items():
        close(got["out"].aux_losses[key], value, f"{what}: aux loss {key}")
    s, t = got["out"].stats, want["out"].stats
    assert torch.equal(s.tokens_per_expert, t.tokens_per_expert), f"{what}: tokens_per_expert"
    assert (s.backend, s.top_k) == (t.backend, t.top_k), what
    close(s.dropped_fraction, t.dropped_fraction, f"{what}: dropped_fraction")
    if t.entropy is not None:
        close(s.entropy, t.entropy, f"{what}: entropy")
    keep, want_keep = got["out"].routing.keep, want["out"].routing.keep
    if want_keep is None:  # (a layer capacity over the group gives a mask even without tokens)
        assert keep is None or keep.all(), f"{what}: keep"
    else:
        assert torch.equal(keep, want_keep), f"{what}: keep"
    close(got["x_grad"], want["x_grad"], f"{what}: input grad")
    first, count = layer.shard.first, layer.shard.count
    for pname, grad in got["grads"].items():
        if pname.startswith("experts."):  # the owner's experts: summed over the ranks' tokens
            expected = sum(ref["grads"][pname] for ref in refs)[first : first + count]
        else:
            expected = want["grads"][pname]
        close(grad, expected, f"{what}: grad of {pname}")
    return layer


# ----------------------------------------------------------------------------- the checks


def check_every_router_and_backend(rank: int) -> None:
    for name in sorted(ROUTERS):
        for backend in BACKENDS:
            dtype = torch.float32 if backend == "grouped_mm" else torch.float64
            full = make_layer(name, dtype=dtype, backend=backend)
            datas = [batch(i, n, dtype) for i, n in enumerate(TOKENS)]
            check_against_single_process(full, datas, rank, f"{name}/{backend}")


def check_eval_and_autocast(rank: int) -> None:
    """Evaluation without autograd, and bf16 autocast (every router, the default backend)."""
    for name in sorted(ROUTERS):
        for dtype, autocast in ((torch.float64, False), (torch.float32, True)):
            full = make_layer(name, dtype=dtype).eval()
            layer = shard_experts(copy.deepcopy(full), dist.group.WORLD)
            datas = [batch(i, n, dtype) for i, n in enumerate(TOKENS)]
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                got = layer(datas[rank]["x"], **datas[rank]["call"])
                want = full(datas[rank]["x"], **datas[rank]["call"])
            if autocast:  # bf16 rounding: another summation order changes the last bits
                err = (got.float() - want.float()).abs().max().item()
                assert err <= 2e-2 * max(1.0, want.abs().max().item()), f"{name}: autocast"
            else:
                close(got, want, f"{name}: eval")


def check_experts_and_ranks_without_rows(rank: int) -> None:
    for backend in ("reference", "grouped"):
        # every token of both ranks to experts 2 and 3 (rank 1's): experts 0 and 1 get nothing,
        # rank 0 sends all its rows away and receives none; then only expert 0 gets nothing
        for bias in ([-50.0, -50.0, 50.0, 50.0], [-50.0, 0.0, 0.0, 50.0]):
            full = make_layer(backend=backend)
            with torch.no_grad():
                full.router.gate.bias.copy_(torch.tensor(bias))
            datas = [batch(i, n, torch.float64) for i, n in enumerate(TOKENS)]
            layer = check_against_single_process(full, datas, rank, f"bias {bias}/{backend}")
            if rank == 0:  # its experts without rows still got (zero) gradients
                assert layer.experts.w_in.grad[0].abs().max() == 0
        # rank 1 routes no token (all masked): it still computes what rank 0 sends it
        for name in ("smoe", "competesmoe", "smear", "vqmoe"):
            full = make_layer(name, backend=backend)
            datas = [batch(i, n, torch.float64) for i, n in enumerate(TOKENS)]
            for i, data in enumerate(datas):
                data["call"]["mask"] = torch.full((TOKENS[i],), i == 0)
            check_against_single_process(full, datas, rank, f"no tokens/{name}/{backend}")


def check_capacity_across_the_group(rank: int) -> None:
    for tokens in ((12, 7), (10, 0)):
        full = make_layer(capacity_factor=0.5, backend="grouped")
        datas = [batch(i, n, torch.float64) for i, n in enumerate(tokens)]
        layer = shard_experts(copy.deepcopy(full), dist.group.WORLD)
        got = run(layer, datas[rank], 0, aux=False)
        together = {
            "x": torch.cat([d["x"] for d in datas]),
            "g": torch.cat([d["g"] for d in datas]),
            "call": {k: torch.cat([d["call"][k] for d in datas]) for k in datas[0]["call"]},
        }
        want = run(full, together, 0, aux=False)
        rows = slice(sum(tokens[:rank]), sum(tokens[: rank + 1]))
        keep = want["out"].routing.keep
        assert not keep.all(), "capacity 0.5 must drop pairs"
        assert torch.equal(got["out"].routing.keep, keep[rows]), "capacity keep mask"
        close(got["out"].output, want["out"].output[rows], "capacity: output")
        close(got["x_grad"], want["x_grad"][rows], "capacity: input grad")
        first, count = layer.shard.first, layer.shard.count
        for pname in ("experts.w_in", "experts.b_in", "experts.w_out", "experts.b_out"):
            want_grad = want["grads"][pname][first : first + count]
            close(got["grads"][pname], want_grad, f"capacity: grad of {pname}")


def check_second_router_shared_experts_granularity(rank: int) -> None:
    options = {
        "num_experts": 2,
        "granularity": 2,
        "shared_experts": 1,
        "shared_mix": "gate",
        "second_router": "vqmoe",
        "capacity_factor": 2.0,
    }
    full = make_layer(backend="grouped", **options)
    assert full.num_experts == E
    for masked in (False, True):  # then rank 1 routes no token
        datas = [batch(i, n, torch.float64) for i, n in enumerate(TOKENS)]
        if masked:
            for i, data in enumerate(datas):
                data["call"]["mask"] = torch.full((TOKENS[i],), i == 0)
        check_against_single_process(full, datas, rank, f"second router + shared, {masked=}")


def check_trainer_recipe(rank: int) -> None:
    """One clipped Adam step of the recipe (router averaged over the world, reduce_expert_grads,
    the whole model's clip norm) equals a single-process step on the global batch; checkpoints in
    the unsharded layout round-trip."""
    full = make_layer(backend="grouped")
    model = shard_experts(copy.deepcopy(full), dist.group.WORLD)
    names = expert_parameter_names(model)
    assert names == {f"experts.{n}" for n in ("w_in", "b_in", "w_out", "b_out")}
    assert expert_parameter_names(full) == set()
    # world 2 = dp 1 x ep 2: each rank is alone in its expert-data-parallel group
    expert_dp = [dist.new_group([0]), dist.new_group([1])][rank]
    datas = [batch(i, n, torch.float64) for i, n in enumerate(TOKENS)]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    run(model, datas[rank], 0)
    replicated = [p for n, p in model.named_parameters() if n not in names]
    sharded = [p for n, p in model.named_parameters() if n in names]
    distributed.average_gradients(replicated)
    reduce_expert_grads(model, expert_dp, WORLD)
    norm = clip_grad_norm(list(model.parameters()), CLIP, sharded, dist.group.WORLD)

    ref_opt = torch.optim.Adam(full.parameters(), lr=0.01)
    refs = [run(full, data, 0) for data in datas]
    for pname, p in full.named_parameters():  # the gradient of the mean of the ranks' losses
        p.grad = sum(ref["grads"][pname] for ref in refs) / WORLD
    want_norm = torch.nn.utils.clip_grad_norm_(list(full.parameters()), CLIP)
    assert float(norm) > 10 * CLIP  # the clip is active
    close(norm, want_norm, "the whole model's gradient norm")
    for (pname, p), q in zip(model.named_parameters(), full.parameters()):
        first = model.shard.first
        want = q.grad[first : first + p.shape[0]] if pname in names else q.grad
        close(p.grad, want, f"clipped grad of {pname}")
    opt.step()
    ref_opt.step()

    state = full_state_dict(model, dist.group.WORLD)
    want = full.state_dict()
    assert list(state) == list(want)
    for key, value in want.items():
        close(state[key], value, f"state {key}")
    opt_state = full_optimizer_state(model, opt, dist.group.WORLD)
    want_opt = ref_opt.state_dict()
    for i, entry in want_opt["state"].items():
        for key, value in entry.items():
            close(opt_state["state"][i][key], value, f"optimizer state {i} {key}")

    other = shard_experts(make_layer(seed=5), dist.group.WORLD)  # different weights, then loaded
    other_opt = torch.optim.Adam(other.parameters(), lr=0.01)
    load_full_state_dict(other, state, dist.group.WORLD)
    load_full_optimizer_state(other, other_opt, opt_state, dist.group.WORLD)
    for (pname, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), pname
        for key, value in opt.state[p].items():
            assert torch.equal(other_opt.state[q][key], value), (pname, key)
    torch.optim.Adam(full.parameters()).load_state_dict(opt_state)  # single-process loads it

    # a gradient missing on some ranks (a layer one rank did not use) becomes a zero gradient
    # there, so that every replica steps; one missing everywhere stays missing
    run(model, datas[rank], 0)
    if rank == 0:
        model.experts.w_in.grad = None
    model.experts.b_in.grad = None
    reduce_expert_grads(model, expert_dp, WORLD)
    assert model.experts.w_in.grad is not None and model.experts.b_in.grad is None
    if rank == 0:
        assert model.experts.w_in.grad.abs().max() == 0


def check_data_parallel_on_a_model(rank: int) -> None:
    """A 2-layer MoE Transformer-XL with the trainer's gradient averaging (every parameter but the
    experts over the world, EP over its own group) + reduce_expert_grads: the gradients of the
    single-process model on the global batch."""
    cfg = ModelConfig(n_layer=2, n_head=2, d_head=8, d_model=D, d_inner=32, dropout=0.0)
    moe = MoEConfig(layers=[0, 1], num_experts=E, d_expert=H, router="smoe")
    torch.manual_seed(0)
    full = TransformerXL(VOCAB, cfg, moe, tgt_len=6, mem_len=0, top_k=2).double()
    ep_group = dist.new_group([0, 1])
    expert_dp = [dist.new_group([0]), dist.new_group([1])][rank]
    model = shard_experts(copy.deepcopy(full), ep_group)
    names = expert_parameter_names(model)
    assert len(names) == 8
    batches = [
        torch.randint(0, VOCAB, (2, 6, 2), generator=torch.Generator().manual_seed(i))
        for i in range(WORLD)
    ]
    out = model(batches[rank][0], batches[rank][1])
    (out.loss + out.aux_loss).backward()
    distributed.average_gradients([p for n, p in model.named_parameters() if n not in names])
    reduce_expert_grads(model, expert_dp, WORLD)
    for data, target in batches:
        out = full(data, target)
        ((out.loss + out.aux_loss) / WORLD).backward()
    want = dict(full.named_parameters())
    for pname, p in model.named_parameters():
        expected = want[pname].grad
        if pname in names:
            expected = expected[rank * p.shape[0] : (rank + 1) * p.shape[0]]
        close(p.grad, expected, f"data parallel: grad of {pname}")


def check_token_policies(rank: int) -> None:
    """Variable k per token (top-p, weight ratio, MoE++'s zero-computation experts) under expert
    parallelism: the kept pairs only, as in one process (forward, gradients, mean k)."""
    from hyperrouter.moe.policies import TopP, WeightRatio

    for policy in (TopP(p=0.6), WeightRatio(r=0.5, k_max=3)):
        for backend in ("grouped", "dense"):
            full = make_layer("hyperrouter", backend=backend)
            full.token_policy = policy
            datas = [batch(i, n, torch.float64) for i, n in enumerate(TOKENS)]
            layer = check_against_single_process(full, datas, rank, f"{policy}/{backend}")
            got = layer(datas[rank]["x"], return_details=True, **datas[rank]["call"]).stats
            want = full(datas[rank]["x"], return_details=True, **datas[rank]["call"]).stats
            assert got.mean_k.item() == want.mean_k.item() < E, f"{policy}: mean k"
    # MoE++: slots on zero-computation experts stay on their rank and cost no FFN
    for backend in ("grouped", "dense"):
        zc = {"constant_experts": 2, "copy_experts": 1, "zero_experts": 1}
        full = make_layer("smoe", backend=backend, **zc)
        datas = [batch(i, n, torch.float64) for i, n in enumerate(TOKENS)]
        layer = check_against_single_process(full, datas, rank, f"moe++/{backend}")
        got = layer(datas[rank]["x"], return_details=True, **datas[rank]["call"]).stats
        want = full(datas[rank]["x"], return_details=True, **datas[rank]["call"]).stats
        assert got.mean_k.item() == want.mean_k.item(), "moe++: mean k"
        assert got.extra.keys() == want.extra.keys() and "zero_share" in got.extra


def check_api(rank: int) -> None:
    with pytest.raises(HyperRouterError, match=r"E=3 .*P=2") as err:
        shard_experts(make_layer(num_experts=3), dist.group.WORLD)
    assert "\n" not in str(err.value)
    layer = shard_experts(make_layer(), dist.group.WORLD)
    twin = copy.deepcopy(layer)  # the copy shares the process group
    assert twin.shard.group is layer.shard.group and twin.experts.w_in is not layer.experts.w_in
    with pytest.raises(HyperRouterError, match="already expert-parallel"):
        shard_experts(layer, dist.group.WORLD)
    plain = make_layer()
    assert shard_experts(plain, None) is plain and type(plain) is MoE
    with pytest.raises(HyperRouterError, match="not the group"):
        full_state_dict(layer, None)


def worker(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        check_api(rank)
        check_every_router_and_backend(rank)
        check_eval_and_autocast(rank)
        check_experts_and_ranks_without_rows(rank)
        check_capacity_across_the_group(rank)
        check_token_policies(rank)
        check_second_router_shared_experts_granularity(rank)
        check_trainer_recipe(rank)
        check_data_parallel_on_a_model(rank)
    finally:
        dist.destroy_process_group()


def test_expert_parallel_matches_the_single_process_layer(tmp_path) -> None:
    mp.start_processes(
        worker, args=(os.fspath(tmp_path / "store"),), nprocs=WORLD, start_method="spawn"
    )
