"""CompeteSMoE: on a scheduled fraction of training calls every expert runs, each token goes to
the experts with the strongest responses, and the router is trained to predict that outcome.

Pham, Do, Nguyen, Nguyen, Liu, Sartipi, Nguyen, Ramasamy, Li, Hoi, Ho: "CompeteSMoE - Effective
Training of Sparse Mixture of Experts via Competition", arXiv 2402.02526 (v1); Nguyen, Nguyen,
Pham, Nguyen, Ramasamy, Ho: "CompeteSMoE - Statistically Guaranteed Mixture of Experts Training
via Competition", arXiv 2505.13380 (v2).

The router is a Linear(d_model, E) gate, h = W x + b. On a competition call (training only, each
call with probability `competition_rate`, drawn from torch's global generator so
torch.manual_seed fixes it) the MoE layer runs every expert on every token, detached, and hands
the responses y_te = E_e(x_t) to `route_by_responses`. The response score is

    r_te = |y_te|_2                  (response_score "norm", v1: the L2 norm of the output)
    r_te = mean_j softplus(y_te)_j   (response_score "softplus_mean", v2: mean softplus)

Each token takes its top-k experts by r (the winners W_t), with combine weights
softmax over the winners' scores, and the router loss

    router_loss = alpha * mean_{t, e} (softmax(h_t)_e - q_te)^2,
    q_te = softmax_{W_t}(r_t)_e for e in W_t, 0 elsewhere (detached),

pulls the router's full softmax toward the competition outcome. The combine weights come from
detached responses, so on a competition call the router learns only from the router loss (and
the balance loss, counted on the winners). Every other call is a plain top-k of the router (the
`score` option of every logit router; default top-k of the logits, softmax over the k, as the v1
gate) with the Switch balance loss.

Options (defaults): competition_rate 0.03 (the default of the v1 code's `--freq` in config.py;
14 of its 16 pretraining scripts pass `--freq 1.0`, every training call competing, one 0.03 and
one 0.09: set competition_rate=1.0 to run as those scripts do), response_score "norm" (v1),
router_loss_weight 5.0 (the v1 scripts' `alpha`), balance_loss_weight 0.01 (the scripts'
load_balance), z_loss_weight 0, score topk_softmax, renormalize False, bias True, init_std 0.02.

Cost: a competition call runs all E experts on every token (no gradient) before the k chosen run
again through the normal dispatch: E + k expert FFNs per token, on a `competition_rate` share of
training calls; evaluation never competes.

Differences from the papers / reference code, and why:
- The draw is per router call (per layer, per gradient-accumulation chunk), like v1's per-forward
  coin; v2's precomputed per-step schedule with warm-up and a cap on competing layers per
  iteration (`prob_flips`, `max_compete_in_iter`) is not reproduced.
- The target is v1's: softmax over the top-k scores, 0 elsewhere. v2 uses the softmax of all E
  affinities (and may add a top-k term); v2's combine weights are the winners' scores divided by
  their sum, here (as in v1) their softmax; v2's expert-diversity loss is not implemented.
- v1 compares the target with a softmax over an unsorted top-E of the gate logits (whose order is
  not the expert order); here it is the softmax over the logits in expert order, as the paper's
  formula intends.
- v1 replaces the gate's balance loss by the router loss on competition calls; here (as in v2)
  the balance loss stays, counted on the competition's winners, and the z-loss option applies to
  the router logits on every call.
- The responses are detached: on a competition call neither the combine weights (the softmax of
  the winners' scores) nor the router-loss target carry gradient into the experts, which learn
  only through the k winners' outputs. Both references keep the responses in the graph: v1
  (`custom_layers_opt.FMoEOpt`) mixes the outputs with the softmax of the winners' response
  norms and does not detach its MSE target, so the task loss and the router loss reach the
  experts through the norms; v2 detaches its router-loss target but mixes with weights computed
  from the responses and adds diversity and balance terms on them. The experts' gradients on
  competition calls therefore differ from both references' (we keep the competition a routing
  decision, as the papers describe it, at the cost of E extra expert forwards without backward).
- Four v1 scripts add `--opt_blance`: a Switch-style balance loss E sum_e f_e P_e on the softmax
  of the response norms (f_e: the winners' share), weighted 0.01 x alpha. Not implemented here.
- Responses are computed in full precision under autocast (the layer runs every router, and the
  experts' responses it asks for, in fp32); scores in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hyperrouter.routers.base import (
    LogitRouter,
    Routing,
    RoutingContext,
    check_option,
    init_linear_,
    register_router,
)
from hyperrouter.routers.losses import at_least_fp32

RESPONSE_SCORES = ("norm", "softplus_mean")


def response_scores(responses_TED: Tensor, kind: str) -> Tensor:
    """[T, E] score of each expert's response: its L2 norm (v1) or mean softplus (v2)."""
    y = at_least_fp32(responses_TED)
    if kind == "norm":
        return torch.linalg.vector_norm(y, dim=-1)
    return F.softplus(y).mean(-1)


