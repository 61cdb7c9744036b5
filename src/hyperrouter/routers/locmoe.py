"""LocMoE: grouped average pooling + orthogonal cosine gate, a locality loss toward the experts on
the token's (virtual) node, and a minimum expert capacity from the largest token-to-gate angle.

Li, Sun, He, Zeng, Lin, Li, Zheng, Zhao, Chen: "LocMoE: A Low-overhead MoE for Large Language
Model Training", IJCAI 2024, arXiv 2401.13920. No official code is public; the formulas below are
ours where the paper's are not known here (marked "our choice").

Gate. GrAP (grouped average pooling) splits the d_model features of x into G contiguous groups and
averages each, g(x) in R^G (groups of d/G when G divides d, PyTorch's adaptive pooling bins
otherwise). The gate holds E expert vectors w_e in R^G, orthogonally initialised, and scores

    s_e(x) = cos(g(x), w_e) / tau = <g(x) / |g(x)|, w_e / |w_e|> / tau.

G defaults to E (our choice: the pooled feature then has one coordinate per expert and the
orthogonal gate is a square rotation of it; G >= E keeps the initial expert vectors exactly
orthonormal). tau = 0.1 is our choice: plain cosines (tau = 1) lie in [-1, 1], so the softmax
over them could never put more than e^2 / (e^2 + E - 1) on one expert.

Placement. Experts live on `num_nodes` virtual nodes, contiguously: node(e) = floor(e * N / E)
(= e // (E / N) when N divides E), or as given by `expert_nodes` (one node per expert, every node
holding at least one). A token's home node is its sequence id mod N (`ctx.sequence_ids`, as the
models pass them: a sequence lives on one data-parallel rank); without sequence ids, its position
in the call mod N.

Locality loss (our choice of form). With p = softmax(s) over all E and L(t) the experts on t's
home node,

    locality_loss = w_loc * (1/T) * sum_t 1[t has a kept pair off-node] * -log sum_{e in L(t)} p_te

Minus the log of the local probability mass, rather than KL(p || uniform over local experts),
because it pulls the mass onto the node without prescribing how it splits among the local experts
(that is left to the gate and the balance loss; a KL to the uniform would fight both, and is
infinite whenever p puts mass off-node). It counts only tokens that would really cross nodes, so
it is 0 when every token is routed on-node and adds no pull once a token is local.

Minimum capacity (our derivation; the paper's formula is not known here). Let delta be the largest
angle between a token's g(x) and the gate vector of an expert it selected in this call (the
router's "maximal angular deviation"), and A(t) = {e : angle(g(x_t), w_e) <= delta} the experts
within delta of t. A token with |A(t)| = k (it always has >= k: its k selected experts) has no
choice: any assignment that gives every token k experts within delta must send t to exactly
A(t). So expert e receives at least n_e = #{t : |A(t)| = k, e in A(t)} tokens, and

    C_min = max_e n_e

is a lower bound on the capacity with which no token has to be dropped or sent beyond delta.
The router's capacity is max(C_min, ceil(T k / E * capacity_factor)) (Switch's capacity, floored
at C_min; `min_capacity=False` drops the floor); pairs beyond it are dropped through
`Routing.keep`, every token's first choice before anyone's second (slots are in score order).

Statistics (not losses): `last_off_node_fraction`, the share of this call's kept (token, slot)
pairs whose expert is not on the token's home node (the inter-node traffic it would cost), and
`last_min_capacity`, C_min of the call; both detached, updated at every forward.

Options (defaults): num_groups None (= E, capped at d_model), temperature 0.1, num_nodes 2,
expert_nodes None (contiguous), locality_loss_weight 0.01 (our choice: the balance loss's
weight), capacity_factor 1.25 (training; ST-MoE's), eval_capacity_factor None (no limit: per-token,
causal evaluation), min_capacity True, score softmax_topk (Switch's gating, which LocMoE is
compared with), balance_loss_weight 0.01, z_loss_weight 0.

Differences from the paper, and why:
- Nodes are virtual: nothing is sent anywhere; the off-node fraction is what an expert-parallel
  All-to-All would have to move. Group-wise All-to-All and communication overlap are not modelled.
- The locality loss and the capacity lower bound are our formulations (above); the paper's exact
  forms are not known here.
- Measured limitation: a token's home node is its sequence's (data-parallel) placement, which
  the router's input (the token's hidden state) does not encode, so no content-based gate can
  route by it; the locality loss can only flatten the router toward both nodes. At the quick
  preset, k = 2, weights 0 / 0.01 / 0.1 / 1 left the off-node share at 0.49-0.50 while the
  router entropy rose from 0.35-0.38 to 2.55-2.56 nats and BPC worsened (docs/RESULTS.md
  section 7). A gate that sees the node (e.g. a per-node bias) would be needed; that is a
  different router, not built.
- The gate vectors are orthogonal at initialisation only (trained freely afterwards), and tau is
  fixed.
- Capacity counts the T tokens of one call, not a per-device group.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hyperrouter.routers.base import (
    LogitRouter,
    Routing,
    RoutingContext,
    check_option,
    register_router,
    select_experts,
)
from hyperrouter.routers.capacity import capacity_keep_mask, expert_capacity
from hyperrouter.routers.losses import at_least_fp32


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def contiguous_placement(num_experts: int, num_nodes: int) -> Tensor:
    """node(e) = floor(e * N / E): contiguous blocks of experts, sizes differing by at most 1."""
    return torch.arange(num_experts) * num_nodes // num_experts


def grouped_average_pool(x_TD: Tensor, num_groups: int) -> Tensor:
    """GrAP: [T, d] -> [T, G], the mean of each of G contiguous groups of features."""
    num_tokens, d_model = x_TD.shape
    if d_model % num_groups == 0:
        return x_TD.view(num_tokens, num_groups, d_model // num_groups).mean(-1)
    return F.adaptive_avg_pool1d(x_TD.unsqueeze(1), num_groups).squeeze(1)


def minimum_capacity(cos_TE: Tensor, ids_TK: Tensor) -> Tensor:
    """C_min = max_e #{t : exactly k experts within delta of t, e among them} (module docstring);
    delta is the largest angle of a selected pair, i.e. the smallest selected cosine."""
    num_tokens, top_k = ids_TK.shape
    if num_tokens == 0:
        return torch.zeros((), dtype=torch.long, device=ids_TK.device)
    cos_min = cos_TE.gather(1, ids_TK).min()
    admissible_TE = cos_TE >= cos_min
    forced_T = admissible_TE.sum(-1) <= top_k
    load_E = (admissible_TE & forced_T[:, None]).sum(0)
    return load_E.max()


@register_router("locmoe")
class LocMoERouter(LogitRouter):
    """LocMoE gate (GrAP + orthogonal cosine), virtual-node locality; see the module docstring."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        num_groups: int | None = None,
        temperature: float = 0.1,
        num_nodes: int = 2,
        expert_nodes: list[int] | None = None,
        locality_loss_weight: float = 0.01,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None = None,
        min_capacity: bool = True,
        score: str = "softmax_topk",
        renormalize: bool = False,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(
            d_model,
            num_experts,
            score=score,
            renormalize=renormalize,
            balance_loss_weight=balance_loss_weight,
            z_loss_weight=z_loss_weight,
        )
        groups = min(num_experts, d_model) if num_groups is None else num_groups
        check_option(
            "num_groups",
            num_groups,
            _is_int(groups) and 1 <= groups <= d_model,
            f"None or an integer in [1, d_model={d_model}]",
        )
        check_option(
            "temperature",
            temperature,
            _is_number(temperature) and temperature > 0,
            "a number > 0",
        )
        check_option(
            "num_nodes",
            num_nodes,
            _is_int(num_nodes) and 1 <= num_nodes <= num_experts,
            f"an integer in [1, num_experts={num_experts}]",
        )
        check_option(
            "locality_loss_weight",
            locality_loss_weight,
            _is_number(locality_loss_weight) and locality_loss_weight >= 0,
            "a number >= 0",
        )
        for name, value in (
            ("capacity_factor", capacity_factor),
            ("eval_capacity_factor", eval_capacity_factor),
        ):
            check_option(
                name,
                value,
                value is None or (_is_number(value) and value > 0),
                "a number > 0 or None (no limit)",
            )
        check_option("min_capacity", min_capacity, isinstance(min_capacity, bool), "True or False")
        if expert_nodes is None:
            nodes_E = contiguous_placement(num_experts, num_nodes)
        else:
            check_option(
                "expert_nodes",
                expert_nodes,
                isinstance(expert_nodes, (list, tuple))
                and len(expert_nodes) == num_experts
                and all(_is_int(n) and 0 <= n < num_nodes for n in expert_nodes),
                f"a list of num_experts={num_experts} node indices in [0, num_nodes={num_nodes})",
            )
            check_option(
                "expert_nodes",
                expert_nodes,
                set(expert_nodes) == set(range(num_nodes)),
                f"a placement giving each of the num_nodes={num_nodes} nodes an expert",
            )
            nodes_E = torch.tensor(list(expert_nodes), dtype=torch.long)
        self.num_groups = groups
        self.temperature = float(temperature)
        self.num_nodes = num_nodes
        self.locality_loss_weight = float(locality_loss_weight)
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.eval_capacity_factor = (
            None if eval_capacity_factor is None else float(eval_capacity_factor)
        )
        self.min_capacity = min_capacity
        self.register_buffer("expert_nodes", nodes_E, persistent=False)
        gate = torch.empty(num_experts, groups)
        nn.init.orthogonal_(gate)
        self.gate = nn.Parameter(gate)
        self.last_off_node_fraction = torch.zeros(())
        self.last_min_capacity = torch.zeros((), dtype=torch.long)

    def cosine_scores(self, x_TD: Tensor) -> Tensor:
        """cos(GrAP(x), w_e) [T, E] in fp32 (fp64 for fp64 inputs), even under autocast."""
        x_TD = at_least_fp32(x_TD)
        with torch.autocast(x_TD.device.type, enabled=False):
            pooled_TG = F.normalize(grouped_average_pool(x_TD, self.num_groups), dim=-1)
            gate_EG = F.normalize(self.gate.to(x_TD.dtype), dim=-1)
            return pooled_TG @ gate_EG.t()

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        return self.cosine_scores(x_TD) / self.temperature

    def home_nodes(self, num_tokens: int, ctx: RoutingContext, device: torch.device) -> Tensor:
        """[T] each token's node: sequence id mod N, or position in the call mod N."""
        if ctx.sequence_ids is not None:
            return torch.remainder(
                ctx.sequence_ids.to(device=device, dtype=torch.long), self.num_nodes
            )
        return torch.arange(num_tokens, device=device) % self.num_nodes

    takes_logit_residual = False  # the choice is from the cosines (and capacity), not `scores`

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        ctx = self.context(ctx)
        cos_TE = self.cosine_scores(x_TD)
        logits_TE = cos_TE / self.temperature
        ids_TK, weights_TK = select_experts(logits_TE, ctx.top_k, self.score, self.renormalize)
        if ctx.top_k > 1:  # slot order = score order, so capacity serves first choices first
            order_TK = weights_TK.detach().argsort(dim=-1, descending=True, stable=True)
            ids_TK, weights_TK = ids_TK.gather(1, order_TK), weights_TK.gather(1, order_TK)
        num_tokens = x_TD.shape[0]
        with torch.no_grad():
            min_cap = minimum_capacity(cos_TE.detach(), ids_TK)
        keep_TK = self.capacity_keep(ids_TK, ctx, int(min_cap))

        home_T = self.home_nodes(num_tokens, ctx, x_TD.device)
        local_TE = self.expert_nodes[None, :] == home_T[:, None]
        off_TK = ~local_TE.gather(1, ids_TK)
        if keep_TK is not None:
            off_TK = off_TK & keep_TK
        aux = self.aux_losses(logits_TE, ids_TK)
        if self.locality_loss_weight > 0 and num_tokens > 0:
            aux["locality_loss"] = self.locality_loss_weight * locality_loss(
                logits_TE, local_TE, off_TK.any(-1)
            )
        with torch.no_grad():
            kept = ids_TK.numel() if keep_TK is None else int(keep_TK.sum())
            self.last_off_node_fraction = off_TK.sum().float() / max(kept, 1)
            self.last_min_capacity = min_cap
        stats = {
            "off_node_fraction": self.last_off_node_fraction,
            "min_capacity": self.last_min_capacity.float(),
        }
        return Routing(ids_TK, weights_TK, logits_TE, aux, keep=keep_TK, stats=stats)

    def capacity_keep(self, ids_TK: Tensor, ctx: RoutingContext, min_cap: int) -> Tensor | None:
        """Keep mask of max(C_min, ceil(T k / E * factor)) per expert; None when unlimited."""
        factor = self.capacity_factor if ctx.training else self.eval_capacity_factor
        num_tokens, top_k = ids_TK.shape
        if factor is None or num_tokens == 0:
            return None
        capacity = expert_capacity(num_tokens, self.num_experts, top_k, factor)
        if self.min_capacity:
            capacity = max(capacity, min_cap)
        return capacity_keep_mask(ids_TK, self.num_experts, capacity)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_groups={self.num_groups}, num_nodes={self.num_nodes}, "
            f"capacity_factor={self.capacity_factor}"
        )


def locality_loss(logits_TE: Tensor, local_TE: Tensor, off_node_T: Tensor) -> Tensor:
    """(1/T) sum over the tokens routed off-node of -log(probability mass on their node)."""
    log_probs_TE = torch.log_softmax(at_least_fp32(logits_TE), dim=-1)
    log_local_T = torch.logsumexp(log_probs_TE.masked_fill(~local_TE, float("-inf")), dim=-1)
    per_token_T = torch.where(off_node_T, -log_local_T, torch.zeros_like(log_local_T))
    return per_token_T.sum() / max(logits_TE.shape[0], 1)
