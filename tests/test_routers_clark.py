"""The three routers of Clark et al. 2022 ("Unified Scaling Laws for Routed Language Models"):
`sbase` (Sinkhorn-balanced choice in training), `hash` (token-id tables) and `rlr` (REINFORCE),
each on a constructed case of its defining property."""

from __future__ import annotations

import io
import math

import pytest
import torch

from hyperrouter import MoE
from hyperrouter.errors import HyperRouterError
from hyperrouter.routers import RoutingContext, build_router
from hyperrouter.routers.hash import token_counts
from hyperrouter.routers.rlr import sequential_log_probs
from hyperrouter.routers.sbase import sinkhorn_expert_bias, sinkhorn_plan
from hyperrouter.train.step import ChunkResult, training_step

D, E = 16, 8


def train_ctx(k: int, **kw) -> RoutingContext:
    return RoutingContext(top_k=k, training=True, **kw)


def eval_ctx(k: int, **kw) -> RoutingContext:
    return RoutingContext(top_k=k, training=False, **kw)


# ---------------------------------------------------------------------------------------- sbase
def skewed_sbase(seed: int = 0, **options):
    """An S-BASE router whose logits strongly prefer experts 0 and 1, and tokens for it."""
    torch.manual_seed(seed)
    router = build_router("sbase", D, E, bias=True, **options)
    with torch.no_grad():
        router.gate.weight.normal_(0.0, 0.25)  # logit noise ~ N(0, 1) for x ~ N(0, I)
        router.gate.bias.zero_()
        router.gate.bias[0] = 3.0
        router.gate.bias[1] = 1.5
    return router, torch.randn(512, D)


def loads(ids: torch.Tensor) -> torch.Tensor:
    return torch.bincount(ids.reshape(-1), minlength=E)


@pytest.mark.parametrize("k", [1, 2])
def test_sbase_training_choice_is_balanced_where_plain_top_k_is_not(k: int) -> None:
    router, x = skewed_sbase()
    mean = x.shape[0] * k / E
    plain = loads(router(x, eval_ctx(k)).expert_ids)
    balanced = loads(router(x, train_ctx(k)).expert_ids)
    assert plain.max() > 2.5 * mean  # the skew: plain top-k piles onto experts 0 and 1
    # the soft plan is exactly balanced; its argmax counts scatter around the mean
    assert balanced.max() < 1.3 * mean and balanced.min() > 0.6 * mean, balanced.tolist()
    assert balanced.max() - balanced.min() < (plain.max() - plain.min()) / 5
    iters, error = router.last_sinkhorn
    assert error <= router.tol and iters < router.max_iters


