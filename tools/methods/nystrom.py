"""`nystrom`: intermediate-channel selection with a Nyström-corrected down
projection (MoDeGPT's type-I module, Lin et al. 2024).

Each MLP keeps k of its I intermediate channels. With `z = act(x W_g) * (x W_u)`
the down projection's input and `C = Z^T Z` (float64, streamed over the
calibration windows), the channels are ranked by their ridge leverage scores
`diag(C (C + lambda I)^-1)` and the top k kept (set S). The down projection is
then refit on the kept channels, `W_d' = (C_SS + lambda' I)^-1 C_S: W_d` (a
Cholesky solve, never an explicit inverse), the least-squares fit of the full
output `Z W_d` from `Z_S`. gate and up simply lose the other channels' columns.

Loss estimate in the units of the `fisher` method's spectra: with `D` the
Fisher weights of the down projection's outputs (sensitivity.py), removing the
channels outside S costs

    tr(D W_d^T (C - C_:S C_SS^-1 C_S:) W_d D),

the Fisher-weighted output error the corrected layer leaves, exactly what the
fisher method's dropped squared singular values measure for a rank cut. Along
a fixed order the estimate for every k comes from one Cholesky factor of the
permuted C (`channel_losses`), so an allocator can compare "drop 128 channels
in layer 7" with "drop 128 rank in layer 12's up projection" (allocation/).

Ridges (relative to the mean diagonal of the matrix they regularize):
LEVERAGE_RIDGE for the leverage scores, SOLVE_RIDGE for the Nyström solve and
the loss estimate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import torch

from vllm_neuronmlp.tools import allocation as alloc
from vllm_neuronmlp.tools import sensitivity
from vllm_neuronmlp.tools import streaming as st
from vllm_neuronmlp.tools.methods.base import Capabilities, Context, LayerWeights, MemoryTerms, Method, weights_io
from vllm_neuronmlp.tools.whitening import FactorizationError, factorize

LEVERAGE_RIDGE = 1e-2  # lambda = 1e-2 x mean(diag C): scores of channels below that energy are damped
SOLVE_RIDGE = 1e-6  # lambda' = 1e-6 x mean(diag C): keeps the solve defined for dead channels


# ---------------------------------------------------------------- the math (float64)
def _ridge(c: torch.Tensor, rel: float) -> float:
    mean = float(c.diagonal().mean())
    return rel * (mean if mean > 0 else 1.0)


def ridge_leverage_scores(c: torch.Tensor, rel_ridge: float = LEVERAGE_RIDGE) -> torch.Tensor:
    """`diag(C (C + lambda I)^-1)` of a PSD matrix, lambda = rel_ridge x mean diagonal."""
    c = c.to(torch.float64)
    lam = _ridge(c, rel_ridge)
    evals, evecs = torch.linalg.eigh(c)
    evals = evals.clamp_min(0)
    return (evecs.pow(2) * (evals / (evals + lam))[None, :]).sum(1)


def leverage_order(c: torch.Tensor, rel_ridge: float = LEVERAGE_RIDGE) -> torch.Tensor:
    """Channel indices by decreasing ridge leverage score (ties by index)."""
    scores = ridge_leverage_scores(c, rel_ridge)
    return torch.tensor(sorted(range(scores.numel()), key=lambda j: (-float(scores[j]), j)), dtype=torch.long)


ORDER_BLOCK = 128  # removals per lazy batch of loss_aware_order (the GEMM's inner dimension)
_ORDER_ROWS = 1024  # rows per GEMM when a lower triangle is updated block row by block row


def loss_aware_order(c: torch.Tensor, w_down_io: torch.Tensor, out_weights: Optional[torch.Tensor] = None,
                     rel_ridge: float = SOLVE_RIDGE) -> torch.Tensor:
    """Channel indices, most valuable first, by greedy backward elimination on the
    loss itself: from all channels, repeatedly drop the one whose removal loses
    the least of the Fisher-weighted output `Z W_d D` explained after the
    Nyström refit (the quantity `channel_losses` subtracts); the order is the
    reverse of the removals. Every prefix is then a loss-aware kept set, where
    the leverage order ranks channels by their own energy alone.

    With `A = C + lambda' I`, `B = C W_d D` and, over the kept set, `G = A_SS^-1`,
    `M = G B_S` and `N = M M^T`, dropping channel j loses `N[j, j] / G[j, j]`.
    Removing j (pivot p = G_jj, g = G[:, j], n = N[:, j]) is a rank-one
    downdate of G, `G - g g^T / p` (the Optimal Brain Surgeon step applied to
    channels), and a symmetric rank-two one of N,
    `N - (g n^T + n g^T) / p + g g^T N_jj / p^2`. The criterion needs only the
    two diagonals, updated in O(I) per step, and the pivot's columns, each the
    stored column minus the pending corrections (O(I k) for k of them); so the
    downdates are applied lazily, ORDER_BLOCK removals at a time, as GEMMs
    (lazy batched updates as in GPTQ's blocked scheme), after which
    the removed rows and columns are filled from the tail and the matrices
    shrink. Only lower triangles are updated. Every step makes the exact greedy
    choice of the rank-one version (same argmin in exact arithmetic; exact
    ties go to the lowest channel index).

    Cost, float64 on the input's device: Cholesky and inverse of A (~I^3
    flops), B, M and N (5 I^2 H), the batched downdates (~I^3) and the
    per-step column work (~1.5 I^2 ORDER_BLOCK, matrix-vector), where the
    rank-one version read and wrote all of G and M (~16 I (I + H) bytes) in
    each of its I - 1 steps. Peak memory besides C
    and W_d: max(27 I^2 + 16 I H, 16 I^2 + 8 I H) bytes (A, its factor and the
    factor's finiteness check, 11 I^2, with W_d D and B; then G, N and M)."""
    c = c.to(torch.float64)
    dev = c.device
    wt = w_down_io.to(device=dev, dtype=torch.float64)
    if out_weights is not None:
        wt = wt * out_weights.to(wt)[None, :]
    n = c.shape[0]
    b = c @ wt
    a = c.clone()
    a.diagonal().add_(_ridge(c, rel_ridge))
    chol = _cholesky(a, "intermediate channels' correlation")
    del a
    g = torch.cholesky_inverse(chol)
    del chol
    g = g if g.stride(-1) == 1 else g.mT  # symmetric: read it row-major
    m = g @ b
    del b, wt
    nn = torch.zeros(n, n, dtype=torch.float64, device=dev)
    for r0 in range(0, n, _ORDER_ROWS):  # lower triangle of M M^T
        r1 = min(r0 + _ORDER_ROWS, n)
        nn[r0:r1, :r1].addmm_(m[r0:r1], m[:r1].T, beta=0.0)
    del m
    alive = torch.arange(n, device=dev)  # the channel held in each row
    dg, dn = g.diagonal().clone(), nn.diagonal().clone()
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=dev)
    removed: List[int] = []
    size = n
    while size > 1:
        steps = min(ORDER_BLOCK, size - 1)
        us = torch.zeros(size, steps, dtype=torch.float64, device=dev)  # G = stored - us us^T
        vs = torch.zeros_like(us)  # N = stored - us vs^T - vs us^T
        kept = torch.ones(size, dtype=torch.bool, device=dev)
        picks: List[int] = []
        for k in range(steps):
            lost = torch.where(kept, dn / dg, inf)
            j = int(torch.argmin(torch.where(lost == lost.min(), alive, n)))  # exact ties: lowest channel
            kept[j] = False
            picks.append(j)
            p, n_jj = dg[j].clone(), dn[j].clone()
            g_j = _order_row(g, j, size).addmv_(us[:, :k], us[j, :k], alpha=-1.0)
            n_j = (_order_row(nn, j, size).addmv_(us[:, :k], vs[j, :k], alpha=-1.0)
                   .addmv_(vs[:, :k], us[j, :k], alpha=-1.0))
            u = g_j / p.sqrt()
            v = n_j / p.sqrt() - u * (n_jj / (2 * p))  # u v^T + v u^T is N's rank-two downdate
            us[:, k], vs[:, k] = u, v
            dg.addcmul_(u, u, value=-1.0)
            dn.addcmul_(u, v, value=-2.0)
        removed += alive[torch.tensor(picks, device=dev)].tolist()
        new = size - steps
        holes = torch.nonzero(~kept[:new]).squeeze(1)
        fill = torch.nonzero(kept[new:]).squeeze(1) + new
        for mat in (g, nn):
            _order_fill_(mat, holes, fill, new)
        for t in (us, vs, alive):
            t[holes] = t[fill]
        size, us, vs, alive = new, us[:new], vs[:new], alive[:new]
        _order_lower_update_(g, us, us, size)
        _order_lower_update_(nn, torch.cat([us, vs], 1), torch.cat([vs, us], 1), size)
        dg, dn = g.diagonal()[:size].clone(), nn.diagonal()[:size].clone()
    return torch.tensor([int(alive[0])] + removed[::-1], dtype=torch.long, device=dev)


