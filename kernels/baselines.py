"""The kernels the fused ones are measured against.

Two families (docs/kernels.md, "Baselines"):

Our improved baselines (what we compare ourselves against):
* `dense_xw(x, w)`: y = x @ w, blocked in the manner of AWS's "fully optimized" NKI
  matmul tutorial: all three dims blocked (BLOCK_M = 16 x 128 tokens, BLOCK_N = 2 x
  512 columns, BLOCK_K = 8 x 128), the whole [BLOCK_M, BLOCK_N] result block kept in
  SBUF while the K blocks stream past (double-buffered), each K block's partial product
  folded into it on the vector engine. The M blocks (the only loop whose trip count
  grows with S) run in a `nl.dynamic_range` hardware loop, as in the fused kernels.
  Differences from the tutorial: an outer loop over M blocks (the tutorial keeps every M
  row of a column block in SBUF, which spills at large S), fp32 SBUF accumulators (the
  tutorial accumulates in the input dtype), any shape (edges masked), and x taken in its
  natural [S, K] layout through the target's transposing load (`xuv.load_transposed`).
* `sequential_xuv(x, u, v)`: the two-matmul low-rank linear: t = x @ u written to HBM,
  read back, y = t @ v -- each a `dense_xw`-style matmul, in one launch.
* `naive_fused_xuv(x, u, v)`: the strawman of the paper's Table 1, a fused kernel that
  caches nothing across output blocks: every [block_m, block_n] block of y recomputes
  (x u)^T for its block_m tokens (U streamed again) before multiplying by its V columns.
  The block sizes of the authors' version are not published; 128 x 512 (one PE tile by
  one PSUM bank) is our assumption.

The paper's baselines as measured (NeuronMM; `paper_launches`), to check the cost model
against its tables:
* `tutorial_matmul(lhsT, rhs)`: the tutorial's tiling itself, with the block sizes of the
  copy the paper's authors ran (their public repository, NeuronMM: 8 x 128 rows per M
  block where the tutorial has 16): for each N block, bf16 accumulators for ALL M rows in
  SBUF (16 M bytes per partition; spilled by the emulator when they do not fit), the K
  blocks outside the M blocks, lhsT (the activations, transposed) stationary, rhs (the
  weight) moving;
* `transpose(x)`: a separate transpose launch: row blocks loaded, 128x128 tensor-engine
  transposes, transposed rows stored;
* the sequences the paper timed, each launch after the previous one has finished (a
  barrier between launches): NKI XW = transpose x, matmul, transpose y; NKI XUV =
  transpose x, matmul, transpose (x u), matmul, transpose y; the fused kernel with its
  output transposed (y^T) and the whole strip's x^T loaded at once (`whole_strip`).

Traffic of our dense_xw: x (as x^T) is re-read once per column block of w, w once per
M block.
"""
from dataclasses import dataclass

from . import strip_plan
from .nki_compat import jit, nisa, nl, target_name
from .xuv import (MM_N, P, Buffers, TransposeScratch, _cdiv, _stage1, _stage2_rows, check_dims,
                  fused_xuv, load_transposed, n_buffers, over_strips, x_transpose_for,
                  xuv_kernel_shape)

TILES_M, TILES_N, TILES_K = 16, 2, 8


