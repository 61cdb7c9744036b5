"""hyperrouter routers inside transformers MoE models, set_top_k, save/load, and sparse upcycling.

Every model is built from a tiny random config (hidden 32, 2 layers, 4 experts, vocabulary 64) in
fp32; nothing is downloaded. Tolerances: "relative" is max |a - b| / max |b| over the LM logits.
1e-5 where the two computations are the same operations in another order (slot order of the
top-k, summation order of the experts' outputs: fp32 rounding, ~1e-7 measured); exact equality
where the same tensors go through the same code.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("transformers")

import transformers  # noqa: E402

from hyperrouter import MoE  # noqa: E402
from hyperrouter.errors import HyperRouterError  # noqa: E402
from hyperrouter.integrations.transformers import (  # noqa: E402
    RouterAdapter,
    aux_losses,
    find_moe_blocks,
    load_pretrained,
    replace_routers,
    set_top_k,
    trainer_callback,
    upcycle,
)
from hyperrouter.moe.experts import BACKENDS  # noqa: E402
from hyperrouter.routers import ROUTERS  # noqa: E402

VOCAB = 64
EXPERTS = 4
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
MOE_ARCHS = ["mixtral", "olmoe", "qwen3_moe", "qwen2_moe", "deepseek_v3", "gpt_oss"]
DENSE_ARCHS = ["llama", "qwen3", "gpt2"]
RTOL = 1e-5  # same operations, another order: fp32 rounding only (see the module docstring)


def make_config(arch: str, **overrides) -> transformers.PretrainedConfig:
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=16)
    if arch == "mixtral":
        config = transformers.MixtralConfig(**COMMON, num_local_experts=EXPERTS)
    elif arch == "olmoe":
        config = transformers.OlmoeConfig(**COMMON, num_experts=EXPERTS, num_experts_per_tok=2)
    elif arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**COMMON, num_experts=EXPERTS, head_dim=8, **moe)
    elif arch == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            **COMMON, num_experts=EXPERTS, shared_expert_intermediate_size=24, **moe
        )
    elif arch == "deepseek_v3":  # layer 0 dense (first_k_dense_replace), layer 1 MoE
        config = transformers.DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4},
            n_routed_experts=EXPERTS,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            rope_parameters=ROPE,
            **moe,
        )
    elif arch == "gpt_oss":
        config = transformers.GptOssConfig(
            **COMMON, num_local_experts=EXPERTS, num_experts_per_tok=2, head_dim=8,
            rope_parameters=ROPE,
        )  # fmt: skip
    elif arch == "llama":
        config = transformers.LlamaConfig(**COMMON)
    elif arch == "qwen3":
        config = transformers.Qwen3Config(**COMMON, head_dim=8)
    elif arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
            eos_token_id=2,
        )  # fmt: skip
    else:
        raise ValueError(arch)
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def make_model(arch: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = make_config(arch, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


def token_ids(seed: int = 1, batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def next_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss: position t predicts labels[t + 1]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), labels[:, 1:].reshape(-1))


def adapters(model) -> list[RouterAdapter]:
    return [m for m in model.modules() if isinstance(m, RouterAdapter)]


def one_line(excinfo: pytest.ExceptionInfo, *words: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


# ------------------------------------------------------------------- imports and dependencies


def test_import_hyperrouter_does_not_import_transformers() -> None:
    code = (
        "import sys, hyperrouter, hyperrouter.integrations, "
        "hyperrouter.integrations.transformers; assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_transformers_is_a_one_line_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(HyperRouterError) as excinfo:
        replace_routers(torch.nn.Linear(2, 2))
    one_line(excinfo, "bash scripts/setup.sh hf")


# ------------------------------------------------------------------- native gate -> smoe


@pytest.mark.parametrize("arch", MOE_ARCHS)
@torch.no_grad()
def test_smoe_from_native_gate_gives_the_same_outputs(arch: str) -> None:
    model = make_model(arch)
    for found in find_moe_blocks(model):  # GPT-OSS's gate bias: not zero, so that it matters
        if isinstance(getattr(found.router, "bias", None), torch.Tensor):
            found.router.bias.normal_(0.0, 0.5)
    ids = token_ids()
    before = model(ids, labels=ids, output_router_logits=True)
    replace_routers(model, "smoe")
    assert len(adapters(model)) == (1 if arch == "deepseek_v3" else 2)
    after = model(ids, labels=ids, output_router_logits=True)
    assert rel_err(after.logits, before.logits) <= RTOL
    # the model's own balance loss reads the adapters' logits (transformers' recorder moved over)
    assert len(after.router_logits) == len(before.router_logits)
    if before.aux_loss is not None:
        assert float(after.aux_loss) == pytest.approx(float(before.aux_loss), rel=RTOL)
    assert float(after.loss) == pytest.approx(float(before.loss), rel=RTOL)


@pytest.mark.parametrize(
    "arch, renormalize", [("olmoe", True), ("qwen3_moe", True), ("deepseek_v3", False)]
)
@torch.no_grad()
def test_smoe_follows_norm_topk_prob(arch: str, renormalize: bool) -> None:
    model = make_model(arch, norm_topk_prob=renormalize)
    ids = token_ids()
    before = model(ids).logits
    replace_routers(model, "smoe")
    assert {a.router.renormalize for a in adapters(model)} == {renormalize}
    assert rel_err(model(ids).logits, before) <= RTOL


def test_router_logits_are_recorded_when_replaced_before_any_recording() -> None:
    """transformers installs its router_logits recorder lazily, by router class: replace_routers
    installs it first and moves it to the adapters."""
    model = make_model("olmoe")
    replace_routers(model, "smoe")
    out = model(token_ids(), output_router_logits=True)
    assert len(out.router_logits) == 2 and out.aux_loss is not None


def test_deepseek_correction_bias_needs_aux_free() -> None:
    model = make_model("deepseek_v3")
    gate = model.model.layers[1].mlp.gate
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    ids = token_ids()
    before = model(ids).logits
    with pytest.raises(HyperRouterError) as excinfo:
        replace_routers(copy.deepcopy(model), "smoe")
    one_line(excinfo, "e_score_correction_bias", "aux_free")
    replace_routers(model, "aux_free")  # the bias becomes aux_free's expert_bias
    assert rel_err(model(ids).logits, before) <= RTOL


def test_deepseek_routed_scaling_factor_is_applied() -> None:
    model = make_model("deepseek_v3", routed_scaling_factor=2.5)
    ids = token_ids()
    before = model(ids).logits
    replace_routers(model, "smoe")
    assert adapters(model)[0].routed_scaling_factor == 2.5
    assert rel_err(model(ids).logits, before) <= RTOL


# ------------------------------------------------------------------- every router, every arch

ROUTER_OPTIONS = {"competesmoe": {"competition_rate": 1.0}}  # every training call competes
MERGE_ROUTERS = sorted(n for n, c in ROUTERS.items() if c.dispatch == "merge")  # refused below
RUNNABLE = sorted(n for n in ROUTERS if n not in MERGE_ROUTERS)
# the other architectures run a subset: a logit router, one that needs token ids, a variable-k
# one (keep mask), one with token-loss terms and one with an optimizer-step hook
SUBSET = ["hyperrouter", "hash", "top_p", "rlr", "aux_free"]


def check_train_forward_backward(arch: str, router: str) -> None:
    model = make_model(arch)
    replace_routers(model, router, **ROUTER_OPTIONS.get(router, {}))
    model.train()
    torch.manual_seed(0)
    ids = token_ids()
    out = model(ids, labels=ids)
    losses = out.hyperrouter_aux_losses
    assert losses.keys() == aux_losses(model).keys()
    expected = next_token_ce(out.logits, ids) + sum(losses.values())
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    if ROUTERS[router].token_loss_terms is not ROUTERS["smoe"].token_loss_terms:
        assert "policy_loss" in losses  # rlr's REINFORCE term from the per-token loss
    out.loss.backward()
    assert torch.isfinite(out.loss)
    if losses:  # in evaluation the loss is the task loss alone
        with torch.no_grad():
            evaluated = model.eval()(ids, labels=ids)
        assert evaluated.loss.item() == pytest.approx(next_token_ce(evaluated.logits, ids).item())
    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
    assert all(p.grad is not None for e in experts for p in e.parameters())


@pytest.mark.parametrize("router", RUNNABLE)
def test_every_router_trains_inside_mixtral(router: str) -> None:
    check_train_forward_backward("mixtral", router)


@pytest.mark.parametrize("router", SUBSET)
@pytest.mark.parametrize("arch", [a for a in MOE_ARCHS if a != "mixtral"])
def test_router_subset_trains_inside_other_architectures(arch: str, router: str) -> None:
    check_train_forward_backward(arch, router)


def test_hash_router_routes_by_the_calls_token_ids() -> None:
    model = make_model("olmoe")
    replace_routers(model, "hash")
    ids = token_ids()
    seen = []
    layer = model.model.layers[0].mlp
    layer.experts.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    model(ids)
    table = layer.gate.router.table
    assert torch.equal(seen[0], table[ids.reshape(-1), :2].long())


def test_competition_routers_see_every_experts_response() -> None:
    model = make_model("mixtral")
    replace_routers(model, "competesmoe", competition_rate=1.0)
    calls = []
    model.model.layers[0].mlp.experts.register_forward_pre_hook(lambda m, a: calls.append(a[1]))
    model.train()(token_ids())
    assert len(calls) == EXPERTS + 1  # one call per expert for the responses, then the routed one
    assert [c.unique().tolist() for c in calls[:EXPERTS]] == [[e] for e in range(EXPERTS)]


def test_unkept_pairs_get_weight_zero() -> None:
    model = make_model("qwen3_moe")
    replace_routers(model, "top_p", top_k=EXPERTS, p=0.3)
    adapter = adapters(model)[0]
    x = torch.randn(50, 32)
    routing = adapter.router(x, EXPERTS)
    _, weights, _ = adapter(x)
    assert routing.keep is not None and not bool(routing.keep.all())
    assert torch.equal(weights == 0, ~routing.keep)


# ------------------------------------------------------------------- set_top_k


def experts_per_token(model, ids: torch.Tensor) -> set[int]:
    """The k each MoE block's experts module receives (the width of the indices it gets)."""
    seen: list[int] = []
    handles = [
        m.experts.register_forward_pre_hook(lambda _, args: seen.append(args[1].shape[-1]))
        for m in model.modules()
        if isinstance(m._modules.get("experts"), torch.nn.Module) and not isinstance(m, MoE)
    ]
    model(ids)
    for h in handles:
        h.remove()
    return set(seen)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_set_top_k_changes_the_experts_used(arch: str) -> None:
    model = make_model(arch)
    ids = token_ids()
    assert experts_per_token(model, ids) == {2}
    with set_top_k(model, 1):
        assert experts_per_token(model, ids) == {1}
        assert model.config.num_experts_per_tok == 1
    assert experts_per_token(model, ids) == {2}
    assert model.config.num_experts_per_tok == 2
    replace_routers(model, "hyperrouter")
    set_top_k(model, 3)  # not as a context: stays
    assert experts_per_token(model, ids) == {3}
    assert model.config.hyperrouter["routers"]["top_k"] == 3


