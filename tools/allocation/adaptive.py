"""The adaptive (greedy) allocations: ranks by the whitened or Fisher-weighted
spectra, channel widths by the Nyström loss curves; each spends the budget
where the estimate says it costs least."""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.tools.allocation.budget import (
    DENSE, LevelState, Matrix, rank_budget, tail_energies, width_budget)


def allocate_adaptive(matrices: Sequence[Matrix], spectra: Mapping[str, Sequence[float]], ratio: float,
                      block: int, normalize: bool = True, power: float = 1.0) -> Dict[str, int]:
    """Greedy allocation from the whitened singular spectra.

    Every matrix starts at one block; then the move with the largest loss
    reduction per added parameter is applied while it fits the budget. The loss
    of a matrix at rank r is the energy of the dropped whitened singular values,
    i.e. the squared output error on the calibration activations; with
    `normalize` it is divided by the matrix's total energy (relative error), so
    layers whose activations are large do not take the whole budget. Since each
    spectrum is sorted, the marginal gains fall block by block and the greedy
    choice is optimal up to the last, partly filled step. Losses are read from
    suffix sums of the squared spectra, computed once (benchmarks/allocate_timing.py).
    """
    budget = rank_budget(matrices, ratio, block)
    st = LevelState(matrices, block)
    for mat in matrices:
        if mat.name not in spectra:
            raise ValueError(f"no spectrum for {mat.name}")
    tails = {mat.name: tail_energies(spectra[mat.name]) for mat in matrices}
    weights = {}
    for mat in matrices:
        total = tails[mat.name][0]
        weights[mat.name] = 1.0 / total if (normalize and total > 0) else 1.0

    def loss(i: int, r: int) -> float:
        name = st.mats[i].name
        if r == DENSE:
            return 0.0
        tail = tails[name]
        return (weights[name] * tail[min(r, len(tail) - 1)]) ** power

    while True:
        best, best_score = None, -1.0
        cost_now = st.cost()
        seen_groups = set()
        for i in range(len(st.mats)):
            mv = st.step_up(i)
            if mv is None:
                continue
            moves, delta = mv
            if len(moves) > 1 or (len(moves) == 1 and st.levels[moves[0][0]][moves[0][1]] == DENSE):
                g = st.mats[i].group
                if g is not None:
                    if g in seen_groups:
                        continue
                    seen_groups.add(g)
            if delta <= 0 or cost_now + delta > budget:
                continue
            gain = sum(loss(j, st.rank(j)) - loss(j, st.levels[j][k]) for j, k in moves)
            score = gain / delta
            if score > best_score:
                best, best_score = moves, score
        if best is None:
            break
        st.apply(best)
    return st.ranks()


def allocate_widths_greedy(layers: Sequence[int], hidden: int, inter: int, losses: Mapping[int, Sequence[float]],
                           ratio: float, block: int) -> Dict[int, int]:
    """Channels removed one block at a time from the layer where the estimated
    loss (`losses[layer][k]`, keeping k channels) rises least, until the dense
    narrowed MLPs fit the budget."""
    budget = width_budget(layers, hidden, inter, ratio, block)
    widths = {i: inter for i in layers}
    cost = cf.mlp_params(hidden, inter) * len(layers)
    while cost > budget:
        i = min((j for j in layers if widths[j] > block),
                key=lambda j: (losses[j][widths[j] - block] - losses[j][widths[j]], j))
        widths[i] -= block
        cost -= cf.mlp_params(hidden, block)
    return {i: k for i, k in widths.items() if k < inter}
