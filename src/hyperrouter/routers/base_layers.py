"""BASE layers: token-to-expert routing as a balanced linear assignment.

Lewis, Bhosale, Dettmers, Goyal, Zettlemoyer: "BASE Layers: Simplifying Training of Large,
Sparse Models", ICML 2021, arXiv 2103.16716.

Each expert e has an embedding w_e (rows of `centroids` [E, d_model]); the affinity of token t and
expert e is s_{t,e} = x_t . w_e. In training the T tokens of the batch are assigned so that every
expert gets the same number of tokens and the total affinity is maximal:

    max_a sum_t s_{t,a_t}  subject to  |{t : a_t = e}| = T / E for every e;

at test time each token goes to its best expert, a_t = argmax_e s_{t,e}. The output is
x_t + sigmoid(s_{t,a_t}) E_{a_t}(x_t): the router gives the weight sigmoid(s_{t,a_t}), the MoE
layer computes weight * expert(x) and the block's residual adds x_t. There is no auxiliary loss
and no balancing hyper-parameter: balance is a constraint, not a penalty.

Auxiliary losses: the router z-loss on the affinities s [T, E] (`z_loss_weight`, default 0, not in
the paper), as for every router with logits. No balance-loss option: training routing is balanced
by construction, so in the Switch loss N * sum_i f_i P_i every f_i is 1/E (up to the T mod E extra
tokens) and the loss is the constant sum_i P_i = 1, which trains nothing.

Solvers (`solver`): "exact" solves the assignment with scipy's linear_sum_assignment on the
[T, T] matrix whose columns repeat each expert once per token it takes (O(T^3), on the CPU);
"auction" runs a vectorised auction algorithm (Bertsekas, with epsilon scaling) on the scores'
device, whose total score is within T * epsilon of the optimum (epsilon ends at 1e-3 of the
score range), with a greedy fill for tokens still unassigned after its iteration cap; "auto"
(default) uses "exact" up to `exact_max_tokens` tokens (default 512) and "auction" beyond.

Differences from the paper / reference code, and why:
- When E does not divide T, the first T mod E experts take one token more (the paper assumes
  equal shares; fairseq pads or truncates across workers).
- ctx.top_k > 1 (not in the paper, which is top-1): k successive balanced rounds, each giving
  every token one more expert it does not have yet, each optimal given the previous rounds (not
  jointly optimal); round j gives its extra T mod E tokens to experts j*(T mod E) ... onward
  (mod E), so over k rounds the first T*k mod E experts take one pair more. If a round cannot
  avoid giving a token an expert it already has (possible only when E does not divide T), that
  pair is dropped through the keep mask. Evaluation takes the top k by score.
- The reference shuffles tokens across data-parallel workers and assigns each worker's expert
  on the all-gathered scores with a C++ auction; here the assignment covers the tokens of one
  call of the layer (one micro-batch on one device).
- Expert embeddings are orthogonally initialised with gain 0.1 as in fairseq's BaseLayer.

Not causal: in training a token's expert depends on every other token of the batch, including
later tokens of its own sequence (the same holds for expert choice). Evaluation is causal and
deterministic (argmax), so train and test routing differ by design, as in the paper.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from hyperrouter.routers.base import Router, Routing, RoutingContext, check_option, register_router
from hyperrouter.routers.losses import at_least_fp32, router_z_loss

SOLVERS = ("auto", "exact", "auction")
AUCTION_EPS_FINAL = 1e-3  # final epsilon of the auction, relative to the score range
AUCTION_EPS_DECAY = 5.0
AUCTION_MAX_ITERS = 2000  # per epsilon phase; leftover tokens are then filled greedily


def balanced_capacities(num_tokens: int, num_experts: int, round_index: int = 0) -> Tensor:
    """[E] tokens each expert takes in one balanced round: T // E, plus one for T mod E experts
    starting at expert round_index * (T mod E) (mod E), so rounds rotate who takes the extras."""
    base, extra = divmod(num_tokens, num_experts)
    caps = torch.full((num_experts,), base, dtype=torch.long)
    caps[(round_index * extra + torch.arange(extra)) % num_experts] += 1
    return caps


def exact_assignment(scores_TE: Tensor, caps_E: Tensor) -> Tensor:
    """[T] expert of each token maximising the total score with exactly caps_E[e] tokens per e
    (scipy's linear_sum_assignment on the capacity-replicated [T, sum(caps)] matrix)."""
    scores = scores_TE.detach().double().cpu().numpy()
    columns = np.repeat(np.arange(scores.shape[1]), caps_E.cpu().numpy())
    rows, cols = linear_sum_assignment(scores[:, columns], maximize=True)
    experts = np.empty(scores.shape[0], dtype=np.int64)
    experts[rows] = columns[cols]
    return torch.from_numpy(experts).to(scores_TE.device)


def auction_assignment(
    scores_TE: Tensor,
    caps_E: Tensor,
    eps_final: float = AUCTION_EPS_FINAL,
    score_range: float | None = None,
    max_iters: int = AUCTION_MAX_ITERS,
) -> Tensor:
    """[T] expert of each token, exactly caps_E[e] tokens per expert, total score within
    T * eps_final * (score range) of the optimum (Jacobi auction with epsilon scaling).

    Every unassigned token bids for its best expert at current prices, raising that expert's price
    by its margin over its second-best expert plus epsilon; each expert keeps its caps_E[e] highest
    bids and its price becomes the lowest bid it keeps once full.
    """
    num_tokens, num_experts = scores_TE.shape
    device = scores_TE.device
    caps = caps_E.to(device)
    open_experts = (caps > 0).nonzero(as_tuple=True)[0]
    if open_experts.numel() == 1:
        return open_experts.expand(num_tokens).clone()
    scores = scores_TE.detach().double()[:, open_experts]
    caps = caps[open_experts]
    n_open = open_experts.numel()
    if score_range is None:
        score_range = float(scores.max() - scores.min())
    score_range = score_range or 1.0
    eps = score_range / 2
    eps_final = eps_final * score_range
    prices = scores.new_zeros(n_open)
    token_range = torch.arange(num_tokens, device=device)
    while True:
        owner = torch.full((num_tokens,), -1, dtype=torch.long, device=device)
        held_bid = scores.new_zeros(num_tokens)
        for _ in range(max_iters):
            bidders = (owner < 0).nonzero(as_tuple=True)[0]
            if bidders.numel() == 0:
                break
            values = scores[bidders] - prices
            top2 = values.topk(2, dim=1)
            best = top2.indices[:, 0]
            bids = prices[best] + top2.values[:, 0] - top2.values[:, 1] + eps
            holders = (owner >= 0).nonzero(as_tuple=True)[0]
            cand_tok = torch.cat([holders, bidders])
            cand_exp = torch.cat([owner[holders], best])
            cand_bid = torch.cat([held_bid[holders], bids])
            # rank candidates within each expert by bid, highest first
            order = torch.argsort(cand_bid, descending=True, stable=True)
            order = order[torch.argsort(cand_exp[order], stable=True)]
            sorted_exp = cand_exp[order]
            counts = torch.bincount(sorted_exp, minlength=n_open)
            starts = counts.cumsum(0) - counts
            rank = torch.arange(order.numel(), device=device) - starts[sorted_exp]
            kept = order[rank < caps[sorted_exp]]
            owner.fill_(-1)
            owner[cand_tok[kept]] = cand_exp[kept]
            held_bid[cand_tok[kept]] = cand_bid[kept]
            filled = torch.bincount(cand_exp[kept], minlength=n_open)
            lowest = torch.full_like(prices, float("inf")).scatter_reduce(
                0, cand_exp[kept], cand_bid[kept], reduce="amin"
            )
            prices = torch.where(filled >= caps, torch.maximum(prices, lowest), prices)
        if eps <= eps_final or bool((owner < 0).any()):
            break
        eps = max(eps / AUCTION_EPS_DECAY, eps_final)
    _greedy_fill(scores, caps, owner, token_range)
    return open_experts[owner]


def _greedy_fill(scores: Tensor, caps: Tensor, owner: Tensor, token_range: Tensor) -> None:
    """Give still unassigned tokens (auction iteration cap hit) their best expert with room."""
    left = caps - torch.bincount(owner[owner >= 0], minlength=caps.numel())
    for t in token_range[owner < 0].tolist():
        room = left > 0
        e = int(torch.where(room, scores[t], scores.new_tensor(float("-inf"))).argmax())
        owner[t] = e
        left[e] -= 1


def balanced_assignment(
    scores_TE: Tensor, top_k: int, solver: str = "exact"
) -> tuple[Tensor, Tensor | None]:
    """Experts [T, k] of a balanced assignment and the keep mask (None when no pair is dropped).

    k rounds; round j gives each token one expert it does not have yet, each expert taking the
    round's `balanced_capacities`, maximising the round's total score.
    """
    num_tokens, num_experts = scores_TE.shape
    scores = scores_TE.detach().double()
    # the auction's epsilon follows the range of the real scores, not of the penalised ones
    real_range = float(scores.max() - scores.min()) if scores.numel() else 0.0
    if solver == "exact":
        solve = exact_assignment
    else:
        solve = functools.partial(auction_assignment, score_range=real_range)
    # larger than any total score gain, so a round gives a token an expert it already has only
    # when no balanced round avoids it
    penalty = (float(scores.max() - scores.min()) + 1.0) * (num_tokens + 1)
    taken = torch.zeros_like(scores, dtype=torch.bool)
    ids_TK = torch.empty(num_tokens, top_k, dtype=torch.long, device=scores.device)
    keep_TK = torch.ones(num_tokens, top_k, dtype=torch.bool, device=scores.device)
    rows = torch.arange(num_tokens, device=scores.device)
    for j in range(top_k):
        caps = balanced_capacities(num_tokens, num_experts, j)
        round_scores = scores - penalty * taken if j else scores
        experts = solve(round_scores, caps)
        ids_TK[:, j] = experts
        keep_TK[:, j] = ~taken[rows, experts]
        taken[rows, experts] = True
    return ids_TK, None if bool(keep_TK.all()) else keep_TK


@register_router("base")
class BaseLayerRouter(Router):
    """BASE layers: balanced assignment in training, argmax in eval, weight sigmoid(x . w_e)."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        solver: str = "auto",
        exact_max_tokens: int = 512,
        init_gain: float = 0.1,
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(d_model, num_experts)
        check_option("solver", solver, solver in SOLVERS, f"one of {', '.join(SOLVERS)}")
        check_option(
            "exact_max_tokens",
            exact_max_tokens,
            isinstance(exact_max_tokens, int)
            and not isinstance(exact_max_tokens, bool)
            and exact_max_tokens >= 0,
            "an integer >= 0",
        )
        check_option(
            "init_gain",
            init_gain,
            isinstance(init_gain, (int, float))
            and not isinstance(init_gain, bool)
            and init_gain > 0,
            "a number > 0",
        )
        check_option(
            "z_loss_weight",
            z_loss_weight,
            isinstance(z_loss_weight, (int, float))
            and not isinstance(z_loss_weight, bool)
            and z_loss_weight >= 0,
            "a number >= 0",
        )
        self.solver = solver
        self.z_loss_weight = float(z_loss_weight)
        self.exact_max_tokens = exact_max_tokens
        self.centroids = nn.Parameter(
            nn.init.orthogonal_(torch.empty(num_experts, d_model), init_gain)
        )

    def solver_for(self, num_tokens: int) -> str:
        """The solver a training call on `num_tokens` tokens uses."""
        if self.solver != "auto":
            return self.solver
        return "exact" if num_tokens <= self.exact_max_tokens else "auction"

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        ctx = self.context(ctx)
        x_TD = at_least_fp32(x_TD)
        with torch.autocast(x_TD.device.type, enabled=False):  # fp32 even under autocast
            scores_TE = x_TD @ self.centroids.to(x_TD.dtype).t()
        keep_TK = None
        if ctx.training and x_TD.shape[0] > 0:
            solver = self.solver_for(x_TD.shape[0])
            ids_TK, keep_TK = balanced_assignment(scores_TE, ctx.top_k, solver)
        else:
            ids_TK = torch.topk(scores_TE.detach(), ctx.top_k, dim=-1).indices
        weights_TK = torch.sigmoid(scores_TE.gather(1, ids_TK))
        losses: dict[str, Tensor] = {}
        if self.z_loss_weight > 0 and x_TD.shape[0] > 0:
            losses["z_loss"] = self.z_loss_weight * router_z_loss(scores_TE)
        return Routing(ids_TK, weights_TK, scores_TE, losses, keep=keep_TK)

    def extra_repr(self) -> str:
        limit = self.exact_max_tokens
        return f"{super().extra_repr()}, solver={self.solver}, exact_max_tokens={limit}"