def competition_target(scores_TE: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Winners [T, K] (top-k by score, best first), their weights (softmax over the winners'
    scores) and the router's target [T, E] (those weights at the winners, 0 elsewhere)."""
    values_TK, ids_TK = torch.topk(scores_TE, top_k, dim=-1, sorted=True)
    weights_TK = torch.softmax(values_TK, dim=-1)
    target_TE = torch.zeros_like(scores_TE).scatter(1, ids_TK, weights_TK)
    return ids_TK, weights_TK, target_TE


@register_router("competesmoe")
class CompeteSMoERouter(LogitRouter):
    """Linear router trained toward the experts' competition on a fraction of training calls."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        competition_rate: float = 0.03,
        response_score: str = "norm",
        router_loss_weight: float = 5.0,
        balance_loss_weight: float = 0.01,
        bias: bool = True,
        init_std: float = 0.02,
        **options,
    ) -> None:
        super().__init__(d_model, num_experts, balance_loss_weight=balance_loss_weight, **options)
        check_option(
            "competition_rate",
            competition_rate,
            isinstance(competition_rate, (int, float))
            and not isinstance(competition_rate, bool)
            and 0 <= competition_rate <= 1,
            "a number in [0, 1]",
        )
        check_option(
            "response_score",
            response_score,
            response_score in RESPONSE_SCORES,
            f"one of {', '.join(RESPONSE_SCORES)}",
        )
        check_option(
            "router_loss_weight",
            router_loss_weight,
            isinstance(router_loss_weight, (int, float))
            and not isinstance(router_loss_weight, bool)
            and router_loss_weight >= 0,
            "a number >= 0",
        )
        check_option(
            "init_std", init_std, isinstance(init_std, (int, float)) and init_std > 0, "> 0"
        )
        self.competition_rate = float(competition_rate)
        self.response_score = response_score
        self.router_loss_weight = float(router_loss_weight)
        self.gate = nn.Linear(d_model, num_experts, bias=bias)
        init_linear_(self.gate, init_std)

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        return self.gate(x_TD)

    def wants_expert_responses(self, ctx: RoutingContext) -> bool:
        """Compete on this call? Training only, with probability `competition_rate`."""
        if not ctx.training or self.competition_rate <= 0:
            return False
        if self.competition_rate >= 1:
            return True
        return bool(torch.rand(()) < self.competition_rate)

    def route_by_responses(
        self, x_TD: Tensor, ctx: RoutingContext, responses_TED: Tensor
    ) -> Routing:
        """Winners by response score; router loss toward them; balance loss on the winners."""
        logits_TE = self.scores(x_TD, ctx)
        scores_TE = response_scores(responses_TED.detach(), self.response_score)
        ids_TK, weights_TK, target_TE = competition_target(scores_TE, ctx.top_k)
        aux = self.aux_losses(logits_TE, ids_TK)
        if self.router_loss_weight > 0:
            probs_TE = torch.softmax(at_least_fp32(logits_TE), dim=-1)
            aux["router_loss"] = self.router_loss_weight * F.mse_loss(probs_TE, target_TE)
        return Routing(ids_TK, weights_TK, logits_TE, aux)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, competition_rate={self.competition_rate}, "
            f"response_score={self.response_score}"
        )
