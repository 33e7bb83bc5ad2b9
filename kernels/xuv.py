"""Fused low-rank linear y = (x u) v on the NeuronCore: NeuronMM's TrainiumFusion
(paper section 4.2.1), plus the strip machinery the MLP kernels share.

Layouts (HBM, row-major):
    x [S, K]   tokens x input features          (or x^T [K, S] for `mlp.down`)
    u [K, r]   applied first; its rows (K) are the contraction dim of stage 1
    v [r, N]   applied second; its rows (r) are the contraction dim of stage 2
    y [S, N]   normal layout, or y^T [N, S] with transpose_out=True
On chip, dim 0 of every tile is the SBUF/PSUM partition dim (<= 128).

The paper's ideas, and where they live:
* caching the intermediate strip: for each row strip of BM tokens the whole
  (x u)^T strip [r, BM] is computed into SBUF (`_stage1_part`) and consumed there by
  stage 2 (`_stage2_rows` / `_stage2_cols`); it never goes to HBM;
* implicit transposition: stage 1 makes the u tile the *stationary* operand and the
  x^T tile the *moving* one, so the tensor engine yields (x u)^T -- r on the
  partitions, which is exactly the layout stage 2 needs for its contraction over r.
  No transpose instruction anywhere between the stages;
* transposing DMA load of x: x^T tiles come straight from HBM through `dma_transpose`
  (2-byte dtypes; fp32 inputs fall back to tensor-engine transposes);
* blocking: BM from the block-size model (`blocking.select_block_m`, by modelled time);
  every DMA moves long contiguous runs per partition -- U as row slabs of a whole
  group of r tiles (as many as the 8 PSUM banks accumulate at once), V in column
  blocks of up to 2048 columns (`block_n`), y in block_n-wide (or strip-wide, for
  y^T) rows;
* fp32 accumulation: every partial sum accumulates in fp32 PSUM (the authors' code
  summed partials in bf16; this one never does). Only the finished (x u)^T strip is
  rounded to the compute dtype, because the tensor engine reads it as an operand.
"""
from . import blocking
from .nki_compat import jit, nisa, nl, target_name

P = blocking.P          # partitions, PE rows, max stationary free size
MM_N = blocking.MM_N    # max moving free size = one fp32 PSUM bank


