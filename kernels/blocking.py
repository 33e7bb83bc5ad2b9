"""Block-size selection for the fused SVD kernels (NeuronMM §4.3, eqs. 10-11), and the
kernels with the selected block.

Arrows run one way: this module runs the kernels (`xuv`, `mlp`) to rank block sizes;
the kernels know only their strip plan (`strip_plan`), and take the block size as an
argument.

Cost (`modeled_time`): the emulator's modelled latency of the very launch, from a
count-only run of the kernel (kernels/sim: the timeline of its instruction stream). There
is one cost implementation; the strip loop is a hardware loop whose body the emulator
traces once and replays, so such a run is cheap (cached per shape, block and target).

Selector (`select_block_m`, default objective "time"): among the BMs (multiples of
128, up to one strip covering S) whose peak SBUF stays within the budget,
(1 - HEADROOM) of capacity, the ones whose modelled time is within TIME_TIE of the
best; among those, the fewest HBM bytes (then the smaller BM). Once the tensor engine
bounds the time, many BMs tie, and the fewest bytes is the tie-break that costs
nothing (it leaves DMA and HBM slack for what the model does not see).
objective="ridge": the paper's rule taken literally -- the smallest BM whose strip
clears RIDGE_MARGIN x the roofline ridge (peak FLOP/s / HBM bytes/s: ~224 for bf16 on
trn1); objective="traffic": the fewest HBM bytes among the BMs clearing that ridge.

`fused_xuv`, `up_gate`, `down` here are the kernels of `xuv` / `mlp` with `block_m`
chosen by the selector while they are traced, for the target being traced for
(`nki_compat.target_name`: the emulated target, or the NeuronCore the real compiler
targets). They are what `launch` runs. The selector runs the emulator, which is plain
Python, so it works inside a real NKI trace too.
"""
from dataclasses import replace
from functools import lru_cache

from . import mlp, sim, xuv
from .nki_compat import jit, target_name
from .sim.targets import bracket_end, get_target
from .strip_plan import (P, KernelShape, arithmetic_intensity, hbm_bytes, sbuf_budget,
                         sbuf_peak_bytes)

RIDGE_MARGIN = 2.0
TIME_TIE = 0.01         # modelled times within 1% of the best count as a tie


# -- modelled cost: the emulator's own count-only run -------------------------------------

def kernel_for(ks: KernelShape):
    """(kernel, argument specs, kwargs) of the fused kernel launch `ks` describes."""
    spec = sim.spec
    dt = lambda e: "float32" if e >= 4 else "bfloat16"   # noqa: E731
    if ks.out == "silu_cols":
        rg, ru = ks.ranks
        args = [spec((ks.S, ks.K), dt(ks.e)), spec((ks.K, rg), dt(ks.e_u)),
                spec((rg, ks.N), dt(ks.e_v)), spec((ks.K, ru), dt(ks.e_u)),
                spec((ru, ks.N), dt(ks.e_v))]
        return mlp.up_gate, args, {"x_transpose": ks.x_transpose}
    (r,) = ks.ranks
    if ks.x_transposed:
        args = [spec((ks.K, ks.S), dt(ks.e)), spec((ks.K, r), dt(ks.e_u)),
                spec((r, ks.N), dt(ks.e_v))]
        return mlp.down, args, {}
    args = [spec((ks.S, ks.K), dt(ks.e)), spec((ks.K, r), dt(ks.e_u)), spec((r, ks.N), dt(ks.e_v))]
    return xuv.fused_xuv, args, {"transpose_out": ks.out == "cols", "x_transpose": ks.x_transpose}


def modeled_stats(ks: KernelShape, block_m: int, target="trn1"):
    """The emulator's `Stats` for the launch with strips of `block_m` tokens (count-only
    run: one cost implementation, the emulator's timeline)."""
    return _modeled_stats(ks, int(block_m), get_target(target))


@lru_cache(maxsize=1024)
def _modeled_stats(ks, block_m, t):
    kernel, args, kw = kernel_for(ks)
    return sim.run(kernel, *args, target=t, count_only=True, block_m=block_m, **kw)[1]


def modeled_time(ks: KernelShape, block_m: int, target="trn1") -> float:
    """Modelled latency (s) of the launch with strips of `block_m` tokens."""
    return modeled_stats(ks, block_m, target).modeled_latency_s


# -- the selector -----------------------------------------------------------------------

