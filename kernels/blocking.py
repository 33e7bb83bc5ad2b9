"""Block-size model of the fused SVD kernels (NeuronMM eqs. 10-11) and the selector
the kernels use by default.

The fused kernels (xuv.fused_xuv, mlp.up_gate, mlp.down) process the tokens in row
strips of `block_m` (BM) tokens. Per strip:

* stage 1 computes the whole (X U)^T strip [r, BM] into SBUF, in stage-1 sub-strips:
  the x^T of a sub-strip ([K, b]) sits in SBUF while every U tile streams past it
  once; the sub-strip is as tall as SBUF allows next to the (X U)^T already cached
  (sub-strips shrink as the cache fills). With one sub-strip per strip this is the
  paper's kernel exactly;
* stage 2 streams V in column blocks of `block_n` and multiplies the cached strip
  with each block.

So per strip HBM sees: x once, U once per sub-strip, V once, y once; and SBUF holds
the (X U)^T strip plus either the x^T sub-strip (stage 1) or two V blocks (stage 2).

Eq. 10 (arithmetic intensity of a strip, FLOP per HBM byte):

    AI(BM) = 2 BM R (K + N) / (e_x BM K + n_sub(BM) e_u K R + e_v R N + e_y BM N)

with R the sum of the ranks (gate and up for the MLP), e_* the element sizes.

Eq. 11 (peak SBUF bytes per partition), with e the compute element size,
nr = sum of ceil(r_i / 128), nk = ceil(K / 128):

    stage 1, sub-strip j:  e nr (b_1 + ... + b_j) + e nk b_j + 2 * 128 e
    stage 2:               e nr BM + (double-buffered V blocks and output tiles)
    peak = max over both (`sbuf_peak_bytes` evaluates the exact stage-2 term).

Selector: among the BMs (multiples of 128) whose strip clears `RIDGE_MARGIN` x the
roofline ridge (peak FLOP/s / HBM bytes/s: ~224 for bf16 on trn1) and whose peak
SBUF stays within the budget, (1 - HEADROOM) of capacity (the planner never fills
more, shrinking stage-1 sub-strips and V blocks to stay inside it), the one that moves
the fewest HBM bytes (`select_block_m`). The margin is 2 because the ridge
assumes HBM at full speed while every DMA also pays a fixed cost: a strip that only
just clears the ridge is DMA-bound in the emulator (and, in the paper's sweep, BM=256
was 45% slower than BM=512 on trn1).

Everything here is plain Python on integers: the kernels call it while tracing.
"""
from dataclasses import dataclass

from .sim.targets import get_target

P = 128                 # partitions / PE rows
MM_N = 512              # moving free size of one matmul (one fp32 PSUM bank)
MAX_SUB_M = 4 * MM_N    # stage-1 sub-strip cap: its accumulators use <= 4 of 8 banks
HEADROOM = 0.05        # fraction of SBUF the planner never fills (compiler/runtime use)
RIDGE_MARGIN = 2.0
BLOCK_N_CHOICES = (512, 256, 128)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KernelShape:
    """What the strip model needs to know about one fused kernel launch."""
    S: int
    K: int
    ranks: tuple          # one rank per (U, V) pair: (r,) or (r_gate, r_up)
    N: int
    e: int = 2            # compute element size (= x's)
    e_u: int = 2          # U, V and y element sizes in HBM
    e_v: int = 2
    e_y: int = 2
    out: str = "rows"     # "rows": y [S, N]; "cols": y^T [N, S]; "silu_cols": MLP gate/up

    @property
    def nk(self) -> int:
        return ceil_div(self.K, P)

    @property
    def nr(self) -> int:
        return sum(ceil_div(r, P) for r in self.ranks)

    @property
    def R(self) -> int:
        return sum(self.ranks)