def _order_row(mat: torch.Tensor, j: int, size: int) -> torch.Tensor:
    """Row j of the symmetric matrix whose lower triangle is mat[:size, :size]."""
    return torch.cat([mat[j, :j], mat[j:size, j]])


def _order_lower_update_(mat: torch.Tensor, left: torch.Tensor, right: torch.Tensor, size: int) -> None:
    """The lower triangle of mat[:size, :size] -= left right^T, block row by block row."""
    for r0 in range(0, size, _ORDER_ROWS):
        r1 = min(r0 + _ORDER_ROWS, size)
        mat[r0:r1, :r1].addmm_(left[r0:r1], right[:r1].T, alpha=-1.0)


def _order_fill_(mat: torch.Tensor, holes: torch.Tensor, fill: torch.Tensor, new: int) -> None:
    """Move channels `fill` (rows >= new) into the rows and columns `holes` (< new)
    of the symmetric matrix held in mat's lower triangle; mat[:new, :new] then
    holds the kept channels."""
    if holes.numel() == 0:
        return
    cols = torch.arange(new, device=mat.device)
    cols[holes] = fill
    rows = mat.index_select(0, fill)
    among = rows[:, fill]  # fill x fill: lower triangle valid (fill ascending)
    r = rows[:, cols]  # valid except in the hole columns, which among fills
    r[:, holes] = among.tril() + among.tril(-1).T
    mat[holes, :new] = r
    mat[:new, holes] = r.T


