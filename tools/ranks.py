"""Block-aligned ranks and their allocation under a global parameter budget.

Vocabulary: a *matrix* is one MLP projection `W [m, n]` (m = in_features,
n = out_features). Factored at rank r it costs `r (m + n)` parameters instead of
`m n`. The *ratio* is the fraction of all targeted parameters removed (paper
eq. 4). Every rank is a multiple of the block size B (the kernels tile by it).

- :func:`eq5_rank` is the per-matrix rule of paper eq. 5.
- Alone it cannot hit most budgets (on SmolLM2, hidden 576, every ratio up to
  0.08 rounds to the same rank), so both allocations below treat the budget as
  global and the alignment as per-matrix: each matrix sits on one *level*
  (a block-aligned rank, or dense), and matrices are moved between
  neighbouring levels until the total fits the budget.
- :func:`allocate_uniform` starts every matrix at its eq.-5 rank and spreads
  the correction evenly over the layers.
- :func:`allocate_adaptive` spends the budget greedily where the whitened
  spectrum says a block of rank buys the largest loss reduction per parameter.

gate and up of one layer are factored together or kept dense together (vLLM
merges them), so "dense" is a level the pair enters and leaves as one.
Neither allocation ever exceeds the budget; when even one block per matrix is
over it, both raise BudgetError naming the largest reachable ratio.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from vllm_neuronmlp import mlp_families as fam

DENSE = 0  # rank value meaning "kept dense"


class BudgetError(ValueError):
    """The requested ratio cannot be reached with block-aligned ranks."""


def round_theta(x: float, theta: float = 0.5) -> int:
    """Round with threshold theta: up when the fractional part is >= theta."""
    if not 0.0 < theta <= 1.0:
        raise ValueError(f"rounding threshold must be in (0, 1], got {theta}")
    base = math.floor(x)
    return int(base + (1 if x - base >= theta else 0))


def eq5_rank(m: int, n: int, ratio: float, block: int, theta: float = 0.5) -> int:
    """Paper eq. 5: `r = B * round_theta((1 - ratio) m n / ((m + n) B))`, at
    least one block. The result may save nothing (`r (m + n) >= m n`); callers
    keep such a matrix dense (see :func:`saves_parameters`)."""
    check_block_size(block)
    check_ratio(ratio)
    r = block * round_theta((1.0 - ratio) * m * n / ((m + n) * block), theta)
    return max(block, r)


def check_ratio(ratio: float) -> None:
    if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be strictly between 0 and 1 (fraction of MLP parameters removed), got {ratio}")


def check_block_size(block: int) -> None:
    if not isinstance(block, int) or isinstance(block, bool) or block <= 0 or block % 32:
        raise ValueError(f"block size must be a positive multiple of 32, got {block}")


def saves_parameters(m: int, n: int, r: int) -> bool:
    return r * (m + n) < m * n


@dataclass(frozen=True)
class Matrix:
    """One targeted projection. `group` ties gate and up of a layer together
    for the dense level (None for down)."""

    name: str
    m: int
    n: int
    group: Optional[str] = None
    layer: int = 0

    @property
    def dense(self) -> int:
        return self.m * self.n

    def cost(self, rank: int) -> int:
        return self.dense if rank == DENSE else rank * (self.m + self.n)

    def max_rank(self, block: int) -> int:
        """Largest block-aligned rank that still saves parameters (0 if none)."""
        r = (self.m * self.n - 1) // (self.m + self.n)
        return (r // block) * block


def total_cost(matrices: Sequence[Matrix], ranks: Mapping[str, int]) -> int:
    return sum(mat.cost(ranks[mat.name]) for mat in matrices)


def achieved_ratio(matrices: Sequence[Matrix], ranks: Mapping[str, int]) -> float:
    dense = sum(mat.dense for mat in matrices)
    return 1.0 - total_cost(matrices, ranks) / dense


def budget_params(matrices: Sequence[Matrix], ratio: float) -> int:
    """Largest number of parameters the targeted matrices may keep."""
    return _kept(sum(mat.dense for mat in matrices), ratio)


def _kept(total: int, ratio: float) -> int:
    """floor((1 - ratio) x total), the integer total multiplied last (a float product of
    its factors rounds below an exact budget)."""
    return int(math.floor((1.0 - ratio) * total + 1e-9))


def _levels(mat: Matrix, block: int) -> List[int]:
    """Ranks in increasing cost: B, 2B, ..., max_rank, then DENSE."""
    top = mat.max_rank(block)
    return [r for r in range(block, top + 1, block)] + [DENSE]


def _spread_order(matrices: Sequence[Matrix]) -> List[int]:
    """Indices ordered so any prefix is spread evenly over the layers and the
    projections (bit-reversal over layers, projections interleaved)."""
    layers = sorted({mat.layer for mat in matrices})
    nbits = max(1, (len(layers) - 1).bit_length())

    def bitrev(i: int) -> int:
        return int(format(i, f"0{nbits}b")[::-1], 2)

    layer_rank = {layer: bitrev(i) for i, layer in enumerate(layers)}
    kinds = sorted({mat.name.rpartition(".")[2] for mat in matrices})
    kind_pos = {k: i for i, k in enumerate(kinds)}
    return sorted(range(len(matrices)),
                  key=lambda i: ((layer_rank[matrices[i].layer] + kind_pos[matrices[i].name.rpartition(".")[2]])
                                 % max(1, len(layers)),
                                 kind_pos[matrices[i].name.rpartition(".")[2]], layer_rank[matrices[i].layer]))


def _reachable(ratio: float) -> str:
    """A largest reachable ratio for a message, rounded down so that it is reachable."""
    return f"{math.floor(ratio * 1e4 + 1e-9) / 1e4:.4f}"


def _check_feasible(st: "_State", budget: int, ratio: float, block: int) -> None:
    floor = sum(m.cost(lv[0]) for m, lv in zip(st.mats, st.levels))
    if floor > budget:
        dense = sum(m.dense for m in st.mats)
        raise BudgetError(f"ratio {ratio} cannot be reached with block size {block}: even one block per matrix "
                          f"keeps {floor:,} of {dense:,} parameters (largest reachable ratio "
                          f"{_reachable(1 - floor / dense)})")


class _State:
    """Per-matrix level indices with the gate/up dense coupling enforced."""

    def __init__(self, matrices: Sequence[Matrix], block: int):
        self.mats = list(matrices)
        self.levels = [_levels(m, block) for m in self.mats]
        self.idx = [0] * len(self.mats)
        self.groups: Dict[str, List[int]] = {}
        for i, m in enumerate(self.mats):
            if m.group is not None:
                self.groups.setdefault(m.group, []).append(i)

    def rank(self, i: int) -> int:
        return self.levels[i][self.idx[i]]

    def cost(self) -> int:
        return sum(m.cost(self.rank(i)) for i, m in enumerate(self.mats))

    def set_rank(self, i: int, r: int) -> None:
        lv = self.levels[i]
        if r in lv:
            self.idx[i] = lv.index(r)
        else:  # nearest level at or below r (ranks beyond the max become dense)
            below = [k for k, v in enumerate(lv) if v != DENSE and v <= r]
            self.idx[i] = below[-1] if below else 0

    def members(self, i: int) -> List[int]:
        g = self.mats[i].group
        return self.groups[g] if g is not None else [i]

    def step_up(self, i: int) -> Optional[Tuple[List[Tuple[int, int]], int]]:
        """The move that raises matrix i one level: [(index, new level idx)], cost delta."""
        lv = self.levels[i]
        k = self.idx[i]
        if k + 1 >= len(lv):
            return None
        if lv[k + 1] != DENSE:
            return [(i, k + 1)], self.mats[i].cost(lv[k + 1]) - self.mats[i].cost(lv[k])
        # entering dense: the whole group goes dense together
        members = self.members(i)
        moves, delta = [], 0
        for j in members:
            dj = len(self.levels[j]) - 1
            if self.idx[j] != dj:
                moves.append((j, dj))
                delta += self.mats[j].cost(DENSE) - self.mats[j].cost(self.rank(j))
        return moves, delta

    def step_down(self, i: int) -> Optional[Tuple[List[Tuple[int, int]], int]]:
        lv = self.levels[i]
        k = self.idx[i]
        if k == 0:
            return None
        if lv[k] != DENSE:
            return [(i, k - 1)], self.mats[i].cost(lv[k - 1]) - self.mats[i].cost(lv[k])
        moves, delta = [], 0
        for j in self.members(i):
            if self.rank(j) == DENSE:
                kj = len(self.levels[j]) - 2
                if kj < 0:
                    return None  # this matrix cannot be factored at all
                moves.append((j, kj))
                delta += self.mats[j].cost(self.levels[j][kj]) - self.mats[j].cost(DENSE)
        return moves, delta

    def apply(self, moves: List[Tuple[int, int]]) -> None:
        for j, k in moves:
            self.idx[j] = k

    def ranks(self) -> Dict[str, int]:
        return {m.name: self.rank(i) for i, m in enumerate(self.mats)}


def allocate_uniform(matrices: Sequence[Matrix], ratio: float, block: int, theta: float = 0.5) -> Dict[str, int]:
    """Eq.-5 ranks for every matrix, then corrected to the global budget by
    moving matrices, spread evenly over the layers, one level at a time: down
    while over budget, then up while the budget still allows. Returns
    {name: rank}, DENSE (0) for matrices kept dense."""
    check_ratio(ratio)
    check_block_size(block)
    budget = budget_params(matrices, ratio)
    st = _State(matrices, block)
    _check_feasible(st, budget, ratio, block)
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
    order = _spread_order(st.mats)
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


def truncation_loss(spectrum: Sequence[float], rank: int) -> float:
    """Sum of squared singular values dropped at `rank` (0 for dense)."""
    if rank == DENSE:
        return 0.0
    return float(sum(s * s for s in spectrum[rank:]))


def tail_energies(spectrum: Sequence[float]) -> List[float]:
    """Suffix sums: `tails[r]` = sum of squared singular values from index r on
    (= truncation_loss(spectrum, r)); `tails[len(spectrum)] = 0`."""
    tails = [0.0] * (len(spectrum) + 1)
    for k in range(len(spectrum) - 1, -1, -1):
        tails[k] = tails[k + 1] + float(spectrum[k]) ** 2
    return tails


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
    check_ratio(ratio)
    check_block_size(block)
    budget = budget_params(matrices, ratio)
    st = _State(matrices, block)
    _check_feasible(st, budget, ratio, block)
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


def matrices_from_shapes(shapes: Mapping[str, Tuple[int, int]]) -> List[Matrix]:
    """Matrix records from {module name: (in, out)}; gate/up share a group per layer."""
    out = []
    for name, (m, n) in shapes.items():
        group = name.rpartition(".")[0] if fam.role_of(name) in (fam.GATE, fam.UP) else None
        out.append(Matrix(name=name, m=m, n=n, group=group, layer=layer_index(name)))
    return out


def layer_index(name: str) -> int:
    """Decoder layer number in a module name (`...layers.3.mlp...` -> 3), 0 if none."""
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return 0


# ---------------------------------------------------------------- intermediate widths
# A layer may also keep only k of its I intermediate channels (methods/nystrom.py):
# its gate/up outputs and down inputs are k wide. A *plan* is ranks plus widths.

@dataclass
class Plan:
    """An allocation: {module: rank (DENSE = dense)} and {layer index: width k}
    for the layers narrowed below the intermediate size (absent = full width)."""

    ranks: Dict[str, int]
    widths: Dict[int, int]


def narrowed(mat: Matrix, width: Optional[int]) -> Matrix:
    """The matrix of a layer narrowed to `width` intermediate channels: gate/up
    lose output columns, down loses input rows (None: unchanged)."""
    if width is None:
        return mat
    role = fam.role_of(mat.name)
    if role == fam.DOWN:
        return Matrix(mat.name, width, mat.n, mat.group, mat.layer)
    return Matrix(mat.name, mat.m, width, mat.group, mat.layer)


def plan_cost(matrices: Sequence[Matrix], ranks: Mapping[str, int], widths: Mapping[int, int]) -> int:
    return sum(narrowed(m, widths.get(m.layer)).cost(ranks.get(m.name, DENSE)) for m in matrices)


def plan_ratio(matrices: Sequence[Matrix], ranks: Mapping[str, int], widths: Mapping[int, int]) -> float:
    """Fraction of the targeted (full-width, dense) parameters a plan removes."""
    return 1.0 - plan_cost(matrices, ranks, widths) / sum(m.dense for m in matrices)


def _width_budget(layers: Sequence[int], hidden: int, inter: int, ratio: float, block: int) -> int:
    check_ratio(ratio)
    check_block_size(block)
    if inter % block:
        raise BudgetError(f"intermediate size {inter} is not a multiple of block size {block}: channel widths "
                          f"are block multiples, so the full width is not a level")
    budget = _kept(3 * hidden * inter * len(layers), ratio)
    if 3 * hidden * block * len(layers) > budget:
        floor = block / inter
        raise BudgetError(f"ratio {ratio} cannot be reached with channel widths of at least one block ({block} "
                          f"of {inter} channels; largest reachable ratio {_reachable(1 - floor)})")
    return budget


def allocate_widths_uniform(layers: Sequence[int], hidden: int, inter: int, ratio: float,
                            block: int) -> Dict[int, int]:
    """The same block-aligned width in every layer, the budget's remainder spent
    one block at a time on layers spread evenly (dense MLPs, 3 h k parameters
    each). Returns {layer: width} for the narrowed layers."""
    budget = _width_budget(layers, hidden, inter, ratio, block)
    per_block = 3 * hidden * block
    base = (budget // (len(layers) * per_block)) * block
    widths = {i: base for i in layers}
    spare = budget - len(layers) * 3 * hidden * base
    order = [layers[k] for k in _spread_order([Matrix(str(i), 1, 1, None, i) for i in layers])]
    for i in order:
        if spare >= per_block and widths[i] < inter:
            widths[i] += block
            spare -= per_block
    return {i: k for i, k in widths.items() if k < inter}


def allocate_widths_greedy(layers: Sequence[int], hidden: int, inter: int, losses: Mapping[int, Sequence[float]],
                           ratio: float, block: int) -> Dict[int, int]:
    """Channels removed one block at a time from the layer where the estimated
    loss (`losses[layer][k]`, keeping k channels) rises least, until the dense
    narrowed MLPs fit the budget."""
    budget = _width_budget(layers, hidden, inter, ratio, block)
    widths = {i: inter for i in layers}
    cost = 3 * hidden * inter * len(layers)
    while cost > budget:
        i = min((j for j in layers if widths[j] > block),
                key=lambda j: (losses[j][widths[j] - block] - losses[j][widths[j]], j))
        widths[i] -= block
        cost -= 3 * hidden * block
    return {i: k for i, k in widths.items() if k < inter}


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
    check_ratio(ratio)
    check_block_size(block)
    mats = list(matrices)
    budget = budget_params(mats, ratio)
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
                    top = min(shape(m).max_rank(block) for m in members)
                    for r in range(block, top + 1, block):
                        saved = sum(shape(m).dense - shape(m).cost(r) for m in members)
                        if saved > 0:
                            yield sum(tail(m, r) for m in members), saved, ("factor", [m.name for m in members], r)
                else:
                    for m in members:
                        r = ranks[m.name]
                        if r - block >= block:
                            yield tail(m, r - block) - tail(m, r), block * (shape(m).m + shape(m).n), \
                                ("rank", [m.name], r - block)

    cost = plan_cost(mats, ranks, {})
    narrowest = inter - block * ((inter - block) // block)  # the width moves stop below two blocks
    # the cheapest plan: every layer at the narrowest width, each matrix dense or at rank one block
    floor = sum(min(n.dense, n.cost(block) if n.max_rank(block) else n.dense)
                for n in (narrowed(m, narrowest) for m in mats))
    if floor > budget:
        raise BudgetError(f"ratio {ratio} cannot be reached with block size {block}: {narrowest} channels per "
                          f"layer keep {floor:,} of {cost:,} parameters (largest reachable ratio "
                          f"{_reachable(1 - floor / cost)})")
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