def test_sbase_at_low_temperature_gives_every_expert_its_share_within_one() -> None:
    router, x = skewed_sbase(temperature=0.05, max_iters=20000)
    x = x[:64]
    counts = loads(router(x, train_ctx(1)).expert_ids)
    assert int((counts - 64 // E).abs().max()) <= 1, counts.tolist()


def test_sinkhorn_plan_has_the_balanced_marginals_and_survives_huge_logits() -> None:
    torch.manual_seed(0)
    logits = torch.randn(300, E) * 4
    logits[:, 0] += 5
    plan = sinkhorn_plan(logits, tol=1e-5, max_iters=1000)
    torch.testing.assert_close(plan.sum(0), torch.full((E,), 1 / E), rtol=1e-4, atol=0)
    assert float((plan.sum(1) * 300 - 1).abs().max()) <= 1e-4
    bias, _, error = sinkhorn_expert_bias(logits * 1000, tol=1e-4, max_iters=50)
    assert torch.isfinite(bias).all() and math.isfinite(error)
    empty, iters, _ = sinkhorn_expert_bias(torch.zeros(0, E))
    assert empty.shape == (E,) and iters == 0


@pytest.mark.parametrize("k", [1, 2])
def test_sbase_eval_is_plain_top_k_with_megatron_weights(k: int) -> None:
    router, x = skewed_sbase()
    routing = router(x, eval_ctx(k))
    logits = x @ router.gate.weight.t() + router.gate.bias
    want = torch.topk(logits, k, dim=-1).indices
    assert torch.equal(routing.expert_ids, want)
    act = torch.sigmoid(logits) if k == 1 else torch.softmax(logits, dim=-1)
    torch.testing.assert_close(routing.weights, act.gather(1, want))
    assert routing.aux_losses == {}
    renorm = build_router("sbase", D, E, renormalize=True)
    weights = renorm(x, eval_ctx(2)).weights
    torch.testing.assert_close(weights.sum(-1), torch.ones(x.shape[0]))


def test_sbase_routes_in_fp32_under_autocast_and_handles_no_tokens() -> None:
    router, x = skewed_sbase()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(x.bfloat16(), train_ctx(2))
    assert routing.logits.dtype == torch.float32 and routing.weights.dtype == torch.float32
    empty = router(torch.zeros(0, D), train_ctx(2))
    assert empty.expert_ids.shape == (0, 2)


# ---------------------------------------------------------------------------------------- hash
def test_hash_routes_by_token_id_exactly_per_its_table() -> None:
    router = build_router("hash", D, E, seed=3, vocab_size=50)
    ids = torch.tensor([0, 7, 49, 57, 7, 107])  # 57 and 107 wrap to rows 7 and 7
    x = torch.randn(len(ids), D)
    for k in (1, 3, E):
        routing = router(x, eval_ctx(k, token_ids=ids))
        assert torch.equal(routing.expert_ids, router.table[ids % 50, :k].long())
        assert torch.equal(routing.weights, torch.full((len(ids), k), 1 / k))
        assert routing.logits is None
    full = router(x, train_ctx(E, token_ids=ids)).expert_ids
    assert all(len(set(row.tolist())) == E for row in full)  # k distinct experts per token
    assert torch.equal(full[1], full[3]) and torch.equal(full[1], full[4])
    again = build_router("hash", D, E, seed=3, vocab_size=50)
    assert torch.equal(again.table, router.table)  # a fixed function of the seed
    other = build_router("hash", D, E, seed=4, vocab_size=50)
    assert not torch.equal(other.table, router.table)


def zipf_tokens(vocab: int = 5000, n: int = 200_000, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=gen)


def test_balanced_table_balances_a_zipf_token_distribution() -> None:
    vocab = 5000
    ids = zipf_tokens(vocab)
    random_router = build_router("hash", D, E, vocab_size=vocab, seed=0)
    router = build_router("hash", D, E, table="balanced", vocab_size=vocab, seed=0)
    router.fit_table(token_counts(ids, vocab))
    for k in (1, 2):
        balanced = loads(router.table[ids, :k].long())
        random = loads(random_router.table[ids, :k].long())
        assert balanced.max() / balanced.min() < 1.02, balanced.tolist()
        assert random.max() / random.min() > 1.3, random.tolist()
    assert all(len(set(row.tolist())) == E for row in router.table[:200])
    held_out = loads(router.table[zipf_tokens(vocab, seed=1), 0].long())
    assert held_out.max() / held_out.min() < 1.1  # same distribution, fresh sample


def test_hash_table_survives_state_dict_and_checkpoint_io() -> None:
    vocab = 300
    router = build_router("hash", D, E, table="balanced", vocab_size=vocab, seed=1)
    router.fit_table(token_counts(zipf_tokens(vocab, 20_000), vocab))
    buffer = io.BytesIO()
    torch.save(router.state_dict(), buffer)
    buffer.seek(0)
    loaded = build_router("hash", D, E, table="balanced", vocab_size=vocab, seed=9)
    with pytest.raises(HyperRouterError, match="not fitted"):
        loaded(torch.randn(2, D), eval_ctx(1, token_ids=torch.tensor([1, 2])))
    loaded.load_state_dict(torch.load(buffer))
    assert torch.equal(loaded.table, router.table) and bool(loaded.fitted)
    ids = torch.randint(0, vocab, (40,))
    x = torch.randn(40, D)
    for k in (1, 2):
        assert torch.equal(
            loaded(x, eval_ctx(k, token_ids=ids)).expert_ids,
            router(x, eval_ctx(k, token_ids=ids)).expert_ids,
        )


def test_hash_without_token_ids_is_a_one_line_error() -> None:
    router = build_router("hash", D, E)
    with pytest.raises(HyperRouterError, match="token_ids") as err:
        router(torch.randn(4, D), train_ctx(1))
    assert "\n" not in str(err.value)
    layer = MoE(D, E, 24, 1, router="hash")
    with pytest.raises(HyperRouterError, match="must pass token_ids"):
        layer(torch.randn(2, 3, D))
    with pytest.raises(HyperRouterError, match="token ids must be >= 0"):
        router(torch.randn(1, D), eval_ctx(1, token_ids=torch.tensor([-1])))
    with pytest.raises(HyperRouterError, match="table='balanced'"):
        router.fit_table(torch.ones(10))
    with pytest.raises(HyperRouterError, match="num_tables"):
        build_router("hash", D, E, num_tables=2)(torch.randn(1, D), eval_ctx(3, token_ids=[0]))
    with pytest.raises(HyperRouterError, match="router option table"):
        build_router("hash", D, E, table="bigram")


# ---------------------------------------------------------------------------------------- rlr
def policy_router(probs: list[float], **options):
    """An RL-R router whose policy is `probs` for every token (zero weights, bias log p)."""
    router = build_router("rlr", D, len(probs), **options)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.bias.copy_(torch.tensor(probs).log())
    return router


def test_rlr_samples_experts_with_the_policy_probabilities() -> None:
    probs = [0.5, 0.25, 0.15, 0.1]
    router = policy_router(probs)
    torch.manual_seed(0)
    n = 20_000
    routing = router(torch.randn(n, D), train_ctx(1))
    freq = torch.bincount(routing.expert_ids[:, 0], minlength=4).float() / n
    tol = 4 * math.sqrt(0.25 / n)  # 4 standard deviations of a frequency
    torch.testing.assert_close(freq, torch.tensor(probs), rtol=0, atol=tol)
    torch.testing.assert_close(
        routing.log_probs[:, 0], torch.tensor(probs).log()[routing.expert_ids[:, 0]]
    )
    pair = router(torch.randn(n, D), train_ctx(2))
    assert (pair.expert_ids[:, 0] != pair.expert_ids[:, 1]).all()
    # second draw from pi without the first: P(second = 0 | first = 1) = 0.5 / 0.75
    first_one = pair.expert_ids[:, 0] == 1
    share = (pair.expert_ids[first_one, 1] == 0).float().mean()
    assert abs(float(share) - 0.5 / 0.75) < 4 * math.sqrt(0.25 / int(first_one.sum()))


def test_rlr_log_probs_of_a_draw_without_replacement_are_plackett_luce() -> None:
    log_pi = torch.tensor([[0.5, 0.3, 0.2]]).log()
    got = sequential_log_probs(log_pi, torch.tensor([[2, 0, 1]]))
    want = torch.tensor([[math.log(0.2), math.log(0.5 / 0.8), math.log(1.0)]])
    torch.testing.assert_close(got, want)


def test_rlr_policy_gradient_matches_the_reinforce_estimator_by_hand() -> None:
    torch.manual_seed(0)
    router = build_router("rlr", D, 4, entropy_weight=0.0, value_weight=0.0)
    x = torch.randn(5, D)
    routing = router(x, train_ctx(1))
    baseline = router._pending[1].detach()
    loss = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.5])
    terms = router.token_loss_terms(routing, loss)
    terms["policy_loss"].backward()
    pi = torch.softmax(x @ router.gate.weight.t() + router.gate.bias, dim=-1).detach()
    onehot = torch.nn.functional.one_hot(routing.expert_ids[:, 0], 4).float()
    score = (loss - baseline)[:, None] * (onehot - pi) / 5  # d/dlogits of mean(log pi(a) * adv)
    torch.testing.assert_close(router.gate.weight.grad, score.t() @ x)
    torch.testing.assert_close(router.gate.bias.grad, score.sum(0))
    assert router.baseline.weight.grad is None  # the policy term does not move the baseline