@pytest.mark.parametrize("k", [0, EXPERTS + 1, 1.5, True])
def test_set_top_k_rejects_k_outside_1_to_e(k) -> None:
    model = make_model("mixtral")
    with pytest.raises(HyperRouterError) as excinfo:
        set_top_k(model, k)
    one_line(excinfo, f"[1, {EXPERTS}]")
    assert experts_per_token(model, token_ids()) == {2}  # nothing changed


def test_set_top_k_on_upcycled_model() -> None:
    model = upcycle(make_model("llama"), num_experts=4, top_k=2)
    with set_top_k(model, 4):
        assert {layer.mlp.moe.top_k for layer in model.model.layers} == {4}
    assert {layer.mlp.moe.top_k for layer in model.model.layers} == {2}
    with pytest.raises(HyperRouterError) as excinfo:
        set_top_k(model, 5)
    one_line(excinfo, "[1, 4]")


# ------------------------------------------------------------------- save, load, generate


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_save_and_load_pretrained_round_trip(arch: str, tmp_path) -> None:
    model = make_model(arch)
    router = "aux_free" if arch == "deepseek_v3" else "hyperrouter"
    replace_routers(model, router)
    with torch.no_grad():  # state that differs from a fresh router's
        for adapter in adapters(model):
            for p in adapter.parameters():
                p.add_(0.01 * torch.randn_like(p))
            if hasattr(adapter.router, "expert_bias"):
                adapter.router.expert_bias.copy_(torch.tensor([0.1, -0.1, 0.2, 0.0]))
    set_top_k(model, 3)
    ids = token_ids()
    before = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert {a.top_k for a in adapters(loaded)} == {3}
    assert torch.equal(loaded(ids).logits, before)  # the same tensors through the same code


