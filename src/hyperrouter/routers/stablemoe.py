"""StableMoE: learn a balanced routing, distil it into a lightweight router, then freeze it.

Dai, Dong, Ma, Zheng, Sui, Chang, Wei: "StableMoE: Stable Routing Strategy for Mixture of
Experts", ACL 2022, arXiv 2204.08396.

Stage 1 (optimizer steps < `switch_step`): the backbone router scores s_{t,i} = x_t . c_i against
expert centroids c [E, d_model] and sends each token to its top expert (greedy, a_t = argmax_i
s_{t,i}), balanced by

    L_bal = alpha / T * sum_i (|A_i| - n) / n * sum_{t in A_i} sigmoid(s_{t,i}),  n = T / E,

where A_i is the set of tokens sent to expert i (overloaded experts get their scores pushed down,
underloaded ones up). Beside it a lightweight distilled router D (a word embedding of the token
id, d_distill = 50, against its own centroids) learns the stage-1 choice by cross-entropy:

    L_dis = beta * mean_t CE(softmax(D(token_t) . c'^T), a_t).

Stage 2 (steps >= `switch_step`): D routes (a_t = argmax_i D(token_t) . c'_i) and is frozen, so
each token id keeps its expert for the rest of training and at inference; no L_bal, no L_dis.

In both stages the output is sigmoid(s_{t,a_t}) * E_{a_t}(x_t): the block's residual adds x_t,
giving the paper's x_t + sigmoid(s) E(x_t).

Options: `switch_step` (default 40000: the paper switches after 10% of training, and 40000 is 10%
of this project's 400k-step Table 1 runs; set it to ~10% of `train.steps` for other runs),
`vocab_size` (set router_options.vocab_size to the model's vocabulary size to distil on token
ids, as the paper does; the model's token ids must then reach the layer), `distill_dim` (50, as
the reference code), `balance_loss_weight` alpha (0.3), `distill_loss_weight` beta (1: the paper
adds L_dis unweighted), `init_gain` (0.1: orthogonal init of both centroid sets, as the
reference code), `z_loss_weight` (0: the router z-loss, not in the paper), `detach_input` (False:
the paper's L_bal is a function of s = x . c, so it trains the layers below through x too; True
computes L_bal and the z-loss from sg(x) . c, so they train the centroids only, while the
routing and the combine weight sigmoid(x . c) are unchanged). At the enwik6 CPU preset (lr 4e-3,
global gradient clip 0.25) the paper's form collapses training to the unigram loss within ~100
steps and `detach_input: true` learns (docs/RESULTS.md section 7); the `stablemoe` method of
`hyperrouter compare` sets it.

Auxiliary losses: L_bal and L_dis in stage-1 training only. The router z-loss mean_t
logsumexp_i(s_{t,i})^2 (`z_loss_weight`) applies in both stages, in training and evaluation like
every router's z-loss, to the backbone scores s: they are the logits that keep training (through
the gate sigmoid(s) in stage 2 too), whereas the stage-2 routing logits (`Routing.logits`, the
frozen distilled router's) get no gradient. No Switch balance-loss option: L_bal is the paper's
balance loss (`balance_loss_weight`), and stage-2 routing is frozen, so no loss can balance it.

The stage only moves forward: it is the larger of the persistent buffer `stage` (1 or 2) and the
stage `ctx.step` implies when the trainer gives a step (2 once ctx.step >= switch_step).
`optimizer_step(load, step)` raises the buffer to the stage of step + 1, the next step to run
(`step` is the step just finished, the `ctx.step` of the forwards it follows), and never lowers
it. The buffer is saved in checkpoints, so a stage-2 checkpoint stays in stage 2 wherever it is
loaded: evaluated, resumed, or fine-tuned with a step counter that restarts at 0.

Differences from the paper / reference code, and why:
- Without `vocab_size` the distilled router reads a detached linear projection of the routed
  hidden state (D(x) = W x.detach(), W: d_model -> distill_dim) instead of the token's word
  embedding: for models that give no token ids. The detach keeps L_dis from moving the backbone;
  the stage-2 routing is then frozen as a function of x, not of the token id, so it is not the
  paper's fixed token -> expert map (it drifts as the layers below keep training).
- Frozen means detached: in stage 2 the distilled router's parameters enter the graph only
  through .detach(), so they get no gradient even though the optimizer holds them (weight decay
  in decoupled optimizers like AdamW could still shrink them; the routing is their argmax, which
  a uniform shrink does not change).
- The combine weight keeps using the backbone centroids in stage 2 (sigmoid(x . c_{a_t}), as the
  reference code does), so the centroids keep training through the gate value; only the choice
  of expert is frozen.
- Losses are means over tokens (the reference sums them and fairseq divides by the token count
  at the gradient, which is the same thing).
- ctx.top_k > 1 (the paper is top-1) takes the top k of the active router's scores; each pair
  is weighted by its own sigmoid score; the distillation target stays the top-1 choice and n
  becomes T * k / E.
- The reference evaluates with the distilled router even during stage 1; here evaluation uses
  the stage of the last optimizer step (the backbone in stage 1), so validation measures the
  routing that is being trained.
- Token ids outside [0, vocab_size) raise an error instead of indexing out of range. Token ids
  are needed only where the distilled router runs (stage-1 training, stage 2): a stage-1
  evaluation call without them routes by the backbone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hyperrouter.errors import HyperRouterError
from hyperrouter.routers.base import Router, Routing, RoutingContext, check_option, register_router
from hyperrouter.routers.losses import at_least_fp32, router_z_loss


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@register_router("stablemoe")
class StableMoERouter(Router):
    """Two-stage StableMoE: backbone routing + distillation, then the frozen distilled router."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        switch_step: int = 40000,
        vocab_size: int | None = None,
        distill_dim: int = 50,
        balance_loss_weight: float = 0.3,
        distill_loss_weight: float = 1.0,
        init_gain: float = 0.1,
        z_loss_weight: float = 0.0,
        detach_input: bool = False,
    ) -> None:
        super().__init__(d_model, num_experts)
        check_option(
            "switch_step", switch_step, _is_int(switch_step) and switch_step >= 0, "an integer >= 0"
        )
        check_option(
            "vocab_size",
            vocab_size,
            vocab_size is None or (_is_int(vocab_size) and vocab_size >= 1),
            "None or an integer >= 1",
        )
        check_option(
            "distill_dim", distill_dim, _is_int(distill_dim) and distill_dim >= 1, "an integer >= 1"
        )
        for name, value in (
            ("balance_loss_weight", balance_loss_weight),
            ("distill_loss_weight", distill_loss_weight),
            ("z_loss_weight", z_loss_weight),
        ):
            check_option(name, value, _is_number(value) and value >= 0, "a number >= 0")
        check_option(
            "init_gain", init_gain, _is_number(init_gain) and init_gain > 0, "a number > 0"
        )
        check_option("detach_input", detach_input, isinstance(detach_input, bool), "true or false")
        self.detach_input = detach_input
        self.switch_step = switch_step
        self.vocab_size = vocab_size
        self.balance_loss_weight = float(balance_loss_weight)
        self.distill_loss_weight = float(distill_loss_weight)
        self.z_loss_weight = float(z_loss_weight)
        self.centroids = nn.Parameter(
            nn.init.orthogonal_(torch.empty(num_experts, d_model), init_gain)
        )
        if vocab_size is None:
            self.distill_projection = nn.Linear(d_model, distill_dim, bias=False)
            nn.init.normal_(self.distill_projection.weight, 0.0, d_model**-0.5)
            self.distill_embedding = None
        else:
            self.distill_projection = None
            self.distill_embedding = nn.Embedding(vocab_size, distill_dim)
        self.distill_centroids = nn.Parameter(
            nn.init.orthogonal_(torch.empty(num_experts, distill_dim), init_gain)
        )
        self.register_buffer("stage", torch.tensor(1, dtype=torch.long))

    # ---------------------------------------------------------------- stage
    def stage_for(self, ctx: RoutingContext) -> int:
        """1 or 2: the saved stage, raised to 2 when ctx.step has reached switch_step."""
        saved = int(self.stage.item())
        if ctx.step is not None and ctx.step >= self.switch_step:
            return 2
        return saved

    def optimizer_step(self, load_E: Tensor, step: int) -> None:
        if step + 1 >= self.switch_step:
            self.stage.fill_(2)  # never back to 1: stage 2 is permanent

    # ---------------------------------------------------------------- scores
    def backbone_scores(self, x_TD: Tensor) -> Tensor:
        """s [T, E] = x . c^T in fp32 (fp64 for fp64 inputs)."""
        x_TD = at_least_fp32(x_TD)
        with torch.autocast(x_TD.device.type, enabled=False):  # fp32 even under autocast
            return x_TD @ self.centroids.to(x_TD.dtype).t()

    def distilled_logits(self, x_TD: Tensor, ctx: RoutingContext, frozen: bool) -> Tensor:
        """D . c'^T [T, E]; with `frozen` no gradient reaches the distilled router."""
        with torch.autocast(x_TD.device.type, enabled=False):  # fp32 even under autocast
            return self._distilled_logits(x_TD, ctx, frozen)

    def _distilled_logits(self, x_TD: Tensor, ctx: RoutingContext, frozen: bool) -> Tensor:
        dtype = at_least_fp32(x_TD).dtype
        centroids = self.distill_centroids.to(dtype)
        if self.distill_embedding is not None:
            if ctx.token_ids is None:
                raise HyperRouterError(
                    "router stablemoe has vocab_size set but got no token ids: pass token_ids "
                    "to the MoE layer, or leave router_options.vocab_size unset to distil on "
                    "hidden states"
                )
            ids = ctx.token_ids.long()
            table = self.distill_embedding.weight
            features = F.embedding(ids, table.detach() if frozen else table).to(dtype)
        else:
            weight = self.distill_projection.weight.to(dtype)
            features = F.linear(x_TD.detach().to(dtype), weight.detach() if frozen else weight)
        return features @ (centroids.detach() if frozen else centroids).t()

    def _check_token_ids(self, ctx: RoutingContext, num_tokens: int) -> None:
        ids = ctx.token_ids
        if ids.shape != (num_tokens,):
            raise HyperRouterError(
                f"stablemoe token ids must have shape [{num_tokens}], got {tuple(ids.shape)}"
            )
        if num_tokens and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise HyperRouterError(
                f"stablemoe token ids must be in [0, vocab_size={self.vocab_size}), got ids in "
                f"[{int(ids.min())}, {int(ids.max())}]; set router_options.vocab_size to the "
                f"model's vocabulary size"
            )

    # ---------------------------------------------------------------- forward
    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        ctx = self.context(ctx)
        if self.distill_embedding is not None and ctx.token_ids is not None:
            self._check_token_ids(ctx, x_TD.shape[0])  # every call: a bad vocab_size shows at once
        stage = self.stage_for(ctx)
        scores_TE = self.backbone_scores(x_TD)
        if stage == 2:
            logits_TE = self.distilled_logits(x_TD, ctx, frozen=True)
        else:
            logits_TE = scores_TE
        ids_TK = torch.topk(logits_TE.detach(), ctx.top_k, dim=-1).indices
        weights_TK = torch.sigmoid(scores_TE.gather(1, ids_TK))
        losses: dict[str, Tensor] = {}
        # L_bal and the z-loss see x through a stop-gradient with detach_input (centroids only)
        # (the same values; a second product only when a gradient could reach x)
        own_TE, own_TK = scores_TE, weights_TK
        if self.detach_input and x_TD.requires_grad and torch.is_grad_enabled():
            own_TE = self.backbone_scores(x_TD.detach())
            own_TK = torch.sigmoid(own_TE.gather(1, ids_TK))
        if ctx.training and stage == 1 and x_TD.shape[0] > 0:
            if self.balance_loss_weight > 0:
                losses["balance_loss"] = self.balance_loss_weight * self._balance_loss(
                    own_TK, ids_TK
                )
            if self.distill_loss_weight > 0:
                student_TE = self.distilled_logits(x_TD, ctx, frozen=False)
                target_T = scores_TE.detach().argmax(dim=-1)
                losses["distill_loss"] = self.distill_loss_weight * F.cross_entropy(
                    student_TE, target_T
                )
        if self.z_loss_weight > 0 and x_TD.shape[0] > 0:
            losses["z_loss"] = self.z_loss_weight * router_z_loss(own_TE)
        return Routing(ids_TK, weights_TK, logits_TE, losses)

    def _balance_loss(self, sigmoid_TK: Tensor, ids_TK: Tensor) -> Tensor:
        """1/T * sum_i (|A_i| - n) / n * sum_{(t, j) in A_i} sigmoid(s_{t,i}), n = T * k / E."""
        counts_E = torch.bincount(ids_TK.reshape(-1), minlength=self.num_experts)
        mean_load = ids_TK.numel() / self.num_experts
        excess_E = (counts_E.to(sigmoid_TK.dtype) - mean_load) / mean_load
        return (excess_E[ids_TK] * sigmoid_TK).sum() / ids_TK.shape[0]

    def extra_repr(self) -> str:
        source = "token ids" if self.vocab_size is not None else "hidden states"
        return f"{super().extra_repr()}, switch_step={self.switch_step}, distilled on {source}"