def _blocks(dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K); 4-byte inputs halve BLOCK_M to fit SBUF."""
    tm = TILES_M if dtype != nl.float32 else TILES_M // 2
    return tm * P, TILES_N * MM_N, TILES_K * P


def _kblock(xT, wb, acc, accs, mb, nb, kb, first):
    """acc[:, mt, :] (+)= x[m block, k block] @ w[k block, n block] for one K block:
    128-token tiles of x^T stationary, 512-column tiles of w moving, partial sums over
    the block's k tiles in fp32 PSUM (two one-bank tiles), then folded into the SBUF
    accumulator."""
    nkt = _cdiv(kb, P)
    for c0 in nl.static_range(0, nb, MM_N):
        cw = min(MM_N, nb - c0)
        for mt in nl.static_range(_cdiv(mb, P)):
            mp = min(P, mb - mt * P)
            ps = accs.next()
            for kt in nl.static_range(nkt):
                kp = min(P, kb - kt * P)
                nisa.nc_matmul(dst=ps[0:mp, 0:cw], stationary=xT[0:kp, kt, mt * P:mt * P + mp],
                               moving=wb[0:kp, kt, c0:c0 + cw], accumulate=(kt > 0))
            dst = acc[0:mp, mt, c0:c0 + cw]
            if first:
                nisa.tensor_copy(dst=dst, src=ps[0:mp, 0:cw])
            else:
                nisa.tensor_tensor(dst=dst, data1=dst, data2=ps[0:mp, 0:cw], op=nl.add)


def _m_block(x, w, y, strip, block_n, block_k):
    """All result blocks of one M block (strip.height tokens): for each column block the
    K blocks stream through (x^T and w blocks double-buffered), the [BLOCK_M, BLOCK_N]
    result stays in SBUF (fp32), then leaves tile by tile."""
    M, K = x.shape
    N = w.shape[1]
    mb = strip.height
    nkb = _cdiv(K, block_k)
    ncb = _cdiv(N, block_n)
    acc = nl.ndarray((P, _cdiv(mb, P), block_n), dtype=nl.float32, buffer=nl.sbuf, name="acc")
    xTs = Buffers("xT_block", (P, block_k // P, mb), x.dtype, n_buffers(nkb * ncb))
    wbs = Buffers("w_block", (P, block_k // P, block_n), x.dtype, n_buffers(nkb * ncb))
    outs = Buffers("y_tile", (P, block_n), y.dtype, n_buffers(ncb * _cdiv(mb, P)))
    accs = Buffers("ps", (P, MM_N), nl.float32, 2, buffer=nl.psum, bank=0)
    how = x_transpose_for(x.dtype)
    scratch = TransposeScratch(x.dtype, 2, block_k) if how == "pe" else None
    for n0 in nl.static_range(0, N, block_n):
        nb = min(block_n, N - n0)
        for k0 in nl.static_range(0, K, block_k):
            kb = min(block_k, K - k0)
            xT = xTs.next()
            load_transposed(xT, lambda g0, n, kk, kc, k0=k0: strip.rows(x, g0, n, k0 + kk, kc),
                            mb, kb, x.dtype, how, scratch)
            wb = wbs.next()
            for kt in nl.static_range(_cdiv(kb, P)):
                ks = k0 + kt * P
                kp = min(P, k0 + kb - ks)
                nisa.dma_copy(dst=wb[0:kp, kt, 0:nb], src=w[ks:ks + kp, n0:n0 + nb])
            _kblock(xT, wb, acc, accs, mb, nb, kb, k0 == 0)
        for mt in nl.static_range(_cdiv(mb, P)):
            mp = min(P, mb - mt * P)
            o = outs.next()
            nisa.tensor_copy(dst=o[0:mp, 0:nb], src=acc[0:mp, mt, 0:nb])
            nisa.dma_copy(dst=strip.rows(y, mt * P, mp, n0, nb), src=o[0:mp, 0:nb])


def blocked_matmul(x, w, y):
    """y[M, N] = x[M, K] @ w[K, N], all in HBM (the tutorial-style blocked matmul); the
    M blocks run in a hardware loop (`xuv.over_strips`)."""
    M = x.shape[0]
    block_m, block_n, block_k = _blocks(x.dtype)
    over_strips(M, min(block_m, M), lambda strip: _m_block(x, w, y, strip, block_n, block_k))


@jit
def dense_xw(x, w):
    """y [S, N] = x [S, K] @ w [K, N] (the dense baseline). Output dtype = x's."""
    S, K = x.shape
    check_dims("dense_xw", K=(w.shape[0], K))
    y = nl.ndarray((S, w.shape[1]), dtype=x.dtype, buffer=nl.shared_hbm)
    blocked_matmul(x, w, y)
    return y