def test_upcycled_model_round_trip(tmp_path) -> None:
    model = upcycle(make_model("gpt2"), num_experts=4, router="hash", top_k=2, noise=0.05)
    ids = token_ids()
    before = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert torch.equal(loaded(ids).logits, before)


def test_load_pretrained_needs_a_record(tmp_path) -> None:
    make_model("mixtral").save_pretrained(tmp_path)
    with pytest.raises(HyperRouterError) as excinfo:
        load_pretrained(tmp_path)
    one_line(excinfo, "no hyperrouter record")


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_generate_runs_with_replaced_routers(arch: str) -> None:
    model = make_model(arch)
    replace_routers(model, "hash" if arch == "olmoe" else "hyperrouter")
    ids = token_ids(length=4)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7)


def test_generate_runs_upcycled() -> None:
    model = upcycle(make_model("qwen3"), num_experts=4, top_k=2)
    out = model.generate(token_ids(length=4), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7)


def test_trainer_step_runs_and_calls_the_routers_step_hook(tmp_path) -> None:
    pytest.importorskip("accelerate")  # transformers' Trainer needs it
    model = make_model("mixtral")
    replace_routers(model, "aux_free", init="random")
    data = [{"input_ids": token_ids(seed=i)[0], "labels": token_ids(seed=i)[0]} for i in range(4)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
        use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, callbacks=[trainer_callback()]
    )
    result = trainer.train()
    assert result.global_step == 1
    # aux_free's bias moves once per optimizer step, by the load the step saw
    assert all(bool(a.router.expert_bias.ne(0).any()) for a in adapters(model))