@dataclass(frozen=True)
class StripPlan:
    shape: KernelShape
    block_m: int
    block_n: int
    budget: int           # bytes/partition the planner may fill

    def sub_heights(self, bm: int) -> tuple:
        """Stage-1 sub-strip heights for a strip of `bm` tokens."""
        return sub_strip_heights(self.shape, bm, self.budget)

    def strips(self):
        """(start, height) of every strip."""
        S, bm = self.shape.S, self.block_m
        return tuple((s0, min(bm, S - s0)) for s0 in range(0, S, bm))


def stage1_bytes(ks: KernelShape, cum: int, b: int) -> int:
    """SBUF/partition while sub-strip b is projected, `cum` tokens (incl. b) cached."""
    return ks.e * ks.nr * cum + ks.e * ks.nk * b + 2 * P * ks.e


def sub_strip_heights(ks: KernelShape, bm: int, budget: int) -> tuple:
    """Greedy: each sub-strip as tall as SBUF allows next to the cache so far (a multiple
    of 128, at most MAX_SUB_M); never below 128 tokens (the emulator then rejects a
    block that cannot fit)."""
    heights, cum = [], 0
    per_token = ks.e * (ks.nr + ks.nk)
    while cum < bm:
        room = budget - ks.e * ks.nr * cum - 2 * P * ks.e
        b = (room // per_token) // P * P if room > 0 else 0
        b = max(P, min(b, MAX_SUB_M))
        b = min(b, bm - cum)
        heights.append(b)
        cum += b
    return tuple(heights)


def _inner_iterations(ks: KernelShape, bm: int, block_n: int, heights) -> int:
    nb = min(block_n, ks.N)
    if ks.out == "rows":
        return sum(ceil_div(h, P) for h in heights)
    return ceil_div(nb, P) * sum(ceil_div(h, MM_N) for h in heights)


def stage2_bytes(ks: KernelShape, bm: int, block_n: int, heights=None) -> int:
    """Exact stage-2 SBUF/partition for a strip of `bm` tokens split as `heights`."""
    heights = heights if heights is not None else (bm,)
    cache = ks.e * ks.nr * bm
    n_blocks = ceil_div(ks.N, block_n)
    vblk = ks.e * ks.nr * block_n
    if ks.out == "rows":
        o, g = ks.e_y * block_n, 0
    else:
        o, g = ks.e_y * MM_N, (4 * MM_N if ks.out == "silu_cols" else 0)
    inner = _inner_iterations(ks, bm, block_n, heights)
    first = vblk + o + g + (max(o, g) if inner >= 2 else 0)
    later = 2 * vblk + o + g if n_blocks >= 2 else 0
    return cache + max(first, later)


def choose_block_n(ks: KernelShape, bm: int, budget: int) -> int:
    """Widest V block (512, 256 or 128 columns) whose stage 2 fits the budget."""
    heights = sub_strip_heights(ks, bm, budget)
    for bn in BLOCK_N_CHOICES:
        if stage2_bytes(ks, bm, bn, heights) <= budget:
            return bn
    return BLOCK_N_CHOICES[-1]


def sbuf_budget(target="trn1") -> int:
    """Bytes per partition the kernels may fill: capacity less the headroom."""
    t = get_target(target)
    return int((1.0 - HEADROOM) * t.sbuf_bytes_per_partition)


def plan(ks: KernelShape, block_m: int, target="trn1") -> StripPlan:
    """Blocking the kernels use for `block_m` on `target`."""
    t = get_target(target)
    if block_m < 1:
        raise ValueError(f"block_m must be >= 1, got {block_m}")
    budget = sbuf_budget(t)
    bm = min(block_m, ks.S)
    return StripPlan(ks, block_m, choose_block_n(ks, bm, budget), budget)


# -- eqs. 10-11 and derived totals ------------------------------------------------------

def sbuf_peak_bytes(ks: KernelShape, block_m: int, target="trn1") -> int:
    """Eq. 11: peak SBUF bytes per partition of the fused kernel (exact, as the
    emulator counts it)."""
    p = plan(ks, block_m, target)
    peak = 0
    for _, bm in p.strips()[:1] + p.strips()[-1:]:
        heights = p.sub_heights(bm)
        cum = 0
        for b in heights:
            cum += b
            peak = max(peak, stage1_bytes(ks, cum, b))
        peak = max(peak, stage2_bytes(ks, bm, p.block_n, heights))
    return peak


def hbm_bytes(ks: KernelShape, block_m: int, target="trn1") -> tuple:
    """(read, write) HBM bytes of the whole launch."""
    p = plan(ks, block_m, target)
    n_sub = sum(len(p.sub_heights(bm)) for _, bm in p.strips())
    n_strips = len(p.strips())
    read = (ks.e * ks.S * ks.K + n_sub * ks.e_u * ks.K * ks.R
            + n_strips * ks.e_v * ks.R * ks.N)
    write = ks.e_y * ks.S * ks.N
    return read, write


def flops(ks: KernelShape) -> int:
    return 2 * ks.S * ks.R * (ks.K + ks.N)


def arithmetic_intensity(ks: KernelShape, block_m: int, target="trn1") -> float:
    """Eq. 10: FLOP per HBM byte of one full strip of `block_m` tokens."""
    bm = block_m
    strip = KernelShape(bm, ks.K, ks.ranks, ks.N, ks.e, ks.e_u, ks.e_v, ks.e_y, ks.out)
    r, w = hbm_bytes(strip, bm, target)
    return flops(strip) / (r + w)


def candidate_blocks(ks: KernelShape, target="trn1"):
    """BM = 128, 256, ... while the plan fits the budget (and not beyond one strip)."""
    budget = sbuf_budget(target)
    bm = P
    while sbuf_peak_bytes(ks, bm, target) <= budget:
        yield bm
        if bm >= ks.S:
            return
        bm += P


def select_block_m(ks: KernelShape, target="trn1", objective="traffic",
                   ridge_margin=RIDGE_MARGIN) -> int:
    """Block size for the fused kernels.

    objective="traffic" (the default the kernels use): among the BMs that fit the
    budget and clear ridge_margin x the roofline ridge, the one with the fewest HBM
    bytes for this S (ties: the smaller). Above the ridge the modelled latency is
    flat in BM (the tensor engine bounds it, as in the paper's table 3 from 512 up),
    so the fewest bytes is the tie-break that costs nothing: it leaves DMA and HBM
    slack for everything else the model does not see.
    objective="ridge": the paper's rule taken literally, the smallest such BM.
    Small S: the whole S in one strip once BM >= S. If nothing clears the ridge,
    the largest BM that fits.
    """
    t = get_target(target)
    fits = list(candidate_blocks(ks, target))
    if not fits:
        return P
    if objective not in ("ridge", "traffic"):
        raise ValueError(f"objective must be 'ridge' or 'traffic', got {objective!r}")
    want = ridge_margin * t.ridge_flop_per_byte
    clearing = [bm for bm in fits if bm >= ks.S or arithmetic_intensity(ks, bm, target) >= want]
    if not clearing:
        return fits[-1]
    if objective == "ridge":
        return clearing[0]
    return min(clearing, key=lambda bm: (sum(hbm_bytes(ks, bm, target)), bm))


# -- convenience constructors -------------------------------------------------------------

def xuv_shape(S, K, r, N, e=2, transpose_out=False) -> KernelShape:
    return KernelShape(S, K, (r,), N, e, e, e, e, "cols" if transpose_out else "rows")


def up_gate_shape(S, H, r_gate, r_up, I, e=2) -> KernelShape:
    return KernelShape(S, H, (r_gate, r_up), I, e, e, e, e, "silu_cols")


def down_shape(S, I, r, H, e=2) -> KernelShape:
    return KernelShape(S, I, (r,), H, e, e, e, e, "rows")
