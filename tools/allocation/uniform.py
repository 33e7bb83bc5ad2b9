"""The uniform allocations: eq.-5 ranks for every matrix, or the same channel
width in every layer, corrected to the global budget evenly over the layers."""
from __future__ import annotations

from typing import Dict, Sequence

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.tools.allocation.budget import (
    DENSE, LevelState, Matrix, eq5_rank, rank_budget, saves_parameters, spread_order, width_budget)


def allocate_uniform(matrices: Sequence[Matrix], ratio: float, block: int, theta: float = 0.5) -> Dict[str, int]:
    """Eq.-5 ranks for every matrix, then corrected to the global budget by
    moving matrices, spread evenly over the layers, one level at a time: down
    while over budget, then up while the budget still allows. Returns
    {name: rank}, DENSE (0) for matrices kept dense."""
    budget = rank_budget(matrices, ratio, block)
    st = LevelState(matrices, block)
    for i, mat in enumerate(st.mats):
        r = eq5_rank(mat.m, mat.n, ratio, block, theta)
        if not saves_parameters(mat.m, mat.n, r):
            r = DENSE
        if r == DENSE:
            st.idx[i] = len(st.levels[i]) - 1
        else:
            st.set_rank(i, r)
    # gate/up consistency: a group is dense only as a whole
    for g, members in st.groups.items():
        if any(st.rank(j) == DENSE for j in members) and not all(st.rank(j) == DENSE for j in members):
            for j in members:
                if st.rank(j) == DENSE and len(st.levels[j]) > 1:
                    st.idx[j] = len(st.levels[j]) - 2
    order = spread_order(st.mats)
    # lower levels until within budget
    changed = True
    while st.cost() > budget and changed:
        changed = False
        for i in order:
            if st.cost() <= budget:
                break
            mv = st.step_down(i)
            if mv is not None:
                st.apply(mv[0])
                changed = True
    # raise levels while the budget allows, lowest levels first, evenly spread
    changed = True
    while changed:
        changed = False
        floor = min(st.idx[i] for i in order)
        for lvl in range(floor, max(len(lv) for lv in st.levels)):
            for i in order:
                if st.idx[i] != lvl:
                    continue
                mv = st.step_up(i)
                if mv is not None and st.cost() + mv[1] <= budget:
                    st.apply(mv[0])
                    changed = True
            if changed:
                break
    return st.ranks()


def allocate_widths_uniform(layers: Sequence[int], hidden: int, inter: int, ratio: float,
                            block: int) -> Dict[int, int]:
    """The same block-aligned width in every layer, the budget's remainder spent
    one block at a time on layers spread evenly (dense MLPs of
    cf.mlp_params(h, k) parameters each). Returns {layer: width} for the narrowed layers."""
    budget = width_budget(layers, hidden, inter, ratio, block)
    per_block = cf.mlp_params(hidden, block)
    base = (budget // (len(layers) * per_block)) * block
    widths = {i: base for i in layers}
    spare = budget - len(layers) * cf.mlp_params(hidden, base)
    order = [layers[k] for k in spread_order([Matrix(str(i), 1, 1, None, i) for i in layers])]
    for i in order:
        if spare >= per_block and widths[i] < inter:
            widths[i] += block
            spare -= per_block
    return {i: k for i, k in widths.items() if k < inter}