@jit
def sequential_xuv(x, u, v):
    """y = (x @ u) @ v as two blocked matmuls, x @ u written to HBM and read back."""
    S, K = x.shape
    r = u.shape[1]
    check_dims("sequential_xuv", K=(u.shape[0], K), r=(v.shape[0], r))
    t = nl.ndarray((S, r), dtype=x.dtype, buffer=nl.hbm, name="xu_scratch")
    blocked_matmul(x, u, t)
    y = nl.ndarray((S, v.shape[1]), dtype=x.dtype, buffer=nl.shared_hbm)
    blocked_matmul(t, v, y)
    return y


@jit
def naive_fused_xuv(x, u, v, block_m=128, block_n=512):
    """y = (x @ u) @ v recomputing x @ u for every output block (see the module doc)."""
    shape = xuv_kernel_shape("naive_fused_xuv", x, u, v, "rows")
    S, N = shape.S, shape.N
    plan = strip_plan.plan(shape, block_m, target_name())
    y = nl.ndarray((S, N), dtype=x.dtype, buffer=nl.shared_hbm)

    def strip_body(strip):
        for n0 in nl.static_range(0, N, block_n):
            parts = _stage1(x, (u,), strip, plan, False)
            _stage2_rows(parts, v, y, block_n, strip, columns=(n0, min(block_n, N - n0)))

    over_strips(S, min(block_m, S), strip_body)
    return y


# -- the paper's baselines as measured ------------------------------------------------------

# The authors' copy of nki_matmul_fully_optimized_ (NeuronMM, profiler/nki_profiler.py and
# test_speedup.py; called as kernel(x.t(), w.t())) defaults to 8 / 2 / 8 tiles per block;
# AWS's tutorial to 16 / 2 / 8. Only BLOCK_M differs: it sizes the lhsT tiles (not the bytes
# moved), so it decides only where the all-M accumulators start to spill.
TUTORIAL_TILES_M, TUTORIAL_TILES_N, TUTORIAL_TILES_K = 8, 2, 8


@jit
def tutorial_matmul(lhsT, rhs):
    """result [M, N] = lhsT[K, M].T @ rhs[K, N], tiled as AWS's "fully optimized" NKI
    matmul tutorial as the paper ran it: BLOCK_M = 8 x 128, BLOCK_N = 2 x 512, BLOCK_K =
    8 x 128; for each N block the accumulators of ALL M rows stay in SBUF in the input
    dtype (bf16), the K blocks run outside the M blocks, each K block's PSUM partial sums
    are added into them on the vector engine; then the N block's rows leave through a
    packed tile. The N blocks run in a hardware loop. Edges are masked."""
    K, M = lhsT.shape
    N = rhs.shape[1]
    check_dims("tutorial_matmul", K=(rhs.shape[0], K))
    result = nl.ndarray((M, N), dtype=lhsT.dtype, buffer=nl.shared_hbm)
    block_n = TUTORIAL_TILES_N * MM_N
    over_strips(N, min(block_n, N), lambda cols: _tutorial_n_block(lhsT, rhs, result, cols))
    return result