def _cholesky(a: torch.Tensor, what: str) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0 or not torch.isfinite(factor).all():
        raise FactorizationError(f"{what}: not positive definite even with the ridge")
    return factor


def nystrom_down(c: torch.Tensor, w_down_io: torch.Tensor, keep: torch.Tensor,
                 rel_ridge: float = SOLVE_RIDGE) -> torch.Tensor:
    """The corrected down projection `(C_SS + lambda' I)^-1 C_S: W_d` [k, out]
    (W_d as [in, out]); `keep` the kept channel indices, in the order their rows
    appear in the result."""
    c = c.to(torch.float64)
    c_ss = c[keep][:, keep].clone()
    c_ss.diagonal().add_(_ridge(c, rel_ridge))
    rhs = c[keep] @ w_down_io.to(torch.float64)
    return torch.cholesky_solve(rhs, _cholesky(c_ss, "kept intermediate channels' correlation"))


def channel_losses(c: torch.Tensor, w_down_io: torch.Tensor, order: torch.Tensor,
                   out_weights: Optional[torch.Tensor] = None, rel_ridge: float = SOLVE_RIDGE) -> torch.Tensor:
    """`losses[k]` (k = 0..I): the estimated loss of keeping the first k channels
    of `order`, `tr(Wt^T (C - C_:S (C_SS + lambda' I)^-1 C_S:) Wt)` with `Wt = W_d D`
    (D = diag(out_weights), identity when None) and lambda' on the whole C.
    With the Cholesky factor `L` of the permuted `C + lambda' I`, the explained
    part for the first k channels is the squared norm of the first k rows of
    `L^-1 P Wt` (P the permuted C), so every k costs one triangular solve.
    Cost, on the input's device: the Cholesky factor (I^3 / 3 flops), C Wt
    (2 I^2 H) and the solve (I^2 H). Peak memory besides C and W_d:
    max(27 I^2 + 16 I H, 8 I^2 + 40 I H) bytes (the permuted C, its factor and
    the factor's finiteness check, 11 I^2, with C Wt and Wt; then the factor
    and I x H matrices)."""
    c = c.to(torch.float64)
    order = order.to(c.device)
    wt = w_down_io.to(device=c.device, dtype=torch.float64)
    if out_weights is not None:
        wt = wt * out_weights.to(wt)[None, :]
    cw = c @ wt
    total = float((wt * cw).sum())
    reg = c[order[:, None], order[None, :]]  # P C P^T in one gather
    reg.diagonal().add_(_ridge(c, rel_ridge))
    chol = _cholesky(reg, "intermediate channels' correlation")
    del reg
    g = torch.linalg.solve_triangular(chol, cw[order], upper=False)  # P C Wt = (C Wt) permuted
    explained = torch.cat([torch.zeros(1, dtype=torch.float64, device=c.device), g.pow(2).sum(1).cumsum(0)])
    losses = (total - explained).clamp_min(0)
    losses[-1] = 0.0  # all channels kept: the layer is unchanged (no ridge is applied)
    return losses


