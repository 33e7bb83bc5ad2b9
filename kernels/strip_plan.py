"""The strip plan of the fused SVD kernels: their shapes, tile constants, and the block-size
model of NeuronMM eqs. 10-11 (what the kernels need while tracing; plain Python on
integers). Choosing a block size is `blocking`'s job, which runs the kernels.

The fused kernels (xuv.fused_xuv, mlp.up_gate, mlp.down) process the tokens in row
strips of `block_m` (BM) tokens. Per strip:

* stage 1 computes the whole (X U)^T strip [r, BM] into SBUF, in stage-1 sub-strips:
  the x^T of a sub-strip ([K, b]) sits in SBUF while U streams past it once; the
  sub-strip is as tall as SBUF allows next to the (X U)^T already cached (sub-strips
  shrink as the cache fills). U streams in *row slabs*: for one 128-row K tile, a group
  of `u_group_tiles(b)` r tiles (their 128-column tiles side by side, one DMA with
  `128 * tiles` contiguous columns per partition), as many as the 8 PSUM banks can
  accumulate for the b tokens at once (8 r tiles x 512 tokens, 16 x 256, 32 x 128, or
  4 x 1024, 2 x 2048, 1 x 4096). With one sub-strip per strip this is the paper's
  kernel exactly;
* stage 2 streams V in column blocks of `block_n` (up to 2048 columns, i.e. 4 KiB per
  partition) and multiplies the cached strip with each block; y leaves in whole
  `block_n`-wide rows ([S, N] layout) or whole strip-wide rows (y^T [N, S] layout).

So per strip HBM sees: x once, U once per sub-strip, V once, y once; and SBUF holds
the (X U)^T strip plus either the x^T sub-strip and two U slabs (stage 1) or two V
blocks and output tiles (stage 2).

Eq. 10 (arithmetic intensity of a strip, FLOP per HBM byte):

    AI(BM) = 2 BM R (K + N) / (e_x BM K + n_sub(BM) e_u K R + e_v R N + e_y BM N)

with R the sum of the ranks (gate and up for the MLP), e_* the element sizes.

Eq. 11 (peak SBUF bytes per partition), with e the compute element size,
nr = sum of ceil(r_i / 128), nk = ceil(K / 128), W the U slab width:

    stage 1, sub-strip j:  e nr (b_1 + ... + b_j) + e nk b_j + 2 e W(b_j)
    stage 2:               e nr BM + (double-buffered V blocks and output tiles)
    peak = max over both (`sbuf_peak_bytes` evaluates the exact terms).

Both are exact: the tests hold them equal to the emulator's counts of the very launch.
"""
from dataclasses import dataclass
from functools import lru_cache

from .sim.targets import get_target

P = 128                 # partitions / PE rows
MM_N = 512              # moving free size of one matmul (one fp32 PSUM bank)
PSUM_BANKS = 8
PSUM_FP32 = PSUM_BANKS * MM_N   # fp32 accumulators per partition in the whole PSUM
MAX_SUB_M = 2 * MM_N    # stage-1 sub-strip cap: U slabs of >= 4 r tiles (1 KiB/partition bf16)
HEADROOM = 0.05         # fraction of SBUF the planner never fills (compiler/runtime use)
BLOCK_N_CHOICES = (2048, 1024, 512, 256, 128)
X_TRANSPOSES = ("dma", "pe")
PE_ROW_BYTES = 4096     # "pe" transposing load: row blocks of 4 KiB per partition


def default_x_transpose(target) -> str:
    """The transposing load of x the kernels use on `target`: "dma" where the DMA
    transpose's throughput is documented (trn2: up to 90% of a copy), else "pe" (trn1:
    "much lower", no number; the performance guide recommends the tensor engine). The
    model's comparison of the two at the bracket's pessimistic end is
    `blocking.x_transpose_choice`."""
    return "dma" if get_target(target).dma_transpose_documented else "pe"