def candidate_blocks(ks: KernelShape, target="trn1"):
    """BM = 128 x (1, 2, 3, 4, 6, 8, 12, 16, ...) -- powers of two and the midpoints
    between them -- while the plan fits the budget (and not beyond one strip). Each
    candidate costs a count-only emulator run; the geometric grid keeps that at a dozen
    runs for any S."""
    budget = sbuf_budget(target)
    k = 1
    while True:
        for bm in (P * k, P * k * 3 // 2) if k >= 2 else (P * k,):
            if sbuf_peak_bytes(ks, bm, target) > budget:
                return
            yield bm
            if bm >= ks.S:
                return
        k *= 2


def select_block_m(ks: KernelShape, target="trn1", objective="time",
                   ridge_margin=RIDGE_MARGIN) -> int:
    """Block size for the fused kernels.

    objective="time" (the default the kernels use): among the BMs that fit the budget,
    those whose modelled time (`modeled_time`: the emulator's timeline latency of a
    count-only run of the kernel) is within TIME_TIE of the best; of those, the fewest
    HBM bytes for this S (ties: the smaller BM).
    objective="ridge": the paper's rule taken literally, the smallest BM clearing
    ridge_margin x the roofline ridge; objective="traffic": the fewest HBM bytes among
    the BMs clearing it. Small S: the whole S in one strip once BM >= S. If nothing
    fits, 128 (the emulator then reports the capacity error); if nothing clears the
    ridge, the largest BM that fits.
    """
    if objective not in ("time", "ridge", "traffic"):
        raise ValueError(f"objective must be 'time', 'ridge' or 'traffic', got {objective!r}")
    t = get_target(target)
    fits = list(candidate_blocks(ks, target))
    if not fits:
        return P
    total = lambda bm: sum(hbm_bytes(ks, bm, target))   # noqa: E731
    if objective == "time":
        lat = {bm: modeled_time(ks, bm, target) for bm in fits}
        best = min(lat.values())
        near = [bm for bm in fits if lat[bm] <= (1.0 + TIME_TIE) * best]
        return min(near, key=lambda bm: (total(bm), bm))
    want = ridge_margin * t.ridge_flop_per_byte
    clearing = [bm for bm in fits if bm >= ks.S or arithmetic_intensity(ks, bm, target) >= want]
    if not clearing:
        return fits[-1]
    if objective == "ridge":
        return clearing[0]
    return min(clearing, key=lambda bm: (total(bm), bm))


# -- the transposing load ----------------------------------------------------------------

def x_transpose_choice(ks: KernelShape, block_m: int, target="trn1") -> str:
    """How the fused kernels make x^T on `target`: "dma" where the DMA transpose's
    throughput is documented (trn2); elsewhere (trn1) the tensor engine ("pe") unless the
    model shows the DMA transpose cheaper even at the pessimistic end of its bracket
    (`targets.bracket_end`), which it cannot for any shape with a transposing load."""
    t = get_target(target)
    if ks.x_transposed or ks.e >= 4:
        return ks.x_transpose
    if t.dma_transpose_documented:
        return "dma"
    worst = bracket_end(t, "pessimistic")
    times = {how: modeled_time(replace(ks, x_transpose=how), block_m, worst)
             for how in ("pe", "dma")}
    return "dma" if times["dma"] < times["pe"] else "pe"


# -- the kernels with the selector's block ------------------------------------------------

@jit
def fused_xuv(x, u, v, transpose_out=False):
    """`xuv.fused_xuv` with `block_m = select_block_m(...)` and the transposing load of
    `x_transpose_choice`, for the target being traced."""
    shape = xuv.xuv_kernel_shape("fused_xuv", x, u, v, "cols" if transpose_out else "rows")
    bm = select_block_m(shape, target_name())
    return xuv.fused_xuv.inline(x, u, v, bm, transpose_out,
                                x_transpose_choice(shape, bm, target_name()))


@jit
def up_gate(x, u_gate, v_gate, u_up, v_up, activation="silu"):
    """`mlp.up_gate` with `block_m = select_block_m(...)` and the transposing load of
    `x_transpose_choice`, for the target being traced (activation: `mlp.ACTIVATIONS`)."""
    shape = mlp.up_gate_kernel_shape(x, u_gate, v_gate, u_up, v_up)
    bm = select_block_m(shape, target_name())
    return mlp.up_gate.inline(x, u_gate, v_gate, u_up, v_up, bm,
                              x_transpose_choice(shape, bm, target_name()), activation)


@jit
def down(h_t, u_down, v_down):
    """`mlp.down` with `block_m = select_block_m(...)` for the target being traced."""
    shape = mlp.down_kernel_shape(h_t, u_down, v_down)
    return mlp.down.inline(h_t, u_down, v_down, select_block_m(shape, target_name()))
