"""The hybrid allocation: one greedy over channel blocks and rank blocks, all
losses in one unit (methods/hybrid.py)."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

from vllm_neuronmlp.mlp_families import attention_role_of
from vllm_neuronmlp.tools.allocation.budget import (
    BudgetError, DENSE, Matrix, Plan, budget_params, check_block_size, check_ratio, narrowed, plan_cost,
    reachable, tail_energies)


def hybrid_budget(matrices: Sequence[Matrix], inter: int, ratio: float, block: int) -> int:
    """The parameter budget of the hybrid allocation; BudgetError when even the
    cheapest plan (every layer at the narrowest width, each group of matrices
    dense or at one block of rank) is over it. Depends on shapes only."""
    check_ratio(ratio)
    check_block_size(block)
    budget = budget_params(matrices, ratio)
    narrowest = inter - block * ((inter - block) // block)  # the width moves stop below two blocks
    groups: Dict[str, List[Matrix]] = {}
    for m in matrices:
        groups.setdefault(m.group or m.name, []).append(narrowed(m, narrowest))
    # a group is factored together or not at all: dense when a member cannot save with one block
    floor = sum(sum(n.dense for n in members) if min(n.max_rank(block) for n in members) < block
                else sum(min(n.dense, n.cost(block)) for n in members) for members in groups.values())
    if floor > budget:
        dense = sum(m.dense for m in matrices)
        ranks = " and attention at one block of rank" if any(attention_role_of(m.name) for m in matrices) else ""
        raise BudgetError(f"ratio {ratio} cannot be reached with block size {block}: {narrowest} channels per "
                          f"layer{ranks} keep {floor:,} of {dense:,} parameters (largest reachable ratio "
                          f"{reachable(1 - floor / dense)})")
    return budget


def allocate_hybrid(matrices: Sequence[Matrix], spectra: Mapping[str, Sequence[float]],
                    channel_losses: Mapping[int, Sequence[float]], inter: int, ratio: float, block: int) -> Plan:
    """One greedy allocation over both kinds of moves, all losses in one unit
    (Fisher-weighted output error): drop a block of intermediate channels of a
    layer (`channel_losses[layer][k]`, keeping k), lower a factored matrix by one
    block of rank, or factor a dense matrix (gate and up together) at the rank
    with the best loss per parameter saved. From the dense model, the move with
    the smallest loss increase per parameter removed is applied until the plan
    fits the budget. A factored matrix of a narrowed layer is costed at its
    reduced shape; its rank-truncation loss is read from the full-width spectrum
    (an upper bound: narrowing only removes energy). Never exceeds the budget;
    raises BudgetError when even the smallest plan does not fit."""
    mats = list(matrices)
    budget = hybrid_budget(mats, inter, ratio, block)
    tails = {m.name: tail_energies(spectra[m.name]) for m in mats}
    layers = sorted({m.layer for m in mats})
    by_layer = {i: [m for m in mats if m.layer == i] for i in layers}
    ranks = {m.name: DENSE for m in mats}
    widths = {i: inter for i in layers}

    def shape(m: Matrix) -> Matrix:
        return narrowed(m, widths[m.layer])

    def tail(m: Matrix, r: int) -> float:
        t = tails[m.name]
        return 0.0 if r == DENSE else t[min(r, len(t) - 1)]

    def moves():
        """(loss increase, parameters saved, apply) of every available move."""
        for i in layers:
            k = widths[i]
            if k - block >= block:
                saved, extra, clamp = 0, 0.0, {}
                for m in by_layer[i]:
                    r = ranks[m.name]
                    new = narrowed(m, k - block)
                    if r != DENSE and r > new.max_rank(block):
                        # the narrower matrix holds less rank; below one block factoring saves nothing
                        # there, and it goes back to dense (its truncation loss vanishes)
                        clamp[m.name] = new.max_rank(block) if new.max_rank(block) >= block else DENSE
                        extra += tail(m, clamp[m.name]) - tail(m, r)
                    saved += shape(m).cost(r) - new.cost(clamp.get(m.name, r))
                dloss = channel_losses[i][k - block] - channel_losses[i][k] + extra
                yield dloss, saved, ("width", i, clamp)
            groups: Dict[Optional[str], List[Matrix]] = {}
            for m in by_layer[i]:
                groups.setdefault(m.group or m.name, []).append(m)
            for members in groups.values():
                if all(ranks[m.name] == DENSE for m in members):
                    # a group (gate/up, q/k/v) is factored together; members whose shapes hold less rank
                    # (k and v beside q) stay at their largest rank that saves parameters
                    tops = [shape(m).max_rank(block) for m in members]
                    if min(tops) < block:
                        continue  # a member that no block-aligned rank saves on keeps the group dense
                    for r in range(block, max(tops) + 1, block):
                        at = {m.name: min(r, t) for m, t in zip(members, tops)}
                        saved = sum(shape(m).dense - shape(m).cost(at[m.name]) for m in members)
                        if saved > 0:
                            yield sum(tail(m, at[m.name]) for m in members), saved, ("factor", at)
                else:
                    for m in members:
                        r = ranks[m.name]
                        if r - block >= block:
                            yield tail(m, r - block) - tail(m, r), block * (shape(m).m + shape(m).n), \
                                ("rank", [m.name], r - block)

    cost = plan_cost(mats, ranks, {})
    while cost > budget:
        best = None
        for dloss, saved, move in moves():
            if saved <= 0:
                continue
            score = max(dloss, 0.0) / saved
            if best is None or score < best[0]:
                best = (score, move)
        if best is None:
            raise BudgetError(f"ratio {ratio} cannot be reached with block size {block}: every layer is at one "
                              f"block of channels and rank")
        kind, *args = best[1]
        if kind == "width":
            i, clamp = args
            widths[i] -= block
            ranks.update(clamp)
        elif kind == "factor":
            ranks.update(args[0])
        else:
            names, r = args
            for n in names:
                ranks[n] = r
        cost = plan_cost(mats, ranks, {i: k for i, k in widths.items() if k < inter})

    # the last move may overshoot: give back, best loss reduction per parameter first, what still fits
    while True:
        best = None
        for i in layers:
            k = widths[i]
            if k + block <= inter and all(ranks[m.name] == DENSE or ranks[m.name] <= narrowed(m, k + block)
                                          .max_rank(block) for m in by_layer[i]):
                added = sum(narrowed(m, k + block).cost(ranks[m.name]) - shape(m).cost(ranks[m.name])
                            for m in by_layer[i])
                gain = channel_losses[i][k] - channel_losses[i][k + block]
                best = _better(best, gain, added, cost, budget, ("width", i))
            for m in by_layer[i]:
                r = ranks[m.name]
                if r != DENSE and r + block <= shape(m).max_rank(block):
                    best = _better(best, tail(m, r) - tail(m, r + block), block * (shape(m).m + shape(m).n), cost,
                                   budget, ("rank", m.name))
        if best is None:
            break
        kind, key = best[1]
        if kind == "width":
            widths[key] += block
        else:
            ranks[key] += block
        cost = plan_cost(mats, ranks, {i: k for i, k in widths.items() if k < inter})
    return Plan(ranks, {i: k for i, k in widths.items() if k < inter})


def _better(best, gain: float, added: int, cost: int, budget: int, move):
    """The better of `best` and a move adding `added` parameters for `gain`, if it fits."""
    if added <= 0 or cost + added > budget:
        return best
    score = gain / added
    return (score, move) if best is None or score > best[0] else best
