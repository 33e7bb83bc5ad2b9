"""The kernels the fused ones are measured against (the paper's "NKI XW" and "NKI XUV").

* `dense_xw(x, w)`: y = x @ w, blocked in the manner of AWS's "fully optimized" NKI
  matmul tutorial: all three dims blocked (BLOCK_M = 16 x 128 tokens, BLOCK_N = 2 x
  512 columns, BLOCK_K = 8 x 128), the whole [BLOCK_M, BLOCK_N] result block kept in
  SBUF while the K blocks stream past, each K block's partial product folded into it
  on the vector engine. Differences from the tutorial: an outer loop over M blocks
  (the tutorial keeps every M row of a column block in SBUF, which does not fit at
  S = 32K), fp32 SBUF accumulators (the tutorial accumulates in the input dtype),
  any shape (edges masked), and x taken in its natural [S, K] layout, loaded through
  transposing DMAs (the tutorial expects x^T in HBM).
* `sequential_xuv(x, u, v)`: the two-matmul low-rank linear: t = x @ u written to HBM,
  read back, y = t @ v -- each a `dense_xw`-style matmul.

Traffic: x (as x^T) is re-read once per column block of w, w once per M block.
"""
from .nki_compat import jit, nisa, nl
from .xuv import P, MM_N, _cdiv, check_dims

TILES_M, TILES_N, TILES_K = 16, 2, 8


def _blocks(dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K); 4-byte inputs halve BLOCK_M to fit SBUF."""
    tm = TILES_M if dtype != nl.float32 else TILES_M // 2
    return tm * P, TILES_N * MM_N, TILES_K * P


def _load_xT_block(x, xT, m0, mb, k0, kb):
    """xT[:, kt, 0:mb] <- x[m0:m0+mb, k-tile]^T for the k tiles of one K block."""
    for kt in range(_cdiv(kb, P)):
        ks = k0 + kt * P
        kp = min(P, k0 + kb - ks)
        if x.dtype == nl.float32:
            for g0 in range(0, mb, P):
                gp = min(P, mb - g0)
                blk = nl.ndarray((P, P), dtype=x.dtype, buffer=nl.sbuf)
                nisa.dma_copy(dst=blk[0:gp, 0:kp], src=x[m0 + g0:m0 + g0 + gp, ks:ks + kp])
                tp = nl.ndarray((P, P), dtype=nl.float32, buffer=nl.psum)
                nisa.nc_transpose(dst=tp[0:kp, 0:gp], data=blk[0:gp, 0:kp])
                nisa.tensor_copy(dst=xT[0:kp, kt, g0:g0 + gp], src=tp[0:kp, 0:gp])
        else:
            nisa.dma_transpose(dst=xT[0:kp, kt, 0:mb], src=x[m0:m0 + mb, ks:ks + kp])


def _load_w_block(w, wb, k0, kb, n0, nb):
    for kt in range(_cdiv(kb, P)):
        ks = k0 + kt * P
        kp = min(P, k0 + kb - ks)
        nisa.dma_copy(dst=wb[0:kp, kt, 0:nb], src=w[ks:ks + kp, n0:n0 + nb])


def _kblock(xT, wb, acc, mb, nb, kb, first):
    """acc[:, mt, :] (+)= x[m block, k block] @ w[k block, n block] for one K block:
    128-token tiles of x^T stationary, 512-column tiles of w moving, partial sums over
    the block's k tiles in fp32 PSUM, then folded into the SBUF accumulator."""
    nkt = _cdiv(kb, P)
    for c0 in range(0, nb, MM_N):
        cw = min(MM_N, nb - c0)
        for mt in range(_cdiv(mb, P)):
            mp = min(P, mb - mt * P)
            ps = nl.ndarray((P, MM_N), dtype=nl.float32, buffer=nl.psum)
            for kt in range(nkt):
                kp = min(P, kb - kt * P)
                nisa.nc_matmul(dst=ps[0:mp, 0:cw], stationary=xT[0:kp, kt, mt * P:mt * P + mp],
                               moving=wb[0:kp, kt, c0:c0 + cw], accumulate=(kt > 0))
            dst = acc[0:mp, mt, c0:c0 + cw]
            if first:
                nisa.tensor_copy(dst=dst, src=ps[0:mp, 0:cw])
            else:
                nisa.tensor_tensor(dst=dst, data1=dst, data2=ps[0:mp, 0:cw], op=nl.add)


def _result_block(x, w, y, m0, mb, n0, nb, block_m, block_n, block_k):
    """One [BLOCK_M, BLOCK_N] result block: K blocks stream through (x^T and w blocks
    rebound per iteration, i.e. double-buffered), the result stays in SBUF (fp32)."""
    K = x.shape[1]
    acc = nl.ndarray((P, block_m // P, block_n), dtype=nl.float32, buffer=nl.sbuf)
    for k0 in range(0, K, block_k):
        kb = min(block_k, K - k0)
        xT = nl.ndarray((P, block_k // P, block_m), dtype=x.dtype, buffer=nl.sbuf)
        _load_xT_block(x, xT, m0, mb, k0, kb)
        wb = nl.ndarray((P, block_k // P, block_n), dtype=x.dtype, buffer=nl.sbuf)
        _load_w_block(w, wb, k0, kb, n0, nb)
        _kblock(xT, wb, acc, mb, nb, kb, k0 == 0)
    for mt in range(_cdiv(mb, P)):
        mp = min(P, mb - mt * P)
        o = nl.ndarray((P, block_n), dtype=y.dtype, buffer=nl.sbuf)
        nisa.tensor_copy(dst=o[0:mp, 0:nb], src=acc[0:mp, mt, 0:nb])
        nisa.dma_copy(dst=y[m0 + mt * P:m0 + mt * P + mp, n0:n0 + nb], src=o[0:mp, 0:nb])


def blocked_matmul(x, w, y):
    """y[M, N] = x[M, K] @ w[K, N], all in HBM (the tutorial-style blocked matmul)."""
    M, K = x.shape
    N = w.shape[1]
    block_m, block_n, block_k = _blocks(x.dtype)
    for m0 in range(0, M, block_m):
        mb = min(block_m, M - m0)
        for n0 in range(0, N, block_n):
            _result_block(x, w, y, m0, mb, n0, min(block_n, N - n0), block_m, block_n, block_k)


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
