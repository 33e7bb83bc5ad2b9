"""The kernels the fused ones are measured against (the paper's "NKI XW" and "NKI XUV").

* `dense_xw(x, w)`: y = x @ w, blocked in the manner of AWS's "fully optimized" NKI
  matmul tutorial: all three dims blocked (BLOCK_M = 16 x 128 tokens, BLOCK_N = 2 x
  512 columns, BLOCK_K = 8 x 128), the whole [BLOCK_M, BLOCK_N] result block kept in
  SBUF while the K blocks stream past (double-buffered), each K block's partial product
  folded into it on the vector engine. The M blocks (the only loop whose trip count
  grows with S) run in a `nl.dynamic_range` hardware loop, as in the fused kernels. Differences from the tutorial: an outer loop over M blocks
  (the tutorial keeps every M row of a column block in SBUF, which does not fit at
  S = 32K), fp32 SBUF accumulators (the tutorial accumulates in the input dtype),
  any shape (edges masked), and x taken in its natural [S, K] layout, loaded through
  transposing DMAs (the tutorial expects x^T in HBM).
* `sequential_xuv(x, u, v)`: the two-matmul low-rank linear: t = x @ u written to HBM,
  read back, y = t @ v -- each a `dense_xw`-style matmul.
* `naive_fused_xuv(x, u, v)`: the strawman of the paper's Table 1, a fused kernel that
  caches nothing across output blocks: every [block_m, block_n] block of y recomputes
  (x u)^T for its block_m tokens (U streamed again) before multiplying by its V columns.
  The block sizes of the authors' version are not published; 128 x 512 (one PE tile by
  one PSUM bank) is our assumption.

Traffic: x (as x^T) is re-read once per column block of w, w once per M block.
"""
from . import strip_plan
from .nki_compat import jit, nisa, nl, target_name
from .xuv import (MM_N, P, Buffers, TransposeScratch, _cdiv, _stage1, _stage2_rows, check_dims,
                  load_transposed, n_buffers, over_strips, xuv_kernel_shape)

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
    scratch = TransposeScratch(x.dtype, 2) if x.dtype == nl.float32 else None
    for n0 in nl.static_range(0, N, block_n):
        nb = min(block_n, N - n0)
        for k0 in nl.static_range(0, K, block_k):
            kb = min(block_k, K - k0)
            xT = xTs.next()
            for kt in nl.static_range(_cdiv(kb, P)):
                ks = k0 + kt * P
                kp = min(P, k0 + kb - ks)
                load_transposed(xT[0:kp, kt, 0:mb],
                                lambda g0, n, ks=ks, kp=kp: strip.rows(x, g0, n, ks, kp),
                                mb, kp, x.dtype, scratch)
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