def _tutorial_n_block(lhsT, rhs, result, cols):
    K, M = lhsT.shape
    nb = cols.height
    block_m, block_k = TUTORIAL_TILES_M * P, TUTORIAL_TILES_K * P
    nkb, nmb = _cdiv(K, block_k), _cdiv(M, block_m)
    # the tutorial's result_tiles: every M row of this N block, bf16 (spills at large M)
    acc = nl.ndarray((P, _cdiv(M, P), nb), dtype=lhsT.dtype, buffer=nl.sbuf, name="result_tiles")
    rhs_tiles = Buffers("rhs_tiles", (P, block_k // P, nb), lhsT.dtype, n_buffers(nkb))
    lhsT_tiles = Buffers("lhsT_tiles", (P, block_k // P, block_m), lhsT.dtype,
                         n_buffers(nkb * nmb))
    res = Buffers("res_tile", (P, MM_N), nl.float32, 2, buffer=nl.psum, bank=0)
    packed = Buffers("result_packed", (P, nb), lhsT.dtype, n_buffers(_cdiv(M, P)))
    for mt in nl.static_range(_cdiv(M, P)):          # the tutorial's nl.zeros
        nisa.memset(dst=acc[:, mt, :], value=0.0)
    for k0 in nl.static_range(0, K, block_k):
        kb = min(block_k, K - k0)
        rt = rhs_tiles.next()
        for kt in nl.static_range(_cdiv(kb, P)):
            kp = min(P, kb - kt * P)
            nisa.dma_copy(dst=rt[0:kp, kt, 0:nb], src=cols.cols(rhs, k0 + kt * P, kp, 0, nb))
        for m0 in nl.static_range(0, M, block_m):
            mb = min(block_m, M - m0)
            lt = lhsT_tiles.next()
            for kt in nl.static_range(_cdiv(kb, P)):
                kp = min(P, kb - kt * P)
                nisa.dma_copy(dst=lt[0:kp, kt, 0:mb],
                              src=lhsT[k0 + kt * P:k0 + kt * P + kp, m0:m0 + mb])
            for c0 in nl.static_range(0, nb, MM_N):
                cw = min(MM_N, nb - c0)
                for mt in nl.static_range(_cdiv(mb, P)):
                    mp = min(P, mb - mt * P)
                    ps = res.next()
                    for kt in nl.static_range(_cdiv(kb, P)):
                        kp = min(P, kb - kt * P)
                        nisa.nc_matmul(dst=ps[0:mp, 0:cw], stationary=lt[0:kp, kt, mt * P:mt * P + mp],
                                       moving=rt[0:kp, kt, c0:c0 + cw], accumulate=(kt > 0))
                    dst = acc[0:mp, m0 // P + mt, c0:c0 + cw]
                    nisa.tensor_tensor(dst=dst, data1=dst, data2=ps[0:mp, 0:cw], op=nl.add)
    for mt in nl.static_range(_cdiv(M, P)):
        mp = min(P, M - mt * P)
        o = packed.next()
        nisa.tensor_copy(dst=o[0:mp, 0:nb], src=acc[0:mp, mt, 0:nb])
        nisa.dma_copy(dst=cols.cols(result, mt * P, mp, 0, nb), src=o[0:mp, 0:nb])


TRANSPOSE_PANEL_ROWS = 8 * P     # rows of x per panel: one bf16 PSUM bank of transposed rows
TRANSPOSE_CHUNK_COLS = 8 * P     # columns of x loaded per row block (2 KiB bf16 runs)


@jit
def transpose(x):
    """y [C, R] = x[R, C]^T as its own launch (the paper transposed inputs and outputs
    outside its kernels): per panel of rows, row blocks loaded by DMA, 128 x 128
    transposes on the tensor engine into PSUM, one copy per 128 columns into SBUF, stored
    as rows of y. Panels run in a hardware loop."""
    R, C = x.shape
    y = nl.ndarray((C, R), dtype=x.dtype, buffer=nl.shared_hbm)
    over_strips(R, min(TRANSPOSE_PANEL_ROWS, R), lambda rows: _transpose_panel(x, y, rows))
    return y


def _transpose_panel(x, y, rows):
    R, C = x.shape
    h = rows.height
    nrb = _cdiv(h, P)
    cb = min(TRANSPOSE_CHUNK_COLS, C)
    ins = Buffers("x_rows", (P, nrb, cb), x.dtype, n_buffers(_cdiv(C, cb)))
    tps = Buffers("x_tp", (P, h), x.dtype, 2, buffer=nl.psum, bank=0)
    outs = Buffers("y_rows", (P, h), x.dtype, n_buffers(_cdiv(C, P)))
    for c0 in nl.static_range(0, C, cb):
        cw = min(cb, C - c0)
        t = ins.next()
        for g in nl.static_range(nrb):
            gp = min(P, h - g * P)
            nisa.dma_copy(dst=t[0:gp, g, 0:cw], src=rows.rows(x, g * P, gp, c0, cw))
        for ct in nl.static_range(_cdiv(cw, P)):
            cp = min(P, cw - ct * P)
            tp = tps.next()
            for g in nl.static_range(nrb):
                gp = min(P, h - g * P)
                nisa.nc_transpose(dst=tp[0:cp, g * P:g * P + gp], data=t[0:gp, g, ct * P:ct * P + cp])
            o = outs.next()
            nisa.tensor_copy(dst=o[0:cp, 0:h], src=tp[0:cp, 0:h])
            nisa.dma_copy(dst=rows.cols(y, c0 + ct * P, cp, 0, h), src=o[0:cp, 0:h])


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a sequence: kernel(*tensors[inputs], **kwargs) -> tensors[output]."""
    kernel: object
    inputs: tuple
    output: str
    kwargs: tuple = ()


PAPER_FUSED_BLOCK_M = 1024     # the paper's Table 3 optimum (10.99 ms at S = 4096)


def paper_launches(name, block_m=PAPER_FUSED_BLOCK_M):
    """The launch sequence the paper timed for "dense_xw" (x, w), "sequential_xuv" (x, u,
    v) or "fused_xuv" (x, u, v); every sequence ends in y^T [N, S]."""
    if name == "dense_xw":
        return (Launch(transpose, ("x",), "xT"), Launch(tutorial_matmul, ("xT", "w"), "y"),
                Launch(transpose, ("y",), "yT"))
    if name == "sequential_xuv":
        return (Launch(transpose, ("x",), "xT"), Launch(tutorial_matmul, ("xT", "u"), "t"),
                Launch(transpose, ("t",), "tT"), Launch(tutorial_matmul, ("tT", "v"), "y"),
                Launch(transpose, ("y",), "yT"))
    if name == "fused_xuv":
        return (Launch(fused_xuv, ("x", "u", "v"), "yT",
                       (("block_m", block_m), ("transpose_out", True), ("x_transpose", "dma"),
                        ("whole_strip", True))),)
    raise ValueError(f"no paper launch sequence named {name!r}; expected dense_xw, "
                     f"sequential_xuv or fused_xuv")


def _out_shape(launch, shapes):
    a = [shapes[n] for n in launch.inputs]
    if launch.kernel is transpose:
        return (a[0][1], a[0][0])
    if launch.kernel is tutorial_matmul:
        return (a[0][1], a[1][1])
    return (a[2][1], a[0][0])            # fused_xuv with transpose_out: y^T [N, S]


@dataclass
class SequenceStats:
    """A launch sequence's totals (launches back to back, each after the previous ends)."""
    latency_s: float
    hbm_bytes: int
    flops: int
    transpose_flops: int
    spill_bytes: int
    peak_flops: float
    launches: list                       # (kernel name, Stats) per launch

    @property
    def mfu(self) -> float:
        return self.flops / (self.peak_flops * self.latency_s) if self.latency_s else 0.0


def run_launches(launches, tensors, target="trn1", count_only=False):
    """Run a launch sequence in the emulator. tensors: {name: numpy array} (values) or
    {name: shape} (count_only). Returns (tensors after the sequence, SequenceStats)."""
    from .sim import run, spec
    tensors = dict(tensors)
    shapes = {n: tuple(getattr(t, "shape", t)) for n, t in tensors.items()}
    rows, dtype = [], "bfloat16"
    for launch in launches:
        args = [spec(shapes[n], dtype) if count_only else tensors[n] for n in launch.inputs]
        out, st = run(launch.kernel, *args, target=target, count_only=count_only,
                      **dict(launch.kwargs))
        shapes[launch.output] = _out_shape(launch, shapes)
        tensors[launch.output] = out
        rows.append((launch.kernel.__name__, st))
    total = lambda f: sum(f(st) for _, st in rows)   # noqa: E731
    return tensors, SequenceStats(
        latency_s=total(lambda st: st.modeled_latency_s), hbm_bytes=total(lambda st: st.hbm_bytes),
        flops=total(lambda st: st.flops), transpose_flops=total(lambda st: st.transpose_flops),
        spill_bytes=total(lambda st: st.spill_bytes), peak_flops=rows[0][1].peak_flops,
        launches=rows)
