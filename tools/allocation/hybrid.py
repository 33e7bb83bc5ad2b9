"""The hybrid allocation: one greedy over channel blocks and rank blocks, all
losses in one unit (methods/hybrid.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

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


@dataclass
class Move:
    """One step of the hybrid greedy: set the `widths` and `ranks` entries it
    names. A cut removes `params` parameters at an estimated loss increase of
    `loss`; a give-back (after an overshoot) adds `params` and recovers `loss`."""

    loss: float
    params: int
    widths: Dict[int, int] = field(default_factory=dict)
    ranks: Dict[str, int] = field(default_factory=dict)


def allocate_hybrid(matrices: Sequence[Matrix], spectra: Mapping[str, Sequence[float]],
                    channel_losses: Mapping[int, Sequence[float]], inter: int, ratio: float, block: int) -> Plan:
    """One greedy allocation over both kinds of cut, all losses in one unit
    (Fisher-weighted output error): drop a block of intermediate channels of a
    layer (`channel_losses[layer][k]`, keeping k), lower a factored matrix by one
    block of rank, or factor a dense group (gate and up together) at one rank.
    From the dense model, the cut with the smallest loss per parameter removed is
    applied until the plan fits the budget; then, since the last cut may
    overshoot, the give-back with the largest loss recovered per parameter is
    applied while one still fits. Ties go to the first move in layer order. A
    factored matrix of a narrowed layer is costed at its reduced shape; its
    rank-truncation loss is read from the full-width spectrum (an upper bound:
    narrowing only removes energy). Never exceeds the budget; raises BudgetError
    when even the smallest plan does not fit."""
    mats = list(matrices)
    budget = hybrid_budget(mats, inter, ratio, block)
    plan = _HybridPlan(mats, spectra, channel_losses, inter, block)
    cost = plan.cost()
    while cost > budget:
        cuts = [move for move in plan.cuts() if move.params > 0]
        if not cuts:
            raise BudgetError(f"ratio {ratio} cannot be reached with block size {block}: every layer is at one "
                              f"block of channels and rank")
        cost = plan.apply(min(cuts, key=lambda move: max(move.loss, 0.0) / move.params))
    while True:
        fitting = [move for move in plan.give_backs() if 0 < move.params <= budget - cost]
        if not fitting:
            return plan.result()
        cost = plan.apply(max(fitting, key=lambda move: move.loss / move.params))


class _HybridPlan:
    """The ranks and widths of the hybrid greedy as it runs, and the moves open from them."""

    def __init__(self, mats: List[Matrix], spectra: Mapping[str, Sequence[float]],
                 channel_losses: Mapping[int, Sequence[float]], inter: int, block: int):
        self.mats, self.channel_losses, self.inter, self.block = mats, channel_losses, inter, block
        self.tails = {m.name: tail_energies(spectra[m.name]) for m in mats}
        self.layers = sorted({m.layer for m in mats})
        self.by_layer = {i: [m for m in mats if m.layer == i] for i in self.layers}
        self.ranks = {m.name: DENSE for m in mats}
        self.widths = {i: inter for i in self.layers}

    def shape(self, m: Matrix, width: Optional[int] = None) -> Matrix:
        """`m` in its layer at `width` channels (default: the layer's current width)."""
        return narrowed(m, self.widths[m.layer] if width is None else width)

    def tail(self, m: Matrix, r: int) -> float:
        """The estimated loss of `m` at rank r (0 when dense)."""
        t = self.tails[m.name]
        return 0.0 if r == DENSE else t[min(r, len(t) - 1)]

    def narrowed_widths(self) -> Dict[int, int]:
        return {i: k for i, k in self.widths.items() if k < self.inter}

    def cost(self) -> int:
        return plan_cost(self.mats, self.ranks, self.narrowed_widths())

    def apply(self, move: Move) -> int:
        """Apply `move`; the plan's new parameter count."""
        self.widths.update(move.widths)
        self.ranks.update(move.ranks)
        return self.cost()

    def result(self) -> Plan:
        return Plan(self.ranks, self.narrowed_widths())

    def cuts(self) -> Iterator[Move]:
        """Every cut open now, layer by layer: the layer's width, then each group's ranks."""
        for i in self.layers:
            yield from self._width_cut(i)
            groups: Dict[str, List[Matrix]] = {}
            for m in self.by_layer[i]:
                groups.setdefault(m.group or m.name, []).append(m)
            for members in groups.values():
                yield from self._rank_cuts(members)

    def _width_cut(self, i: int) -> Iterator[Move]:
        """One block of channels fewer in layer i (while two blocks remain)."""
        k, block = self.widths[i], self.block
        if k - block < block:
            return
        saved, extra, clamp = 0, 0.0, {}
        for m in self.by_layer[i]:
            r = self.ranks[m.name]
            new = narrowed(m, k - block)
            if r != DENSE and r > new.max_rank(block):
                # the narrower matrix holds less rank; below one block factoring saves nothing
                # there, and it goes back to dense (its truncation loss vanishes)
                clamp[m.name] = new.max_rank(block) if new.max_rank(block) >= block else DENSE
                extra += self.tail(m, clamp[m.name]) - self.tail(m, r)
            saved += self.shape(m).cost(r) - new.cost(clamp.get(m.name, r))
        loss = self.channel_losses[i][k - block] - self.channel_losses[i][k] + extra
        yield Move(loss, saved, {i: k - block}, clamp)

    def _rank_cuts(self, members: List[Matrix]) -> Iterator[Move]:
        """A dense group (gate/up, q/k/v) factored together at each rank that saves;
        a factored member one block of rank lower."""
        block = self.block
        if all(self.ranks[m.name] == DENSE for m in members):
            # members whose shapes hold less rank (k and v beside q) stay at their largest rank that saves
            tops = [self.shape(m).max_rank(block) for m in members]
            if min(tops) < block:
                return  # a member that no block-aligned rank saves on keeps the group dense
            for r in range(block, max(tops) + 1, block):
                at = {m.name: min(r, t) for m, t in zip(members, tops)}
                saved = sum(self.shape(m).dense - self.shape(m).cost(at[m.name]) for m in members)
                if saved > 0:
                    yield Move(sum(self.tail(m, at[m.name]) for m in members), saved, {}, at)
            return
        for m in members:
            r = self.ranks[m.name]
            if r - block >= block:
                yield Move(self.tail(m, r - block) - self.tail(m, r), block * (self.shape(m).m + self.shape(m).n),
                           {}, {m.name: r - block})

    def give_backs(self) -> Iterator[Move]:
        """Every give-back open now, layer by layer: one block of channels more
        (where every factored rank still fits the wider shape), one block of rank more."""
        block = self.block
        for i in self.layers:
            k = self.widths[i]
            wider = {m.name: self.shape(m, k + block) for m in self.by_layer[i]} if k + block <= self.inter else {}
            if wider and all(self.ranks[n] == DENSE or self.ranks[n] <= w.max_rank(block) for n, w in wider.items()):
                added = sum(wider[m.name].cost(self.ranks[m.name]) - self.shape(m).cost(self.ranks[m.name])
                            for m in self.by_layer[i])
                gain = self.channel_losses[i][k] - self.channel_losses[i][k + block]
                yield Move(gain, added, {i: k + block})
            for m in self.by_layer[i]:
                r = self.ranks[m.name]
                if r != DENSE and r + block <= self.shape(m).max_rank(block):
                    yield Move(self.tail(m, r) - self.tail(m, r + block), block * (self.shape(m).m + self.shape(m).n),
                               {}, {m.name: r + block})