def test_rlr_training_step_moves_the_policy_toward_the_better_expert() -> None:
    torch.manual_seed(0)
    layer = MoE(D, 4, 24, 1, router="rlr", router_options={"entropy_weight": 0.0}).train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(64, D)
    good = 2

    def chunk():
        out = layer(x, return_details=True)
        token_loss = (out.routing.expert_ids[:, 0] != good).float()  # expert 2: loss 0, others 1
        return ChunkResult(
            token_loss.mean() + 0 * out.output.sum(), torch.zeros(()), token_loss, [out]
        )

    def prob_good() -> float:
        with torch.no_grad():
            return float(torch.softmax(layer.router.compute_logits(x), -1)[:, good].mean())

    before = prob_good()
    for step in range(30):
        result = training_step(layer, opt, [chunk], step=step, clip=0.0, params=[])
    assert {"policy_loss", "baseline_loss", "entropy_bonus"} <= set(result.aux_losses)
    assert before < 0.3 and prob_good() > 0.8
    layer.eval()
    greedy = layer(x, return_details=True).routing.expert_ids[:, 0]
    assert (greedy == good).float().mean() > 0.9


def test_rlr_baseline_regresses_toward_the_mean_loss() -> None:
    torch.manual_seed(0)
    router = build_router("rlr", D, 4)
    opt = torch.optim.SGD(router.baseline.parameters(), lr=0.2)
    x = torch.randn(128, D)
    loss = 2.0 + 0.1 * torch.randn(128)
    gaps = []
    for _ in range(150):
        routing = router(x, train_ctx(1))
        baseline = router._pending[1].detach()
        gaps.append(abs(float(baseline.mean()) - float(loss.mean())))
        opt.zero_grad()
        router.token_loss_terms(routing, loss)["baseline_loss"].backward()
        opt.step()
    assert gaps[0] > 1.5 and gaps[-1] < 0.05