def _cdiv(a, b):
    return -(-a // b)


# -- stage 1: (x u)^T strip into SBUF -------------------------------------------------------

def _load_xT(x, xT, t0, tb, x_transposed):
    """xT[:, kt, 0:tb] <- (x[t0:t0+tb, kt-th 128 columns])^T for every k tile."""
    K = x.shape[0] if x_transposed else x.shape[1]
    for kt in range(_cdiv(K, P)):
        k0 = kt * P
        kp = min(P, K - k0)
        if x_transposed:
            # The producer already wrote x^T (K on rows): a plain DMA lands it in place.
            nisa.dma_copy(dst=xT[0:kp, kt, 0:tb], src=x[k0:k0 + kp, t0:t0 + tb])
        elif x.dtype == nl.float32:
            _load_xT_pe(x, xT, kt, k0, kp, t0, tb)
        else:
            # Transposing DMA: HBM rows of x become SBUF columns of x^T.
            nisa.dma_transpose(dst=xT[0:kp, kt, 0:tb], src=x[t0:t0 + tb, k0:k0 + kp])


def _load_xT_pe(x, xT, kt, k0, kp, t0, tb):
    """fp32 fallback (DMA transposes move 2-byte elements): load 128x128 blocks and
    transpose them on the tensor engine."""
    for g0 in range(0, tb, P):
        gp = min(P, tb - g0)
        blk = nl.ndarray((P, P), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=blk[0:gp, 0:kp], src=x[t0 + g0:t0 + g0 + gp, k0:k0 + kp])
        tp = nl.ndarray((P, P), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_transpose(dst=tp[0:kp, 0:gp], data=blk[0:gp, 0:kp])
        nisa.tensor_copy(dst=xT[0:kp, kt, g0:g0 + gp], src=tp[0:kp, 0:gp])


def _project(xT, u, xuT, tb):
    """xuT[:, rt, 0:tb] = (x u)^T for one sub-strip.

    Implicit transposition: u[k, r] tiles are the stationary operand and x^T[k, t] the
    moving one, so the result lands as (x u)^T[r, t] in PSUM. The r tiles go in groups
    as large as the 8 PSUM banks can accumulate for tb tokens (`blocking.u_group_tiles`:
    8 r tiles x 512 tokens, 16 x 256, 4 x 1024, ...); for each K tile one DMA brings the
    group's whole U row slab ([128 k, 128 * tiles] -- long contiguous runs per
    partition), which meets every token chunk of the sub-strip once. Partial sums over
    k accumulate in fp32 PSUM.
    """
    nrt = _cdiv(u.shape[1], P)
    gt = blocking.u_group_tiles(tb)
    for g0 in range(0, nrt, gt):
        _project_group(xT, u, xuT, tb, g0, min(gt, nrt - g0))


def _project_group(xT, u, xuT, tb, g0, tiles):
    """One group of r tiles (g0 .. g0+tiles): its accumulators fill PSUM, so they are
    allocated here and released on return, before the next group's."""
    K, r = u.shape
    slot = blocking.token_slot(tb)
    nch = blocking.token_chunks(tb)
    width = blocking.u_group_cols(r, tb)          # U slab tile width (columns)
    c0 = g0 * P
    cols = min(tiles * P, r - c0)
    acc = nl.ndarray((P, tiles, nch * slot), dtype=nl.float32, buffer=nl.psum)
    for kt in range(_cdiv(K, P)):
        k0 = kt * P
        kp = min(P, K - k0)
        # rebound every k tile: the next slab loads while this one is in use (2 buffers)
        ut = nl.ndarray((P, width), dtype=xT.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=ut[0:kp, 0:cols], src=u[k0:k0 + kp, c0:c0 + cols])
        for j in range(tiles):
            rp = min(P, r - c0 - j * P)
            for c in range(nch):
                t0 = c * slot
                cw = min(slot, tb - t0)
                nisa.nc_matmul(dst=acc[0:rp, j, t0:t0 + cw], stationary=ut[0:kp, j * P:j * P + rp],
                               moving=xT[0:kp, kt, t0:t0 + cw], accumulate=(kt > 0))
    # fp32 PSUM -> compute dtype, straight into the cached strip (vector engine)
    for j in range(tiles):
        rp = min(P, r - c0 - j * P)
        for c in range(nch):
            t0 = c * slot
            cw = min(slot, tb - t0)
            nisa.tensor_copy(dst=xuT[0:rp, g0 + j, t0:t0 + cw], src=acc[0:rp, j, t0:t0 + cw])


def _stage1_part(x, us, t0, tb, x_transposed):
    """One stage-1 sub-strip: load its x^T once, project it through every u.
    Returns the (x u_i)^T pieces [128, ceil(r_i/128), tb]; x^T dies on return."""
    K = x.shape[0] if x_transposed else x.shape[1]
    xT = nl.ndarray((P, _cdiv(K, P), tb), dtype=x.dtype, buffer=nl.sbuf)
    _load_xT(x, xT, t0, tb, x_transposed)
    outs = []
    for u in us:
        xuT = nl.ndarray((P, _cdiv(u.shape[1], P), tb), dtype=x.dtype, buffer=nl.sbuf)
        _project(xT, u, xuT, tb)
        outs.append(xuT)
    return tuple(outs)


def _stage1(x, us, s0, bm, plan, x_transposed):
    """Cache the whole (x u)^T strip for tokens s0 .. s0+bm, sub-strip by sub-strip."""
    parts = []
    t0 = s0
    for tb in plan.sub_heights(bm):
        parts.append((t0, tb, _stage1_part(x, us, t0, tb, x_transposed)))
        t0 += tb
    return parts


# -- stage 2: stream V against the cached strip ----------------------------------------------

def _load_vblock(v, n0, nb, block_n, dtype):
    """V[:, n0:n0+nb] as [128, ceil(r/128), block_n], one DMA per 128 rows of r."""
    r = v.shape[0]
    vb = nl.ndarray((P, _cdiv(r, P), block_n), dtype=dtype, buffer=nl.sbuf)
    for rt in range(_cdiv(r, P)):
        r0 = rt * P
        rp = min(P, r - r0)
        nisa.dma_copy(dst=vb[0:rp, rt, 0:nb], src=v[r0:r0 + rp, n0:n0 + nb])
    return vb


def _stage2_rows(parts, v, y, block_n):
    """y[t, n] for the strip, normal layout: the cached (x u)^T tile [r, 128 tokens] is
    the stationary operand, the V block the moving one -> PSUM [tokens, block_n] (up to
    4 banks); each output tile leaves as one DMA of block_n-wide rows."""
    r, N = v.shape
    nr = _cdiv(r, P)
    dtype = parts[0][2][0].dtype
    for n0 in range(0, N, block_n):
        nb = min(block_n, N - n0)
        vb = _load_vblock(v, n0, nb, block_n, dtype)   # rebound per block: double-buffered
        for t0, tb, pieces in parts:
            xuT = pieces[0]
            for g0 in range(0, tb, P):
                gp = min(P, tb - g0)
                ps = nl.ndarray((P, block_n), dtype=nl.float32, buffer=nl.psum)
                for rt in range(nr):
                    rp = min(P, r - rt * P)
                    for c0 in range(0, nb, MM_N):
                        cw = min(MM_N, nb - c0)
                        nisa.nc_matmul(dst=ps[0:gp, c0:c0 + cw],
                                       stationary=xuT[0:rp, rt, g0:g0 + gp],
                                       moving=vb[0:rp, rt, c0:c0 + cw], accumulate=(rt > 0))
                o = nl.ndarray((P, block_n), dtype=y.dtype, buffer=nl.sbuf)
                for c0 in range(0, nb, MM_N):
                    cw = min(MM_N, nb - c0)
                    nisa.tensor_copy(dst=o[0:gp, c0:c0 + cw], src=ps[0:gp, c0:c0 + cw])
                nisa.dma_copy(dst=y[t0 + g0:t0 + g0 + gp, n0:n0 + nb], src=o[0:gp, 0:nb])


def _stage2_cols(parts, vs, yT, block_n, silu_mul, s0, bm):
    """y^T[n, t] for the strip: V tiles [r, 128 n] stationary, the cached (x u)^T moving
    -> PSUM [n, tokens], which is already the transposed output layout. Each 128-row
    output tile spans the whole strip ([128 n, bm tokens] in SBUF) and leaves as one DMA
    of bm-wide rows.

    silu_mul (MLP gate/up, vs = (v_gate, v_up)): the two products meet on chip as
    silu(gate) on the scalar engine times up on the vector engine, before the store.
    """
    N = vs[0].shape[1]
    dtype = parts[0][2][0].dtype
    for n0 in range(0, N, block_n):
        nb = min(block_n, N - n0)
        new_vbs = []          # loaded before the previous blocks are released: double-buffered
        for v in vs:
            new_vbs.append(_load_vblock(v, n0, nb, block_n, dtype))
        vbs = new_vbs
        for j0 in range(0, nb, P):
            jp = min(P, nb - j0)
            o = nl.ndarray((P, bm), dtype=yT.dtype, buffer=nl.sbuf)
            for t0, tb, pieces in parts:
                for c0 in range(0, tb, MM_N):
                    cw = min(MM_N, tb - c0)
                    new_acc = []      # next chunk's banks before this one's are released
                    for i in range(len(vs)):
                        r = vs[i].shape[0]
                        ps = nl.ndarray((P, MM_N), dtype=nl.float32, buffer=nl.psum)
                        for rt in range(_cdiv(r, P)):
                            rp = min(P, r - rt * P)
                            nisa.nc_matmul(dst=ps[0:jp, 0:cw], stationary=vbs[i][0:rp, rt, j0:j0 + jp],
                                           moving=pieces[i][0:rp, rt, c0:c0 + cw],
                                           accumulate=(rt > 0))
                        new_acc.append(ps)
                    acc = new_acc
                    off = t0 - s0 + c0
                    if silu_mul:
                        g = nl.ndarray((P, MM_N), dtype=nl.float32, buffer=nl.sbuf)
                        nisa.activation(dst=g[0:jp, 0:cw], op=nl.silu, data=acc[0][0:jp, 0:cw])
                        nisa.tensor_tensor(dst=o[0:jp, off:off + cw], data1=g[0:jp, 0:cw],
                                           data2=acc[1][0:jp, 0:cw], op=nl.multiply)
                    else:
                        nisa.tensor_copy(dst=o[0:jp, off:off + cw], src=acc[0][0:jp, 0:cw])
            nisa.dma_copy(dst=yT[n0 + j0:n0 + j0 + jp, s0:s0 + bm], src=o[0:jp, 0:bm])


def run_strips(x, us, vs, y, plan, x_transposed, out):
    """The fused kernels' outer loop: one row strip of BM tokens at a time."""
    for s0, bm in plan.strips():
        _strip(x, us, vs, y, s0, bm, plan, x_transposed, out)


def _strip(x, us, vs, y, s0, bm, plan, x_transposed, out):
    parts = _stage1(x, us, s0, bm, plan, x_transposed)     # (x u)^T strip cached in SBUF
    if out == "rows":
        _stage2_rows(parts, vs[0], y, plan.block_n)
    else:
        _stage2_cols(parts, vs, y, plan.block_n, out == "silu_cols", s0, bm)


def check_dims(name, **dims):
    for k, (a, b) in dims.items():
        if a != b:
            raise ValueError(f"{name}: {k} mismatch ({a} != {b})")


def strip_plan(shape, block_m):
    """Plan for the active target; block_m None -> the block-size model's choice."""
    target = target_name()
    if block_m == None:  # noqa: E711  (NKI kernels compare with ==, not `is`)
        block_m = blocking.select_block_m(shape, target)
    return blocking.plan(shape, int(block_m), target)


def elem_bytes(dtype):
    return 4 if dtype == nl.float32 else 2


@jit
def fused_xuv(x, u, v, transpose_out=False, block_m=None):
    """y = (x @ u) @ v as one kernel, (x u) never leaving the chip.

    x [S, K], u [K, r], v [r, N] in HBM (bf16 or fp32; u and v are cast to x's dtype
    on load). Returns y [S, N] in nl.shared_hbm, or y^T [N, S] if transpose_out.
    block_m: tokens per row strip; None -> `blocking.select_block_m` for the target.
    Any S >= 1, any K, r, N (partial tiles are masked by slicing, never dropped).
    """
    S, K = x.shape
    r = u.shape[1]
    N = v.shape[1]
    check_dims("fused_xuv", K=(u.shape[0], K), r=(v.shape[0], r))
    e = elem_bytes(x.dtype)
    shape = blocking.KernelShape(S, K, (r,), N, e, elem_bytes(u.dtype), elem_bytes(v.dtype), e,
                                 "cols" if transpose_out else "rows", False)
    plan = strip_plan(shape, block_m)
    if transpose_out:
        y = nl.ndarray((N, S), dtype=x.dtype, buffer=nl.shared_hbm)
    else:
        y = nl.ndarray((S, N), dtype=x.dtype, buffer=nl.shared_hbm)
    run_strips(x, (u,), (v,), y, plan, False, shape.out)
    return y