def test_upcycled_trainer_step(tmp_path) -> None:
    pytest.importorskip("accelerate")
    model = upcycle(make_model("gpt2"), num_experts=4, router="switch", top_k=1)
    data = [{"input_ids": token_ids(seed=i)[0], "labels": token_ids(seed=i)[0]} for i in range(2)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
        use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    assert transformers.Trainer(model=model, args=args, train_dataset=data).train().global_step


# ------------------------------------------------------------------- upcycling


@pytest.mark.parametrize("arch", DENSE_ARCHS)
def test_upcycled_model_equals_the_dense_model_at_init(arch: str) -> None:
    model = make_model(arch)
    ids = token_ids()
    dense = model(ids).logits
    upcycle(model, num_experts=4, router="smoe", top_k=2)
    assert rel_err(model(ids).logits, dense) <= RTOL


def test_upcycling_copies_mlp_biases() -> None:
    model = make_model("llama", mlp_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mlp" in name and name.endswith("bias"):
                p.normal_(0.0, 0.1)
    ids = token_ids()
    dense = model(ids).logits
    upcycle(model, num_experts=3, top_k=2, granularity=2)
    assert model.model.layers[0].mlp.moe.experts.b_in is not None
    assert rel_err(model(ids).logits, dense) <= RTOL


@pytest.mark.parametrize("top_k", [2, 4])
def test_fine_grained_upcycling_equals_the_dense_model(top_k: int) -> None:
    model = make_model("qwen3")
    ids = token_ids()
    dense = model(ids).logits
    upcycle(model, num_experts=4, router="smoe", top_k=top_k, granularity=2)
    layer = model.model.layers[0].mlp.moe
    assert layer.num_experts == 8 and layer.experts.d_hidden == 24
    assert rel_err(model(ids).logits, dense) <= RTOL


def test_softmax_topk_upcycling_scale_is_exact_for_a_uniform_router() -> None:
    """He et al.'s E m^2 / k for softmax-then-top-k weights: exact when the router is uniform."""
    model = make_model("llama")
    ids = token_ids()
    dense = model(ids).logits
    upcycle(model, num_experts=4, router="smoe", top_k=2, score="softmax_topk")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.moe.router.gate.weight.zero_()
            layer.mlp.moe.router.gate.bias.zero_()
    assert rel_err(model(ids).logits, dense) <= RTOL


def test_upcycling_noise_is_seeded_and_small() -> None:
    ids = token_ids()
    base = make_model("llama")
    dense = base(ids).logits
    a = upcycle(copy.deepcopy(base), num_experts=4, noise=0.01, seed=3)
    b = upcycle(copy.deepcopy(base), num_experts=4, noise=0.01, seed=3)
    w_a, w_b = a.model.layers[0].mlp.moe.experts.w_in, b.model.layers[0].mlp.moe.experts.w_in
    assert torch.equal(w_a, w_b)
    assert not torch.equal(w_a[0], w_a[1])  # the copies differ
    assert 0 < rel_err(a(ids).logits, dense) < 0.05


def test_upcycled_losses_and_token_ids_reach_the_model() -> None:
    model = upcycle(make_model("llama"), num_experts=4, router="switch", top_k=1).train()
    ids = token_ids()
    out = model(ids, labels=ids)
    assert set(out.hyperrouter_aux_losses) == {"balance_loss"}
    expected = next_token_ce(out.logits, ids) + out.hyperrouter_aux_losses["balance_loss"]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    hashed = upcycle(make_model("gpt2"), num_experts=4, router="hash", top_k=1)
    hashed(ids)  # would fail without token ids: hash routes by token id


def test_gpt2_upcycling_uses_tanh_gelu() -> None:
    model = upcycle(make_model("gpt2"), num_experts=2, top_k=1)
    assert model.transformer.h[0].mlp.moe.experts.activation == "gelu_tanh"


# ------------------------------------------------------------------- the gelu_tanh experts


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in ("auto", "grouped_mm")])
def test_gelu_tanh_experts_match_a_per_token_loop(backend: str) -> None:
    torch.manual_seed(0)
    layer = MoE(8, 4, 12, 2, router="smoe", activation="gelu_tanh")
    x = torch.randn(10, 8, requires_grad=True)
    y = layer(x, backend=backend)
    ex = layer.experts
    routing = layer.router(x, 2)
    ref = torch.zeros_like(y)
    for t in range(10):
        for slot in range(2):
            e = int(routing.expert_ids[t, slot])
            h = F.gelu(x[t] @ ex.w_in[e] + ex.b_in[e], approximate="tanh")
            ref[t] += routing.weights[t, slot] * (h @ ex.w_out[e] + ex.b_out[e])
    assert rel_err(y, ref) <= RTOL
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, ex.w_in])
    grads_ref = torch.autograd.grad((ref * g).sum(), [x, ex.w_in])
    for a, b in zip(grads, grads_ref):
        assert rel_err(a, b) <= RTOL


