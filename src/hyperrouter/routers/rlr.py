"""RL-R: a router trained by REINFORCE, with a learned baseline and an entropy bonus.

Clark, de las Casas, Guy, Mensch et al.: "Unified Scaling Laws for Routed Language Models",
ICML 2022, arXiv 2202.01169 (RL-R); REINFORCE: Williams 1992.

The router is a policy pi(e | x) = softmax(W x + c) over the E experts. In training each token's k
experts are sampled from pi without replacement (torch.multinomial: sequential draws, each from
pi restricted to the experts not drawn yet), and the log-probability of each draw is recorded in
`Routing.log_probs`:

    log p(e_j | e_<j) = log pi(e_j) - log(1 - sum_{i<j} pi(e_i)),

so sum_j log p(e_j | e_<j) is the log-probability of the sampled (ordered) set. The reward is minus
the token's task loss l_t (the per-token LM loss the training step passes to
`token_loss_terms`); a learned baseline b_t = v . sg(x_t) + v_0 (Linear(d_model, 1) on the
detached routed representation) reduces the variance. The extra losses are

    policy_loss   = policy_weight  * mean_t( sum_j log p(e_j | e_<j) * sg(l_t - b_t) )
    baseline_loss = value_weight   * mean_t( (b_t - l_t)^2 )
    entropy_bonus = -entropy_weight * mean_t( H(pi_t) ),

so descending policy_loss is REINFORCE on E[l] (makes experts that did worse than the baseline
less likely), the baseline regresses toward the expected loss, and the entropy bonus keeps the
policy from collapsing early. In evaluation the experts are the greedy top k of pi.

Baseline (`baseline`): "learned" (default) is the Linear above, starting near 0: with Adam at a
small learning rate it needs many steps to reach an LM loss of a few nats, and until then the
advantage is about the loss itself (unbiased, but noisy). "both" adds the leave-one-out mean
loss of the call's other tokens, m_t = (sum_s l_s - l_t) / (T - 1), to the learned prediction
(b_t = m_t + v . sg(x_t) + v_0; the Linear then learns the per-token residual), which centres the
advantage from the first step; m_t leaves out l_t, so it adds no bias through token t's own
loss (only through attention, where t's choice reaches later tokens' losses, an O(1/T) effect).
"batch_mean" uses m_t alone (no baseline_loss).

Combine weights (`combine`): "policy" (default) uses pi renormalised over the chosen experts,
pi(e_j) / sum_i pi(e_i), which is exactly 1 at k = 1, so at the paper's top-1 the router learns
only through REINFORCE; at k > 1 the renormalised weights also pass the task gradient to the
router. "uniform" uses 1/k for every chosen expert (REINFORCE only, at any k).

Options (defaults): policy_weight 1.0, value_weight 1.0, entropy_weight 0.01 (our choice; Clark
et al.'s weights are not known here), combine "policy", baseline "learned", bias True and
init_std 0.02 (the same Linear gate as `smoe`), balance_loss_weight 0 and z_loss_weight 0 (the
Switch balance loss on the sampled experts and the router z-loss, shared with every logit
router; off by default), detach_input True.

Stop-gradient on the router input (`detach_input`, default True, our choice): the policy loss,
the entropy bonus and the optional balance and z losses are computed from W sg(x) + c, so they
train the gate only and send no gradient into the layers below; the routing itself, and at k > 1
the combine weights (which carry the task gradient to x and to W), are unchanged. With
`detach_input: false` the REINFORCE term also moves the backbone through x: at the enwik6 CPU
preset (lr 4e-3) that collapses training to the unigram loss within ~100 steps, while with the
stop-gradient the same run learns (docs/RESULTS.md section 7).

At k = E every expert is chosen whatever the draw, so the policy term only adds zero-mean noise
(the reward does not depend on the order of the draws); RL-R is meant for k << E.

Differences from the paper / reference code, and why:
- Clark et al.'s exact reward, baseline, balancing terms and combine weight are not known here
  (unverified: reward = minus the token's LM loss, with a baseline). The formulation follows the
  usual REINFORCE-with-baseline recipe (as in the SMEAR repository's `reinf_bl_routing`), with a
  squared-error baseline loss where SMEAR uses a Huber loss, and the entropy as a bonus
  (entropy_weight >= 0 always rewards entropy).
- The reward of a token is its own task loss, shared by all k of its experts and by every MoE
  layer of the model; there is no per-layer credit assignment, no discount, and no credit for
  the effect of a token's choice on later tokens' losses (through attention).
- No load-balancing term by default: the entropy bonus is the only pressure against collapse
  (balance_loss_weight adds the Switch loss, a capacity limit caps the load).
- Sampling uses torch's global generator (fixed by torch.manual_seed), not a per-layer seed.
- The stop-gradient on the router input for the policy and entropy terms (`detach_input`) is our
  choice (see above); the SMEAR repository's formulation detaches the baseline's input only.
- Router math runs in fp32 whatever the model dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hyperrouter.errors import HyperRouterError
from hyperrouter.routers.base import (
    Router,
    Routing,
    RoutingContext,
    check_option,
    init_linear_,
    register_router,
)
from hyperrouter.routers.losses import at_least_fp32, router_z_loss, switch_balance_loss

COMBINE_RULES = ("policy", "uniform")
BASELINES = ("learned", "both", "batch_mean")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sequential_log_probs(log_pi_TE: Tensor, ids_TK: Tensor) -> Tensor:
    """log p(e_j | e_<j) [T, K] of drawing ids_TK[:, j] from pi restricted to the experts not
    drawn before it (sampling without replacement, Plackett-Luce); differentiable in log_pi."""
    num_experts = log_pi_TE.shape[-1]
    chosen_TKE = F.one_hot(ids_TK, num_experts).bool()
    drawn_before_TKE = (chosen_TKE.cumsum(dim=1) - chosen_TKE.long()) > 0
    rest_TKE = log_pi_TE.unsqueeze(1).masked_fill(drawn_before_TKE, float("-inf"))
    return log_pi_TE.gather(1, ids_TK) - torch.logsumexp(rest_TKE, dim=-1)


@register_router("rlr")
class ReinforceRouter(Router):
    """RL-R: experts sampled from softmax(W x) in training, greedy in eval; REINFORCE losses."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        policy_weight: float = 1.0,
        value_weight: float = 1.0,
        entropy_weight: float = 0.01,
        combine: str = "policy",
        baseline: str = "learned",
        balance_loss_weight: float = 0.0,
        z_loss_weight: float = 0.0,
        bias: bool = True,
        init_std: float = 0.02,
        detach_input: bool = True,
    ) -> None:
        super().__init__(d_model, num_experts)
        for name, value in (
            ("policy_weight", policy_weight),
            ("value_weight", value_weight),
            ("entropy_weight", entropy_weight),
            ("balance_loss_weight", balance_loss_weight),
            ("z_loss_weight", z_loss_weight),
        ):
            check_option(name, value, _is_number(value) and value >= 0, "a number >= 0")
        check_option(
            "combine", combine, combine in COMBINE_RULES, f"one of {', '.join(COMBINE_RULES)}"
        )
        check_option("baseline", baseline, baseline in BASELINES, f"one of {', '.join(BASELINES)}")
        check_option("init_std", init_std, _is_number(init_std) and init_std > 0, "a number > 0")
        check_option("detach_input", detach_input, isinstance(detach_input, bool), "true or false")
        self.detach_input = detach_input
        self.policy_weight = float(policy_weight)
        self.value_weight = float(value_weight)
        self.entropy_weight = float(entropy_weight)
        self.balance_loss_weight = float(balance_loss_weight)
        self.z_loss_weight = float(z_loss_weight)
        self.combine = combine
        self.baseline_kind = baseline
        self.gate = nn.Linear(d_model, num_experts, bias=bool(bias))
        init_linear_(self.gate, init_std)
        self.baseline = nn.Linear(d_model, 1)
        init_linear_(self.baseline, init_std)
        # the last training forward's routing and baseline prediction, for token_loss_terms
        self._pending: tuple[Routing, Tensor, Tensor] | None = None

    @staticmethod
    def _linear(layer: nn.Linear, x_TD: Tensor) -> Tensor:
        bias = None if layer.bias is None else layer.bias.to(x_TD.dtype)
        with torch.autocast(x_TD.device.type, enabled=False):
            return F.linear(x_TD, layer.weight.to(x_TD.dtype), bias)

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        """Policy logits [T, E] in fp32 (fp64 for fp64 inputs), even under autocast."""
        return self._linear(self.gate, at_least_fp32(x_TD))

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        ctx = self.context(ctx)
        x32_TD = at_least_fp32(x_TD)
        logits_TE = self._linear(self.gate, x32_TD)
        # the policy's own losses see x through a stop-gradient with detach_input (gate only)
        # (the same values; a second product only when a gradient could reach x)
        if self.detach_input and x32_TD.requires_grad and torch.is_grad_enabled():
            policy_TE = self._linear(self.gate, x32_TD.detach())
        else:
            policy_TE = logits_TE
        log_pi_TE = torch.log_softmax(policy_TE, dim=-1)
        num_tokens, top_k = logits_TE.shape[0], ctx.top_k
        log_probs_TK = None
        if ctx.training:
            if num_tokens > 0:
                # a floor keeps every expert drawable when pi underflows to 0 (k <= E always works)
                probs_TE = log_pi_TE.detach().exp().clamp_min(1e-30)
                ids_TK = torch.multinomial(probs_TE, top_k, replacement=False)
            else:
                ids_TK = torch.zeros(0, top_k, dtype=torch.long, device=logits_TE.device)
            log_probs_TK = sequential_log_probs(log_pi_TE, ids_TK)
        else:
            ids_TK = torch.topk(logits_TE.detach(), top_k, dim=-1).indices
        if self.combine == "uniform":
            weights_TK = torch.full_like(ids_TK, 1.0 / top_k, dtype=logits_TE.dtype)
        elif top_k == 1:  # pi / pi is 1; without its rounding residue in the gradient
            weights_TK = torch.ones_like(ids_TK, dtype=logits_TE.dtype)
        else:
            weights_TK = torch.softmax(logits_TE.gather(1, ids_TK), dim=-1)
        aux: dict[str, Tensor] = {}
        if num_tokens > 0 and self.balance_loss_weight > 0:
            aux["balance_loss"] = self.balance_loss_weight * switch_balance_loss(policy_TE, ids_TK)
        if num_tokens > 0 and self.z_loss_weight > 0:
            aux["z_loss"] = self.z_loss_weight * router_z_loss(policy_TE)
        routing = Routing(ids_TK, weights_TK, logits_TE, aux, log_probs=log_probs_TK)
        if ctx.training:
            baseline_T = self._linear(self.baseline, x32_TD.detach()).squeeze(-1)
            routing.saved["baseline"] = baseline_T  # reachable from the model output (DDP)
            self._pending = (routing, baseline_T, policy_TE)
        return routing

    def token_loss_terms(self, routing: Routing, token_loss_T: Tensor) -> dict[str, Tensor]:
        """REINFORCE policy loss, baseline regression and entropy bonus from the per-token loss."""
        pending, self._pending = self._pending, None
        if pending is None or pending[0] is not routing or routing.log_probs is None:
            raise HyperRouterError(
                "rlr token_loss_terms needs the routing of this router's last training forward"
            )
        learned_T, policy_TE = pending[1], pending[2]
        loss_T = token_loss_T.detach().to(learned_T.dtype)
        if loss_T.shape != learned_T.shape:
            raise HyperRouterError(
                f"token_loss must have one loss per routed token ({learned_T.shape[0]}), "
                f"got shape {tuple(loss_T.shape)}"
            )
        count = max(loss_T.numel(), 1)
        baseline_T = self.baseline_values(learned_T, loss_T)
        advantage_T = (loss_T - baseline_T).detach()
        policy = (routing.log_probs.sum(-1) * advantage_T).sum() / count
        log_pi_TE = torch.log_softmax(policy_TE, dim=-1)
        entropy = -(log_pi_TE.exp() * log_pi_TE).sum() / count
        terms = {"policy_loss": self.policy_weight * policy}
        if self.baseline_kind != "batch_mean":
            value = (baseline_T - loss_T).square().sum() / count
            terms["baseline_loss"] = self.value_weight * value
        terms["entropy_bonus"] = -self.entropy_weight * entropy
        return terms

    def baseline_values(self, learned_T: Tensor, loss_T: Tensor) -> Tensor:
        """b_t under the `baseline` option from the learned prediction and the call's losses."""
        if self.baseline_kind == "learned":
            return learned_T
        num_tokens = loss_T.numel()
        if num_tokens > 1:
            others_T = (loss_T.sum() - loss_T) / (num_tokens - 1)  # leave-one-out mean
        else:
            others_T = torch.zeros_like(loss_T)
        return others_T if self.baseline_kind == "batch_mean" else others_T + learned_T

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, policy_weight={self.policy_weight}, "
            f"value_weight={self.value_weight}, entropy_weight={self.entropy_weight}, "
            f"combine={self.combine}, baseline={self.baseline_kind}, "
            f"detach_input={self.detach_input}"
        )