def test_rlr_batch_baselines_centre_the_advantage_from_the_first_call() -> None:
    torch.manual_seed(0)
    loss = torch.tensor([1.0, 2.0, 3.0, 6.0])
    x = torch.randn(4, D)
    loo = torch.tensor([11 / 3, 10 / 3, 3.0, 2.0])  # mean of the other three losses
    for kind in ("batch_mean", "both"):
        router = build_router("rlr", D, E, baseline=kind)
        routing = router(x, train_ctx(1))
        learned = router._pending[1].detach()
        baseline = router.baseline_values(learned, loss)
        want = loo if kind == "batch_mean" else loo + learned
        torch.testing.assert_close(baseline, want)
        terms = router.token_loss_terms(routing, loss)
        assert ("baseline_loss" in terms) == (kind == "both")


def test_rlr_eval_is_greedy_and_deterministic() -> None:
    router = policy_router([0.1, 0.6, 0.3])
    with torch.no_grad():
        router.gate.weight.normal_(0, 0.5)
    x = torch.randn(50, D)
    first, second = router(x, eval_ctx(2)), router(x, eval_ctx(2))
    assert torch.equal(first.expert_ids, second.expert_ids)
    assert torch.equal(first.expert_ids, torch.topk(first.logits, 2, dim=-1).indices)
    assert first.log_probs is None
    torch.testing.assert_close(
        first.weights, torch.softmax(first.logits.gather(1, first.expert_ids), -1)
    )
    uniform = build_router("rlr", D, 3, combine="uniform")(x, eval_ctx(2))
    assert torch.equal(uniform.weights, torch.full((50, 2), 0.5))


def test_rlr_bad_options_and_foreign_routings_are_one_line_errors() -> None:
    with pytest.raises(HyperRouterError, match="entropy_weight"):
        build_router("rlr", D, E, entropy_weight=-0.1)
    with pytest.raises(HyperRouterError, match="combine"):
        build_router("rlr", D, E, combine="max")
    router = build_router("rlr", D, E)
    routing = router(torch.randn(3, D), eval_ctx(1))
    with pytest.raises(HyperRouterError, match="last training forward"):
        router.token_loss_terms(routing, torch.zeros(3))
    empty = router(torch.zeros(0, D), train_ctx(2))
    terms = router.token_loss_terms(empty, torch.zeros(0))
    assert all(float(v.detach()) == 0 for v in terms.values())


def test_the_trainer_fits_a_balanced_hash_table_to_the_training_data(tmp_path) -> None:
    from hyperrouter.train.config import config_from_dict
    from hyperrouter.train.trainer import Run
    from tests.test_train import tiny_config

    corpus = tmp_path / "text.txt"
    corpus.write_bytes(b"aaaaaaaabbbbccde " * 300)
    cfg = tiny_config(
        corpus, moe={"router": "hash", "router_options": {"table": "balanced", "vocab_size": 64}}
    )
    run = Run(config_from_dict(cfg), tmp_path / "run", progress=False, log=lambda _: None)
    router = run.model.moe_layers()[0].router
    assert bool(router.fitted)
    counts = torch.bincount(run.corpus.train.reshape(-1), minlength=64).float()
    load = torch.zeros(router.num_experts).index_add(0, router.table[:64, 0].long(), counts)
    assert load.max() <= counts.max() + load.sum() / router.num_experts  # greedy balance bound


@pytest.mark.parametrize("k", [1, 2])
def test_rlr_detach_input_keeps_the_reinforce_gradient_out_of_the_backbone(k: int) -> None:
    """detach_input: same routing, same gate gradient, but no policy/entropy gradient into x."""
    grads = {}
    for detach in (False, True):
        torch.manual_seed(0)
        router = build_router("rlr", D, 4, value_weight=0.0, detach_input=detach)
        x = torch.randn(6, D, requires_grad=True)
        torch.manual_seed(1)
        routing = router(x, train_ctx(k))
        terms = router.token_loss_terms(routing, torch.linspace(0.5, 3.0, 6))
        (terms["policy_loss"] + terms["entropy_bonus"]).backward()
        grads[detach] = (routing.expert_ids, x.grad, router.gate.weight.grad.clone())
    (ids_a, xgrad_a, wgrad_a), (ids_b, xgrad_b, wgrad_b) = grads[False], grads[True]
    assert torch.equal(ids_a, ids_b)
    torch.testing.assert_close(wgrad_a, wgrad_b)
    assert xgrad_a is not None and float(xgrad_a.abs().sum()) > 0
    assert xgrad_b is None or float(xgrad_b.abs().sum()) == 0
    # the combine weights (k > 1) still pass the task gradient to x and to the gate
    if k > 1:
        router = build_router("rlr", D, 4, detach_input=True)
        x = torch.randn(6, D, requires_grad=True)
        router(x, train_ctx(k)).weights[:, 0].sum().backward()
        assert float(x.grad.abs().sum()) > 0
    with pytest.raises(HyperRouterError, match="detach_input"):
        build_router("rlr", D, 4, detach_input="yes")