def test_gelu_tanh_hand_written_backward_passes_gradcheck() -> None:
    torch.manual_seed(1)
    layer = MoE(6, 4, 5, 2, router="smoe", activation="gelu_tanh").double()
    x = torch.randn(5, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x, backend="grouped"), (x,))


# ------------------------------------------------------------------- bad input, one line each


def test_replace_routers_bad_input() -> None:
    with pytest.raises(HyperRouterError) as excinfo:
        replace_routers(make_model("llama"), "smoe")
    one_line(excinfo, "no MoE block", "Mixtral", "upcycle")
    model = make_model("mixtral")
    cases = [
        (dict(router="nope"), ["unknown router"]),
        (dict(router="smear"), ["merge"]),
        (dict(router="hyperrouter", init="native"), ["init='native'", "smoe"]),
        (dict(router="smoe", init="copy"), ["init must be"]),
        (dict(router="smoe", top_k=0), [f"[1, {EXPERTS}]"]),
        (dict(router="smoe", top_k=EXPERTS + 1), [f"[1, {EXPERTS}]"]),
        (dict(router="smoe", no_such_option=1), ["unknown option"]),
        (dict(router="smoe", init_std=torch.tensor(0.1)), ["JSON"]),
    ]
    for kwargs, words in cases:
        with pytest.raises(HyperRouterError) as excinfo:
            replace_routers(model, **kwargs)
        one_line(excinfo, *words)
    replace_routers(model, "smoe")
    with pytest.raises(HyperRouterError) as excinfo:
        replace_routers(model, "smoe")
    one_line(excinfo, "already replaced")