# ---------------------------------------------------------------- statistics
@dataclass
class ChannelStats:
    """Per decoder layer: channel order (most valuable first) and the loss
    estimate of keeping the first k channels, k = 0..I (fisher units)."""

    order: Dict[int, torch.Tensor] = field(default_factory=dict)
    losses: Dict[int, List[float]] = field(default_factory=dict)
    fisher: Dict[str, torch.Tensor] = field(default_factory=dict)  # {module: F [out]}
    spectra: Dict[str, List[float]] = field(default_factory=dict)  # Fisher-weighted (hybrid only)
    # --scope all: {"<layer>.self_attn.qkv": spectrum of [W_q W_k W_v] with one shared U} (sensitivity.py)
    fused_qkv_spectra: Dict[str, List[float]] = field(default_factory=dict)


def channel_statistics(ctx: Context, with_spectra: bool = False, loss_aware: bool = False) -> ChannelStats:
    """Fisher diagonals (and, `with_spectra`, the Fisher-weighted spectra) from
    the sensitivity pass; in the same sweep, while each layer is in memory, its
    C (the down projection's input Gram on the same Fisher windows) gives the
    channel order (ridge leverage, or `loss_aware_order` when `loss_aware`) and
    its loss curve."""
    sk, o = ctx.sk, ctx.opts

    def order_layer(i, layer, grams, fisher):
        with ctx.meter.measure("channel_order"):
            c = grams[st.DOWN].matrix
            w_down = sk.projection(layer, st.DOWN).weight.detach().T
            d = sensitivity.output_weights(fisher[sk.module_names(i)[st.DOWN]])
            order = loss_aware_order(c, w_down, d) if loss_aware else leverage_order(c)
            return {"order": order.cpu(), "losses": channel_losses(c, w_down, order, d).tolist()}

    ids = ctx.calib.fisher_windows(o.fisher_samples)
    sens = sensitivity.sensitivity_pass(sk, ctx.src, ids, o.progress, with_spectra, o.damping, on_layer=order_layer,
                                        state=ctx.state, meter=ctx.meter)
    out = ChannelStats(fisher=sens.fisher, spectra=sens.spectra, fused_qkv_spectra=sens.fused_qkv_spectra)
    for i, layer_stats in sorted(sens.per_layer.items()):
        out.order[i], out.losses[i] = layer_stats["order"], layer_stats["losses"]
    return out


# ---------------------------------------------------------------- the factor pass
def pruned_weights(ctx: Context, layer, c: torch.Tensor, keep: torch.Tensor) -> Dict[str, torch.Tensor]:
    """{role: W as [in, out]} of a layer narrowed to the channels `keep` (sorted),
    the down projection Nyström-corrected (attention projections, when targeted, unchanged)."""
    w = weights_io(ctx, layer)
    return {**w, st.GATE: w[st.GATE][:, keep], st.UP: w[st.UP][:, keep], st.DOWN: nystrom_down(c, w[st.DOWN], keep)}


def kept_channels(order: torch.Tensor, width: int) -> torch.Tensor:
    return torch.sort(order[:width]).values


