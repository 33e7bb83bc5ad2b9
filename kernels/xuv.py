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
* transposing load of x: x^T tiles come from HBM through `dma_transpose` (trn2) or
  through the tensor engine's identity transpose (trn1, whose DMA transpose is
  documented only as "much lower" bandwidth; fp32 everywhere): `load_transposed`;
* blocking: BM is an argument and the strip plan (`strip_plan.plan`: sub-strips, V
  block width) follows from it; `blocking.select_block_m` picks BM by modelled time,
  and `blocking.fused_xuv` is this kernel with the selector's BM. Every DMA moves long
  contiguous runs per partition -- U as row slabs of a whole group of r tiles (as
  many as the 8 PSUM banks accumulate at once), V in column blocks of up to 2048
  columns (`block_n`), y in block_n-wide (or strip-wide, for y^T) rows;
* fp32 accumulation: every partial sum accumulates in fp32 PSUM (the authors' code
  summed partials in bf16; this one never does). Only the finished (x u)^T strip is
  rounded to the compute dtype, because the tensor engine reads it as an operand.
"""
from . import strip_plan
from .nki_compat import jit, nisa, nl, target_name

# Tile sizes from NKI's own constants (nl.tile_size, nki/api/nki.language.tile_size.rst);
# `strip_plan` plans with the same numbers.
P = nl.tile_size.pmax                       # partitions, PE rows
MM_N = nl.tile_size.gemm_moving_fmax        # max moving free size = one fp32 PSUM bank
assert P == strip_plan.P and MM_N == strip_plan.MM_N == nl.tile_size.psum_bank_fmax
assert nl.tile_size.gemm_stationary_fmax == P
PSUM_BANK_BYTES = 4 * MM_N


def _cdiv(a, b):
    return -(-a // b)


# -- strips, device loops and HBM addressing -------------------------------------------------
#
# Loops, as NKI 0.3+ compiles them (nki/deep-dives/nki-dynamic-loops.rst): `range` and its
# aliases affine_range / sequential_range / static_range are unrolled at trace time, so
# they are kept for the loops over K, r and N tiles (their trip counts depend on the
# weights' shapes only). The one loop whose trip count grows with the token count S --
# over row strips -- is `nl.dynamic_range`: a hardware loop, its body compiled once, its
# variable a device register that can only address tensors through `.ap(...,
# scalar_offset=reg)` (nki/deep-dives/nki-aps.rst). A last, shorter strip is peeled off
# after the loop (the loop body must be the same in every iteration). So the static
# instruction count does not depend on S.

class Strip:
    """Rows s0 .. s0 + height of the token dim: `reg` is the dynamic loop's register (the
    strip start) or None for a strip at the compile-time start `base`."""

    def __init__(self, reg, base, height):
        self.reg, self.base, self.height = reg, base, height

    def rows(self, t, r0, nr, c0, nc):
        """t[strip + r0 : strip + r0 + nr, c0 : c0 + nc] of a 2-D HBM tensor whose rows
        are tokens."""
        if self.reg is None:
            return t[self.base + r0:self.base + r0 + nr, c0:c0 + nc]
        C = t.shape[1]
        return t.ap([[C, nr], [1, nc]], offset=r0 * C + c0, scalar_offset=self.reg,
                    indirect_dim=0)

    def cols(self, t, r0, nr, c0, nc):
        """t[r0 : r0 + nr, strip + c0 : strip + c0 + nc] of a 2-D HBM tensor whose columns
        are tokens."""
        if self.reg is None:
            return t[r0:r0 + nr, self.base + c0:self.base + c0 + nc]
        C = t.shape[1]
        return t.ap([[C, nr], [1, nc]], offset=r0 * C + c0, scalar_offset=self.reg,
                    indirect_dim=1)


def over_strips(S, bm, body):
    """body(strip) for every strip of bm tokens: full strips in one hardware loop, the
    remainder (if any) once after it."""
    n_full = S // bm
    if n_full:
        for s0 in nl.dynamic_range(0, n_full * bm, bm):
            body(Strip(s0, 0, bm))
    if S - n_full * bm:
        body(Strip(None, n_full * bm, S - n_full * bm))


# -- explicit buffers ------------------------------------------------------------------------
#
# Allocation is decided at compile time; multi-buffering is explicit, as nki-library writes
# it (a buffer count per allocation, buffers used round-robin, PSUM tiles at fixed bank
# addresses; src/nkilib_src/nkilib/core/mlp/mlp_cte/mlp_cte_allocation.py,
# "Create 'multiple buffers' ... to facilitate overlapped loads").

class Buffers:
    """`count` tensors of one shape used round-robin: `next()` is the following one."""

    def __init__(self, name, shape, dtype, count, buffer=None, bank=None):
        self.tiles = []
        for i in range(count):
            if buffer is nl.psum:
                banks = _cdiv(_free_bytes(shape, 4), PSUM_BANK_BYTES)
                addr = (0, (bank + i * banks) * PSUM_BANK_BYTES)
                self.tiles.append(nl.ndarray(shape, dtype=dtype, buffer=nl.psum,
                                             name=f"{name}{i}", address=addr))
            else:
                self.tiles.append(nl.ndarray(shape, dtype=dtype, buffer=nl.sbuf,
                                             name=f"{name}{i}"))
        self.i = 0

    def next(self):
        t = self.tiles[self.i % len(self.tiles)]
        self.i += 1
        return t


def _free_bytes(shape, e):
    n = e
    for d in shape[1:]:
        n *= d
    return n


def n_buffers(uses):
    """Double-buffer a stream of tiles (load the next while the current is in use);
    one buffer when there is only one tile."""
    return 2 if uses >= 2 else 1


# -- transposing loads of x: DMA transpose or the tensor engine's identity transpose -----------
#
# x arrives as [tokens, K] and stage 1 needs x^T (K on the partitions). Two ways, chosen by
# `x_transpose` (`strip_plan.default_x_transpose`):
# * "dma": a transposing DMA per 128-column K tile (`nisa.dma_transpose`; 2-byte dtypes).
#   trn2 documents it at up to 90% of a copy; for trn1 the performance guide says only
#   "much lower" bandwidth and recommends the tensor engine instead;
# * "pe": plain DMA loads of [128 tokens, up to 4 KiB per partition] row blocks (long
#   contiguous runs), then 128x128 transposes on the tensor engine (a matmul against an
#   identity, nki_perf_guide.rst) into PSUM, four K tiles per PSUM tile, and one vector
#   copy per four tiles into x^T. The default on trn1, and the only way for fp32.

PE_TRANSPOSE_GROUP = 4        # K tiles transposed into one PSUM tile ([128, 4, 128])


class TransposeScratch:
    """SBUF row blocks and PSUM tiles of the "pe" transposing load: two [128, cols] row
    blocks (cols = `strip_plan.pe_row_cols`) and two PSUM tiles from bank `bank`."""

    def __init__(self, dtype, bank, K):
        self.cols = strip_plan.pe_row_cols(K, elem_bytes(dtype))
        self.blk = Buffers("xrows", (P, self.cols), dtype, 2)
        self.tp = Buffers("xtp", (P, PE_TRANSPOSE_GROUP, P), dtype, 2, buffer=nl.psum, bank=bank)


def load_transposed(xT, src_rows, ntok, K, dtype, how, scratch=None):
    """xT[:, kt, 0:ntok] (SBUF [128, nk, >= ntok]) <- (src_rows(t0, n, k0, kc), the HBM rows
    t0 .. t0+n of columns k0 .. k0+kc)^T for every 128-column K tile kt.
    how="dma": one transposing DMA per K tile; how="pe": row blocks through the tensor
    engine (`scratch`: a TransposeScratch)."""
    nk = _cdiv(K, P)
    if how == "dma":
        for kt in nl.static_range(nk):
            k0 = kt * P
            kp = min(P, K - k0)
            nisa.dma_transpose(dst=xT[0:kp, kt, 0:ntok], src=src_rows(0, ntok, k0, kp))
        return
    if how != "pe":
        raise ValueError(f"x_transpose must be 'dma' or 'pe', got {how!r}")
    G = PE_TRANSPOSE_GROUP
    for g0 in nl.static_range(0, ntok, P):
        gp = min(P, ntok - g0)
        for c0 in nl.static_range(0, K, scratch.cols):
            cw = min(scratch.cols, K - c0)
            blk = scratch.blk.next()
            nisa.dma_copy(dst=blk[0:gp, 0:cw], src=src_rows(g0, gp, c0, cw))
            for j0 in nl.static_range(0, _cdiv(cw, P), G):
                tp = scratch.tp.next()
                n = min(G, _cdiv(cw, P) - j0)
                full = n if (c0 + (j0 + n) * P <= K) else n - 1   # a partial last K tile alone
                for j in nl.static_range(n):
                    k0 = (j0 + j) * P
                    kp = min(P, cw - k0)
                    nisa.nc_transpose(dst=tp[0:kp, j, 0:gp], data=blk[0:gp, k0:k0 + kp])
                kt0 = (c0 // P) + j0
                if full:
                    nisa.tensor_copy(dst=xT[0:P, kt0:kt0 + full, g0:g0 + gp],
                                     src=tp[0:P, 0:full, 0:gp])
                if full < n:
                    kp = K - (kt0 + full) * P
                    nisa.tensor_copy(dst=xT[0:kp, kt0 + full, g0:g0 + gp],
                                     src=tp[0:kp, full, 0:gp])


# -- stage 1: (x u)^T strip into SBUF -------------------------------------------------------

def _load_xT(x, xT, strip, t0, tb, x_transposed, how):
    """xT[:, kt, 0:tb] <- (x[strip t0 .. t0+tb, kt-th 128 columns])^T for every k tile."""
    K = x.shape[0] if x_transposed else x.shape[1]
    if x_transposed:
        # The producer already wrote x^T (K on rows): a plain DMA lands it in place.
        for kt in nl.static_range(_cdiv(K, P)):
            k0 = kt * P
            kp = min(P, K - k0)
            nisa.dma_copy(dst=xT[0:kp, kt, 0:tb], src=strip.cols(x, k0, kp, t0, tb))
        return
    # Transposing load: HBM rows of x become SBUF columns of x^T.
    scratch = TransposeScratch(x.dtype, 0, K) if how == "pe" else None
    load_transposed(xT, lambda g0, n, k0, kc: strip.rows(x, t0 + g0, n, k0, kc), tb, K,
                    x.dtype, how, scratch)


def _project(xT, u, xuT, tb):
    """xuT[:, rt, 0:tb] = (x u)^T for one sub-strip.

    Implicit transposition: u[k, r] tiles are the stationary operand and x^T[k, t] the
    moving one, so the result lands as (x u)^T[r, t] in PSUM. The r tiles go in groups
    as large as the 8 PSUM banks can accumulate for tb tokens (`strip_plan.u_group_tiles`:
    8 r tiles x 512 tokens, 16 x 256, 4 x 1024, ...); for each K tile one DMA brings the
    group's whole U row slab ([128 k, 128 * tiles] -- long contiguous runs per
    partition), which meets every token chunk of the sub-strip once. Partial sums over
    k accumulate in fp32 PSUM. U slabs are double-buffered (`n_slabs`)."""
    K, r = u.shape
    nrt = _cdiv(r, P)
    gt = strip_plan.u_group_tiles(tb)
    nk = _cdiv(K, P)
    slabs = Buffers("u_slab", (P, strip_plan.u_group_cols(r, tb)), xT.dtype,
                    strip_plan.n_slab_buffers(nk))
    for g0 in nl.static_range(0, nrt, gt):
        _project_group(xT, u, xuT, tb, g0, min(gt, nrt - g0), slabs)


def _project_group(xT, u, xuT, tb, g0, tiles, slabs):
    """One group of r tiles (g0 .. g0+tiles): its accumulators fill PSUM from bank 0."""
    K, r = u.shape
    slot = strip_plan.token_slot(tb)
    nch = strip_plan.token_chunks(tb)
    c0 = g0 * P
    cols = min(tiles * P, r - c0)
    acc = nl.ndarray((P, tiles, nch * slot), dtype=nl.float32, buffer=nl.psum,
                     name="xu_acc", address=(0, 0))
    for kt in nl.static_range(_cdiv(K, P)):
        k0 = kt * P
        kp = min(P, K - k0)
        ut = slabs.next()
        nisa.dma_copy(dst=ut[0:kp, 0:cols], src=u[k0:k0 + kp, c0:c0 + cols])
        for j in nl.static_range(tiles):
            rp = min(P, r - c0 - j * P)
            for c in nl.static_range(nch):
                t0 = c * slot
                cw = min(slot, tb - t0)
                nisa.nc_matmul(dst=acc[0:rp, j, t0:t0 + cw], stationary=ut[0:kp, j * P:j * P + rp],
                               moving=xT[0:kp, kt, t0:t0 + cw], accumulate=(kt > 0))
    # fp32 PSUM -> compute dtype, straight into the cached strip (vector engine)
    for j in nl.static_range(tiles):
        rp = min(P, r - c0 - j * P)
        for c in nl.static_range(nch):
            t0 = c * slot
            cw = min(slot, tb - t0)
            nisa.tensor_copy(dst=xuT[0:rp, g0 + j, t0:t0 + cw], src=acc[0:rp, j, t0:t0 + cw])


def _stage1_part(x, us, strip, t0, tb, x_transposed, j, how):
    """One stage-1 sub-strip: load its x^T once, project it through every u.
    Returns the (x u_i)^T pieces [128, ceil(r_i/128), tb] (x^T's last use is here)."""
    K = x.shape[0] if x_transposed else x.shape[1]
    xT = nl.ndarray((P, _cdiv(K, P), tb), dtype=x.dtype, buffer=nl.sbuf, name=f"xT{j}")
    _load_xT(x, xT, strip, t0, tb, x_transposed, how)
    outs = []
    for i, u in enumerate(us):
        xuT = nl.ndarray((P, _cdiv(u.shape[1], P), tb), dtype=x.dtype, buffer=nl.sbuf,
                         name=f"xuT{j}_{i}")
        _project(xT, u, xuT, tb)
        outs.append(xuT)
    return tuple(outs)


def _stage1(x, us, strip, plan, x_transposed):
    """Cache the whole (x u)^T strip, sub-strip by sub-strip: [(t0, tb, pieces)], t0
    relative to the strip start."""
    parts = []
    t0 = 0
    for j, tb in enumerate(plan.sub_heights(strip.height)):
        parts.append((t0, tb, _stage1_part(x, us, strip, t0, tb, x_transposed, j,
                                           plan.shape.x_transpose)))
        t0 += tb
    return parts


# -- stage 2: stream V against the cached strip ----------------------------------------------

def _load_vblock(v, vb, n0, nb):
    """vb[:, :, 0:nb] <- V[:, n0:n0+nb], one DMA per 128 rows of r."""
    r = v.shape[0]
    for rt in nl.static_range(_cdiv(r, P)):
        r0 = rt * P
        rp = min(P, r - r0)
        nisa.dma_copy(dst=vb[0:rp, rt, 0:nb], src=v[r0:r0 + rp, n0:n0 + nb])


def _stage2_rows(parts, v, y, block_n, strip, columns=None):
    """y[t, n] for the strip, normal layout: the cached (x u)^T tile [r, 128 tokens] is
    the stationary operand, the V block the moving one -> PSUM [tokens, block_n] (up to
    4 banks, two tiles); each output tile leaves as one DMA of block_n-wide rows.
    columns=(n0, nb): only that one block of output columns."""
    r, N = v.shape
    nr = _cdiv(r, P)
    dtype = parts[0][2][0].dtype
    blocks = [(n0, min(block_n, N - n0)) for n0 in range(0, N, block_n)] if columns is None \
        else [columns]
    n_out = len(blocks) * sum(_cdiv(tb, P) for _, tb, _ in parts)
    vbs = Buffers("v_block", (P, nr, block_n), dtype, n_buffers(len(blocks)))
    outs = Buffers("y_tile", (P, block_n), y.dtype, n_buffers(n_out))
    accs = Buffers("y_acc", (P, block_n), nl.float32, 2, buffer=nl.psum, bank=0)
    for n0, nb in blocks:
        vb = vbs.next()
        _load_vblock(v, vb, n0, nb)
        for t0, tb, pieces in parts:
            xuT = pieces[0]
            for g0 in nl.static_range(0, tb, P):
                gp = min(P, tb - g0)
                ps = accs.next()
                for rt in nl.static_range(nr):
                    rp = min(P, r - rt * P)
                    for c0 in nl.static_range(0, nb, MM_N):
                        cw = min(MM_N, nb - c0)
                        nisa.nc_matmul(dst=ps[0:gp, c0:c0 + cw],
                                       stationary=xuT[0:rp, rt, g0:g0 + gp],
                                       moving=vb[0:rp, rt, c0:c0 + cw], accumulate=(rt > 0))
                o = outs.next()
                for c0 in nl.static_range(0, nb, MM_N):
                    cw = min(MM_N, nb - c0)
                    nisa.tensor_copy(dst=o[0:gp, c0:c0 + cw], src=ps[0:gp, c0:c0 + cw])
                nisa.dma_copy(dst=strip.rows(y, t0 + g0, gp, n0, nb), src=o[0:gp, 0:nb])


def _stage2_cols(parts, vs, yT, block_n, gate_act, strip):
    """y^T[n, t] for the strip: V tiles [r, 128 n] stationary, the cached (x u)^T moving
    -> PSUM [n, tokens], which is already the transposed output layout. Each 128-row
    output tile spans the whole strip ([128 n, bm tokens] in SBUF) and leaves as one DMA
    of bm-wide rows.

    gate_act (MLP gate/up, vs = (v_gate, v_up)): the two products meet on chip as
    gate_act(gate) on the scalar engine times up on the vector engine, before the store.
    """
    N = vs[0].shape[1]
    bm = strip.height
    dtype = parts[0][2][0].dtype
    blocks = [(n0, min(block_n, N - n0)) for n0 in range(0, N, block_n)]
    n_out = sum(_cdiv(nb, P) for _, nb in blocks)
    n_g = n_out * sum(_cdiv(tb, MM_N) for _, tb, _ in parts)
    vbs = [Buffers(f"v_block{i}_", (P, _cdiv(v.shape[0], P), block_n), dtype,
                   n_buffers(len(blocks))) for i, v in enumerate(vs)]
    outs = Buffers("yT_tile", (P, bm), yT.dtype, n_buffers(n_out))
    gs = Buffers("silu", (P, MM_N), nl.float32, n_buffers(n_g)) if gate_act is not None else None
    accs = [Buffers(f"yT_acc{i}_", (P, MM_N), nl.float32, 2, buffer=nl.psum, bank=2 * i)
            for i in range(len(vs))]
    for n0, nb in blocks:
        vb = [b.next() for b in vbs]
        for i, v in enumerate(vs):
            _load_vblock(v, vb[i], n0, nb)
        for j0 in nl.static_range(0, nb, P):
            jp = min(P, nb - j0)
            o = outs.next()
            for t0, tb, pieces in parts:
                for c0 in nl.static_range(0, tb, MM_N):
                    cw = min(MM_N, tb - c0)
                    acc = []
                    for i, v in enumerate(vs):
                        r = v.shape[0]
                        ps = accs[i].next()
                        for rt in nl.static_range(_cdiv(r, P)):
                            rp = min(P, r - rt * P)
                            nisa.nc_matmul(dst=ps[0:jp, 0:cw], stationary=vb[i][0:rp, rt, j0:j0 + jp],
                                           moving=pieces[i][0:rp, rt, c0:c0 + cw],
                                           accumulate=(rt > 0))
                        acc.append(ps)
                    off = t0 + c0
                    if gate_act is not None:
                        g = gs.next()
                        nisa.activation(dst=g[0:jp, 0:cw], op=gate_act, data=acc[0][0:jp, 0:cw])
                        nisa.tensor_tensor(dst=o[0:jp, off:off + cw], data1=g[0:jp, 0:cw],
                                           data2=acc[1][0:jp, 0:cw], op=nl.multiply)
                    else:
                        nisa.tensor_copy(dst=o[0:jp, off:off + cw], src=acc[0][0:jp, 0:cw])
            nisa.dma_copy(dst=strip.cols(yT, n0 + j0, jp, 0, bm), src=o[0:jp, 0:bm])


def run_strips(x, us, vs, y, plan, x_transposed, out, act=None):
    """The fused kernels' outer loop: one row strip of BM tokens at a time (a hardware
    loop over the full strips, see `over_strips`). act: the MLP gate's activation (an
    `nl` function) for out "silu_cols"; nl.silu when not given."""
    S = plan.shape.S
    bm = min(plan.block_m, S)
    over_strips(S, bm, lambda strip: _strip(x, us, vs, y, strip, plan, x_transposed, out, act))


def _strip(x, us, vs, y, strip, plan, x_transposed, out, act=None):
    parts = _stage1(x, us, strip, plan, x_transposed)     # (x u)^T strip cached in SBUF
    if out == "rows":
        _stage2_rows(parts, vs[0], y, plan.block_n, strip)
    else:
        gate_act = (act or nl.silu) if out == "silu_cols" else None
        _stage2_cols(parts, vs, y, plan.block_n, gate_act, strip)


def check_dims(name, **dims):
    for k, (a, b) in dims.items():
        if a != b:
            raise ValueError(f"{name}: {k} mismatch ({a} != {b})")


def plan_on_target(shape, block_m, whole_strip=False):
    """The strip plan for `block_m` on the target being traced for."""
    return strip_plan.plan(shape, int(block_m), target_name(), whole_strip)


def x_transpose_for(dtype, x_transpose=None):
    """The transposing load the kernels use: `x_transpose` if given, else the target's
    default (`strip_plan.default_x_transpose`); fp32 always goes through the tensor
    engine (DMA transposes move 2-byte elements)."""
    if elem_bytes(dtype) >= 4:
        return "pe"
    how = x_transpose or strip_plan.default_x_transpose(target_name())
    if how not in strip_plan.X_TRANSPOSES:
        raise ValueError(f"x_transpose must be one of {strip_plan.X_TRANSPOSES}, got {how!r}")
    return how


def xuv_kernel_shape(name, x, u, v, out, x_transpose=None):
    """The strip model's view of a y = (x u) v launch, after checking the dims."""
    S, K = x.shape
    r = u.shape[1]
    check_dims(name, K=(u.shape[0], K), r=(v.shape[0], r))
    e = elem_bytes(x.dtype)
    return strip_plan.KernelShape(S, K, (r,), v.shape[1], e, elem_bytes(u.dtype),
                                  elem_bytes(v.dtype), e, out, False,
                                  x_transpose_for(x.dtype, x_transpose))


def elem_bytes(dtype):
    return 4 if dtype == nl.float32 else 2


@jit
def fused_xuv(x, u, v, block_m, transpose_out=False, x_transpose=None, whole_strip=False):
    """y = (x @ u) @ v as one kernel, (x u) never leaving the chip.

    x [S, K], u [K, r], v [r, N] in HBM (bf16 or fp32; u and v are cast to x's dtype
    on load). Returns y [S, N] in nl.shared_hbm, or y^T [N, S] if transpose_out.
    block_m: tokens per row strip (`blocking.select_block_m` chooses one;
    `blocking.fused_xuv` is this kernel with that choice).
    x_transpose: "dma" or "pe" (see `load_transposed`); None: the target's default.
    whole_strip: the paper's kernel as measured, x^T of the whole strip loaded at once
    (no stage-1 sub-strips; SBUF overflow spills); the default plans sub-strips that fit.
    Any S >= 1, any K, r, N (partial tiles are masked by slicing, never dropped).
    """
    shape = xuv_kernel_shape("fused_xuv", x, u, v, "cols" if transpose_out else "rows",
                             x_transpose)
    S, N = shape.S, shape.N
    plan = plan_on_target(shape, block_m, whole_strip)
    if transpose_out:
        y = nl.ndarray((N, S), dtype=x.dtype, buffer=nl.shared_hbm)
    else:
        y = nl.ndarray((S, N), dtype=x.dtype, buffer=nl.shared_hbm)
    run_strips(x, (u,), (v,), y, plan, False, shape.out)
    return y