def test_replace_routers_options_an_architecture_cannot_honour() -> None:
    grouped = make_model("deepseek_v3", n_group=2, topk_group=1)
    with pytest.raises(HyperRouterError) as excinfo:
        replace_routers(grouped, "smoe")
    one_line(excinfo, "group-limited", "n_group=2", "topk_group=1")
    replace_routers(grouped, "smoe", init="random")  # a fresh router: routes without the limit
    with pytest.raises(HyperRouterError) as excinfo:
        replace_routers(make_model("gpt_oss"), "smoe", bias=False)
    one_line(excinfo, "GPT-OSS", "bias=True")


def test_unsupported_architecture_lists_the_supported_ones() -> None:
    class OtherTopKRouter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4, 8))
            self.top_k = 2

    block = torch.nn.Module()
    block.gate, block.experts = OtherTopKRouter(), torch.nn.Linear(8, 8)
    for call in (lambda: replace_routers(block, "smoe"), lambda: set_top_k(block, 1)):
        with pytest.raises(HyperRouterError) as excinfo:
            call()
        one_line(excinfo, "unsupported architecture", "OtherTopKRouter", "GPT-OSS")


def test_upcycle_bad_input() -> None:
    model = make_model("llama")
    cases = [
        (dict(num_experts=4, granularity=5), ["granularity 5", "48"]),
        (dict(num_experts=4, top_k=0), ["[1, 4]"]),
        (dict(num_experts=4, top_k=9, granularity=2), ["[1, 8]"]),
        (dict(num_experts=0), ["num_experts"]),
        (dict(num_experts=4, granularity=0), ["granularity"]),
        (dict(num_experts=4, noise=-1.0), ["noise"]),
    ]
    for kwargs, words in cases:
        with pytest.raises(HyperRouterError) as excinfo:
            upcycle(model, **kwargs)
        one_line(excinfo, *words)
    with pytest.raises(HyperRouterError) as excinfo:
        upcycle(make_model("mixtral"), num_experts=4)
    one_line(excinfo, "no MLP upcycle recognises", "Llama", "GPT-2")
    with pytest.raises(HyperRouterError) as excinfo:
        upcycle(make_model("llama", hidden_act="gelu_pytorch_tanh"), num_experts=4)
    one_line(excinfo, "GELUTanh", "SiLU")