class NystromFactorizer:
    """Streams the calibration windows through the dense layers. A layer with a
    width below I is narrowed to the first `width` channels of the statistics'
    order, its down projection refit on all calibration windows; then the
    projections in `todo` are factored at the layer's (reduced) shape, whitened
    by their inputs (the kept channels' C for down) and output-weighted by the
    Fisher weights `out_scales` {module: d [out]} when given (the hybrid)."""

    def __init__(self, ctx: Context, stats: ChannelStats, out_scales: Optional[Mapping[str, torch.Tensor]] = None):
        self.ctx, self.stats = ctx, stats
        self.out_scales = out_scales or {}
        self.x = st.embed(ctx.sk, ctx.src, ctx.calib.windows)
        self.runner = st.LayerRunner(ctx.sk, ctx.calib.windows.shape[1])

    def stream_state(self) -> Dict[str, torch.Tensor]:
        """The streamed hidden states after the last layer (what a resumed pass needs)."""
        return {"x": self.x.cpu()}

    def restore_stream(self, state: Dict[str, torch.Tensor]) -> None:
        self.x = state["x"].to(self.x.device)

    def __call__(self, i, layer, todo) -> LayerWeights:
        sk = self.ctx.sk
        width = self.ctx.widths.get(i, sk.intermediate)
        if width >= sk.intermediate and not todo:
            for sl in st.chunks(self.x.shape[0], self.x.shape[1]):
                self.x[sl] = self.runner.run(layer, self.x[sl])["out"]
            return LayerWeights(None, {}, {})
        grams = st.input_grams(sk, self.runner, layer, self.x)
        acc_z = grams[st.DOWN]
        keep = None
        if width < sk.intermediate:
            keep = kept_channels(self.stats.order[i], width).to(acc_z.matrix.device)
        if keep is None:
            w, c = weights_io(self.ctx, layer), acc_z.matrix
        else:
            w, c = pruned_weights(self.ctx, layer, acc_z.matrix, keep), acc_z.matrix[keep][:, keep]
        names = sk.module_names(i)
        factors = {}
        if todo:
            acc_z.matrix = c  # the kept channels' correlation whitens the narrowed down projection
            chol = self.ctx.cholesky_factors(i, grams, todo)
            for role, r in todo.items():
                d = self.out_scales.get(names[role])
                if d is not None and keep is not None and role in (st.GATE, st.UP):
                    d = d.to(keep.device)[keep]
                f = factorize(w[role], r, chol[role], out_scale=d)
                factors[role] = (f.u.float(), f.v.float())
        dense = {} if keep is None else {role: w[role].T.float().contiguous() for role in st.ROLES
                                         if role not in todo}
        return LayerWeights(keep, dense, factors)


class Nystrom(Method):
    name = "nystrom"
    # the factorizer narrows each layer, so its output is a LayerWeights and its allocation a Plan of widths
    capabilities = Capabilities(attention_allocations=(), scope_note="it keeps MLP channels only", narrows=True,
                                keeps_architecture=True, factorizer_returns=LayerWeights,
                                memory=MemoryTerms(fisher_pass=True, channel_order=True))
    loss_aware = False  # MoDeGPT's ridge leverage order; the hybrid orders by the loss

    def statistics_key(self, opts):
        return ("channels", self.loss_aware, opts.fisher_samples)

    def check_budget(self, ctx: Context) -> None:
        sk = ctx.sk
        alloc.width_budget(list(range(sk.num_layers)), sk.hidden, sk.intermediate, ctx.opts.ratio, ctx.opts.block_size)

    def statistics(self, ctx: Context) -> ChannelStats:
        # the Fisher-weighted spectra cost little beside the sensitivity pass; the hybrid needs them
        return channel_statistics(ctx, with_spectra=True, loss_aware=self.loss_aware)

    def candidates(self, ctx: Context, stats: ChannelStats):
        o = ctx.opts
        ctx.calib.info["fisher_samples"] = min(o.fisher_samples, int(ctx.calib.windows.shape[0]))
        layers = list(range(ctx.sk.num_layers))
        hidden, inter = ctx.sk.hidden, ctx.sk.intermediate
        if o.rank_allocation == "uniform":
            widths = alloc.allocate_widths_uniform(layers, hidden, inter, o.ratio, o.block_size)
            return {"channels-uniform": alloc.Plan({}, widths)}
        losses = {i: stats.losses[i] for i in layers}
        widths = alloc.allocate_widths_greedy(layers, hidden, inter, losses, o.ratio, o.block_size)
        return {"channels-greedy": alloc.Plan({}, widths)}

    def choose(self, ctx, stats, candidates):
        (name, plan), = candidates.items()
        return plan, {"chosen": name, "note": "channel widths by ridge leverage order; "
                                              + ("even over the layers" if name.endswith("uniform")
                                                 else "greedy by estimated loss (Fisher units)")}

    def factorizer(self, ctx: Context, stats):
        return NystromFactorizer(ctx, stats)


METHOD = Nystrom()