def pe_row_cols(K: int, e: int) -> int:
    """Columns of one row block of the "pe" transposing load: 4 KiB per partition (the
    DMA's full efficiency), a multiple of 128, at most K."""
    return min(K, max(P, PE_ROW_BYTES // e // P * P))


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
    x_transposed: bool = False   # x arrives as x^T [K, S] (mlp.down): plain DMA loads
    x_transpose: str = "dma"     # how x^T is made otherwise: "dma" or "pe" (X_TRANSPOSES)

    @property
    def nk(self) -> int:
        return ceil_div(self.K, P)

    @property
    def nr(self) -> int:
        return sum(ceil_div(r, P) for r in self.ranks)

    @property
    def R(self) -> int:
        return sum(self.ranks)


# -- stage 1: token chunks, PSUM groups, U slabs ---------------------------------------------

def token_slot(tb: int) -> int:
    """PSUM columns one r tile's accumulator for a chunk of a tb-token sub-strip takes:
    128 or 256 for short sub-strips (several r tiles then share a bank), else 512."""
    return P if tb <= P else (2 * P if tb <= 2 * P else MM_N)


def token_chunks(tb: int) -> int:
    """Matmul moving chunks (<= 512 tokens each) of a tb-token sub-strip."""
    return ceil_div(tb, token_slot(tb))


def u_group_tiles(tb: int) -> int:
    """r tiles accumulated together in stage 1 for a tb-token sub-strip: as many as the
    8 PSUM banks hold (8 x 512 tokens, 16 x 256, 32 x 128, 4 x 1024, ...)."""
    return max(1, PSUM_FP32 // (token_chunks(tb) * token_slot(tb)))


def u_group_cols(r: int, tb: int) -> int:
    """Width (columns) of the U slab tile for rank r: one DMA per K tile and group."""
    return P * min(u_group_tiles(tb), ceil_div(r, P))


@dataclass(frozen=True)
class StripPlan:
    shape: KernelShape
    block_m: int
    block_n: int          # V block width (columns), <= N
    budget: int           # bytes/partition the planner may fill
    whole_strip: bool = False    # the paper's kernel: one stage-1 sub-strip per strip

    def sub_heights(self, bm: int) -> tuple:
        """Stage-1 sub-strip heights for a strip of `bm` tokens."""
        if self.whole_strip:
            return (bm,)
        return sub_strip_heights(self.shape, bm, self.budget)

    def strips(self):
        """(start, height) of every strip."""
        S, bm = self.shape.S, self.block_m
        return tuple((s0, min(bm, S - s0)) for s0 in range(0, S, bm))


def n_slab_buffers(nk: int) -> int:
    """U slab buffers of stage 1: two (the next K tile's slab loads while this one is in
    use) unless there is a single K tile."""
    return 2 if nk >= 2 else 1


def stage1_bytes(ks: KernelShape, cum_prev: int, b: int) -> int:
    """Peak SBUF/partition while sub-strip b is loaded and projected, `cum_prev` tokens of
    the strip already cached: cache + x^T sub-strip + its (x u_i)^T pieces + the U slab
    buffers (fp32 x: plus two 128x128 blocks of the transposing load)."""
    e = ks.e
    base = e * ks.nr * cum_prev + e * ks.nk * b
    n_slabs = n_slab_buffers(ks.nk)
    # "pe" transposing load: two row blocks next to the x^T being filled
    peak = base + 2 * e * pe_row_cols(ks.K, e) if (ks.x_transpose == "pe"
                                                   and not ks.x_transposed) else 0
    pieces = 0
    for r in ks.ranks:
        pieces += e * ceil_div(r, P) * b
        peak = max(peak, base + pieces + n_slabs * e * u_group_cols(r, b))
    return peak


@lru_cache(maxsize=8192)
def sub_strip_heights(ks: KernelShape, bm: int, budget: int) -> tuple:
    """Greedy: each sub-strip as tall as SBUF allows next to the cache so far (a multiple
    of 128, at most MAX_SUB_M); never below 128 tokens (the emulator then rejects a
    block that cannot fit)."""
    heights, cum = [], 0
    e, n_slabs = ks.e, n_slab_buffers(ks.nk)
    while cum < bm:
        b = min(bm - cum, MAX_SUB_M)
        # stage1_bytes >= this linear bound (slabs >= 128 columns): skip what cannot fit
        bound = (budget - e * ks.nr * cum - n_slabs * e * P) // (e * (ks.nk + ks.nr))
        if b > bound:
            b = max(P, bound // P * P)
        while b > P and stage1_bytes(ks, cum, b) > budget:
            b = (b - 1) // P * P
        heights.append(b)
        cum += b
    return tuple(heights)


# -- stage 2 ------------------------------------------------------------------------------

def _n_blocks(ks, bn):
    return [min(bn, ks.N - n0) for n0 in range(0, ks.N, bn)]


def stage2_bytes(ks: KernelShape, bm: int, block_n: int, heights=None) -> int:
    """Exact stage-2 SBUF/partition for a strip of `bm` tokens split as `heights`: the
    cache plus stage 2's explicit buffers (xuv.n_buffers: two of each streamed tile when
    there is more than one) -- V blocks, output tiles, and the SiLU scratch of the MLP."""
    heights = heights if heights is not None else (bm,)
    bn = min(block_n, ks.N)
    blocks = _n_blocks(ks, bn)
    cache = ks.e * ks.nr * bm
    V = ks.e * ks.nr * bn
    if ks.out == "rows":
        O, G = ks.e_y * bn, 0
        n_o = len(blocks) * sum(ceil_div(h, P) for h in heights)
        n_g = 0
    else:
        O = ks.e_y * bm
        G = 4 * MM_N if ks.out == "silu_cols" else 0
        n_o = sum(ceil_div(nb, P) for nb in blocks)
        n_g = n_o * sum(ceil_div(h, MM_N) for h in heights) if G else 0
    two = lambda n: 2 if n >= 2 else 1   # noqa: E731
    return cache + two(len(blocks)) * V + two(n_o) * O + (two(n_g) * G if G else 0)


def choose_block_n(ks: KernelShape, bm: int, budget: int, whole_strip=False) -> int:
    """Widest V block (2048 ... 128 columns, at most N) whose stage 2 fits the budget."""
    heights = (bm,) if whole_strip else sub_strip_heights(ks, bm, budget)
    for bn in BLOCK_N_CHOICES:
        if stage2_bytes(ks, bm, bn, heights) <= budget:
            return min(bn, ks.N)
    return min(BLOCK_N_CHOICES[-1], ks.N)


def sbuf_budget(target="trn1") -> int:
    """Bytes per partition the kernels may fill: capacity less the headroom."""
    t = get_target(target)
    return int((1.0 - HEADROOM) * t.sbuf_bytes_per_partition)


def plan(ks: KernelShape, block_m: int, target="trn1", whole_strip=False) -> StripPlan:
    """Blocking the kernels use for `block_m` on `target` (whole_strip: the paper's
    kernel, one stage-1 sub-strip per strip whatever SBUF holds)."""
    if block_m < 1:
        raise ValueError(f"block_m must be >= 1, got {block_m}")
    return _plan(ks, int(block_m), get_target(target), bool(whole_strip))


@lru_cache(maxsize=4096)
def _plan(ks, block_m, t, whole_strip):
    budget = sbuf_budget(t)
    bm = min(block_m, ks.S)
    return StripPlan(ks, block_m, choose_block_n(ks, bm, budget, whole_strip), budget,
                     whole_strip)


def _distinct_strips(p: StripPlan):
    """{height: count} of the plan's strips (all full but maybe the last)."""
    out = {}
    for _, bm in p.strips():
        out[bm] = out.get(bm, 0) + 1
    return out


# -- eqs. 10-11 and derived totals ------------------------------------------------------

def sbuf_peak_bytes(ks: KernelShape, block_m: int, target="trn1") -> int:
    """Eq. 11: peak SBUF bytes per partition of the fused kernel (exact, as the
    emulator counts it)."""
    p = plan(ks, block_m, target)
    peak = 0
    for bm in _distinct_strips(p):
        heights = p.sub_heights(bm)
        cum = 0
        for b in heights:
            peak = max(peak, stage1_bytes(ks, cum, b))
            cum += b
        peak = max(peak, stage2_bytes(ks, bm, p.block_n, heights))
    return peak


def hbm_bytes(ks: KernelShape, block_m: int, target="trn1") -> tuple:
    """(read, write) HBM bytes of the whole launch."""
    p = plan(ks, block_m, target)
    n_sub = sum(len(p.sub_heights(bm)) * c for bm, c in _distinct_strips(p).items())
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
    strip = KernelShape(bm, ks.K, ks.ranks, ks.N, ks.e, ks.e_u, ks.e_v, ks.e_y, ks.out,
                        ks.x_transposed)
    r, w = hbm_bytes(strip, bm, target)
    return flops(strip) / (r + w)


# -- convenience constructors -------------------------------------------------------------

def xuv_shape(S, K, r, N, e=2, transpose_out=False, x_transpose="pe") -> KernelShape:
    """x_transpose: "pe" is trn1's default (`default_x_transpose`), "dma" trn2's."""
    return KernelShape(S, K, (r,), N, e, e, e, e, "cols" if transpose_out else "rows",
                       False, "pe" if e >= 4 else x_transpose)


def up_gate_shape(S, H, r_gate, r_up, I, e=2, x_transpose="pe") -> KernelShape:
    return KernelShape(S, H, (r_gate, r_up), I, e, e, e, e, "silu_cols", False,
                       "pe" if e >= 4 else x_transpose)


def down_shape(S, I, r, H, e=2) -> KernelShape:
    return KernelShape(S, I, (r,), H, e, e, e, e, "rows", True)
