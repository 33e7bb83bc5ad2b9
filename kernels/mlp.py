"""The SVD-compressed MLP as two kernels (NeuronMM section 4.2.2):

    h^T = up_gate(x, u_gate, v_gate, u_up, v_up)   # [I, S] = (act(x Ug Vg) * (x Uu Vu))^T
    y   = down(h^T, u_down, v_down)                 # [S, H] = h Ud Vd

Kernel 1 writes its result transposed so that kernel 2 can read it with no transpose
at all: h^T has the intermediate dim I on its rows, which is the contraction dim of
down's first stage and therefore belongs on the SBUF partitions -- a plain DMA puts it
there. Kernel 2 writes the normal [S, H] layout for the rest of the model.

Both kernels are the fused strip kernel of `xuv` (cached (x U)^T strip, implicit
transposition, fp32 PSUM accumulation, V streamed by blocks):
* up_gate: stage 1 loads each x^T sub-strip once and projects it through both U_gate
  and U_up (one pass over x for the two GEMMs; the ranks may differ); stage 2 streams
  V_gate and V_up blocks side by side, so each output tile's gate and up products
  meet on chip: the activation (SiLU, or Gemma's tanh-approximated GELU) on the scalar
  engine (reading PSUM), the product on the vector engine, then the store -- the
  activation never touches HBM;
* down: stage 1 reads h^T directly (no transposing DMA needed), stage 2 uses the
  normal-layout path.
"""
from . import strip_plan
from .nki_compat import jit, nl
from .xuv import check_dims, elem_bytes, plan_on_target, run_strips, x_transpose_for

# The gate activations `up_gate` computes on the scalar engine, by the names the model
# families use: SiLU (Llama, Qwen, Mistral) and GELU with the tanh approximation (Gemma),
# named by their `nki.language` functions and looked up while tracing, so that importing the
# kernels does not depend on what the installed `nki.language` exports.
ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_apprx_tanh"}


def activation_op(activation):
    """The scalar-engine function of a gate activation name."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"up_gate: activation {activation!r} is not one of {tuple(ACTIVATIONS)}")
    return getattr(nl, ACTIVATIONS[activation])


def up_gate_kernel_shape(x, u_gate, v_gate, u_up, v_up, x_transpose=None):
    """The strip model's view of an `up_gate` launch, after checking the dims
    (x_transpose: how x^T is made, `xuv.x_transpose_for`)."""
    S, H = x.shape
    rg, ru = u_gate.shape[1], u_up.shape[1]
    I = v_gate.shape[1]
    check_dims("up_gate", H_gate=(u_gate.shape[0], H), H_up=(u_up.shape[0], H),
               r_gate=(v_gate.shape[0], rg), r_up=(v_up.shape[0], ru), I=(v_up.shape[1], I))
    e = elem_bytes(x.dtype)
    return strip_plan.KernelShape(S, H, (rg, ru), I, e, elem_bytes(u_gate.dtype),
                                  elem_bytes(v_gate.dtype), e, "silu_cols", False,
                                  x_transpose_for(x.dtype, x_transpose))


def down_kernel_shape(h_t, u_down, v_down):
    """The strip model's view of a `down` launch, after checking the dims."""
    I, S = h_t.shape
    r = u_down.shape[1]
    check_dims("down", I=(u_down.shape[0], I), r=(v_down.shape[0], r))
    e = elem_bytes(h_t.dtype)
    return strip_plan.KernelShape(S, I, (r,), v_down.shape[1], e, elem_bytes(u_down.dtype),
                                  elem_bytes(v_down.dtype), e, "rows", True)


@jit
def up_gate(x, u_gate, v_gate, u_up, v_up, block_m, x_transpose=None, activation="silu"):
    """h^T [I, S] = (act(x @ u_gate @ v_gate) * (x @ u_up @ v_up))^T, act = `activation`
    ("silu" or "gelu_tanh", `ACTIVATIONS`).

    x [S, H]; u_gate [H, rg], v_gate [rg, I]; u_up [H, ru], v_up [ru, I] (rg != ru
    allowed). Output dtype = x's. block_m: tokens per row strip (`blocking.up_gate` is
    this kernel with the block-size selector's choice). x_transpose: how x^T is made
    ("dma" or "pe", `xuv.load_transposed`); None: the target's default.
    """
    act = activation_op(activation)
    shape = up_gate_kernel_shape(x, u_gate, v_gate, u_up, v_up, x_transpose)
    plan = plan_on_target(shape, block_m)
    h_t = nl.ndarray((shape.N, shape.S), dtype=x.dtype, buffer=nl.shared_hbm)
    run_strips(x, (u_gate, u_up), (v_gate, v_up), h_t, plan, False, "silu_cols", act)
    return h_t


@jit
def down(h_t, u_down, v_down, block_m):
    """y [S, H] = h @ u_down @ v_down, reading h transposed (h_t [I, S]) as written by
    `up_gate`. u_down [I, r], v_down [r, H]. Output dtype = h_t's. block_m: tokens per
    row strip (`blocking.down` is this kernel with the selector's choice)."""
    shape = down_kernel_shape(h_t, u_down, v_down)
    plan = plan_on_target(shape, block_m)
    y = nl.ndarray((shape.S, shape.N), dtype=h_t.dtype, buffer=nl.shared_hbm)
    run_strips(h_t, (u_down,), (v_down,), y, plan, True, "rows")
    return y
