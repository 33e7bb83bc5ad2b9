"""Block-aligned ranks, widths and the parameter budget: the arithmetic every
allocator shares (docs/architecture.md).

Vocabulary: a *matrix* is one targeted projection `W [m, n]` (m = in_features,
n = out_features). Factored at rank r it costs `r (m + n)` parameters instead of
`m n`. The *ratio* is the fraction of all targeted parameters removed (paper
eq. 4). Every rank is a multiple of the block size B (the kernels tile by it).
A layer may also keep only k of its I intermediate channels (methods/nystrom.py):
its gate/up outputs and down inputs are k wide. A *plan* is ranks plus widths.

Each matrix sits on one *level* (a block-aligned rank, or dense); the
allocators (uniform.py, adaptive.py, hybrid.py, one each) move matrices between
levels until the total fits the budget. Matrices of one *group* (gate and up of
a layer, or its q, k and v: vLLM merges each) enter and leave the dense level
together. Neither
allocator ever exceeds the budget; when even the smallest plan is over it, they
raise BudgetError naming the largest reachable ratio.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from vllm_neuronmlp import checkpoint_format as cf
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
        raise ValueError(f"ratio must be strictly between 0 and 1 (the fraction of the targeted parameters to remove: "
                         f"every decoder linear, or the MLP projections with --scope mlp), got {ratio}")


def check_block_size(block: int) -> None:
    if not isinstance(block, int) or isinstance(block, bool) or block <= 0 or block % 32:
        raise ValueError(f"block size must be a positive multiple of 32, got {block}")


def saves_parameters(m: int, n: int, r: int) -> bool:
    return r * (m + n) < m * n


@dataclass(frozen=True)
class Matrix:
    """One targeted projection. `group` ties gate and up (or q, k and v) of a
    layer together for the dense level (None for down and o)."""

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
    return kept_params(sum(mat.dense for mat in matrices), ratio)


def kept_params(total: int, ratio: float) -> int:
    """floor((1 - ratio) x total), the integer total multiplied last (a float product of
    its factors rounds below an exact budget)."""
    return int(math.floor((1.0 - ratio) * total + 1e-9))


def rank_levels(mat: Matrix, block: int) -> List[int]:
    """Ranks in increasing cost: B, 2B, ..., max_rank, then DENSE."""
    top = mat.max_rank(block)
    return [r for r in range(block, top + 1, block)] + [DENSE]


def spread_order(matrices: Sequence[Matrix]) -> List[int]:
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


def reachable(ratio: float) -> str:
    """A largest reachable ratio for a message, rounded down so that it is reachable."""
    return f"{math.floor(ratio * 1e4 + 1e-9) / 1e4:.4f}"


def check_feasible(st: "LevelState", budget: int, ratio: float, block: int) -> None:
    floor = sum(m.cost(lv[0]) for m, lv in zip(st.mats, st.levels))
    if floor > budget:
        dense = sum(m.dense for m in st.mats)
        raise BudgetError(f"ratio {ratio} cannot be reached with block size {block}: even one block per matrix "
                          f"keeps {floor:,} of {dense:,} parameters (largest reachable ratio "
                          f"{reachable(1 - floor / dense)})")


def rank_budget(matrices: Sequence["Matrix"], ratio: float, block: int) -> int:
    """The parameter budget of a rank allocation (uniform.py, adaptive.py);
    BudgetError when even one block per matrix is over it. Depends on shapes
    only, so a run can check it before its statistics pass."""
    check_ratio(ratio)
    check_block_size(block)
    budget = budget_params(matrices, ratio)
    check_feasible(LevelState(matrices, block), budget, ratio, block)
    return budget


class LevelState:
    """Per-matrix level indices with the group coupling (gate/up, q/k/v) enforced:
    a group whose member no block-aligned rank saves on stays dense as a whole."""

    def __init__(self, matrices: Sequence[Matrix], block: int):
        self.mats = list(matrices)
        self.levels = [rank_levels(m, block) for m in self.mats]
        self.idx = [0] * len(self.mats)
        self.groups: Dict[str, List[int]] = {}
        for i, m in enumerate(self.mats):
            if m.group is not None:
                self.groups.setdefault(m.group, []).append(i)
        for members in self.groups.values():
            if any(self.levels[j] == [DENSE] for j in members):
                for j in members:
                    self.levels[j] = [DENSE]

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


def matrices_from_shapes(shapes: Mapping[str, Tuple[int, int]]) -> List[Matrix]:
    """Matrix records from {module name: (in, out)}; gate/up share a group per
    layer, and so do q/k/v (vLLM merges each into one linear)."""
    out = []
    for name, (m, n) in shapes.items():
        parent = name.rpartition(".")[0]
        if fam.role_of(name) in (fam.GATE, fam.UP):
            group = parent
        elif fam.attention_role_of(name) in fam.QKV_ROLES:
            group = f"{parent}.qkv"
        else:
            group = None
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
    lose output columns, down loses input rows (None, or an attention
    projection: unchanged)."""
    role = fam.role_of(mat.name)
    if width is None or role is None:
        return mat
    if role == fam.DOWN:
        return Matrix(mat.name, width, mat.n, mat.group, mat.layer)
    return Matrix(mat.name, mat.m, width, mat.group, mat.layer)


def plan_cost(matrices: Sequence[Matrix], ranks: Mapping[str, int], widths: Mapping[int, int]) -> int:
    return sum(narrowed(m, widths.get(m.layer)).cost(ranks.get(m.name, DENSE)) for m in matrices)


def plan_ratio(matrices: Sequence[Matrix], ranks: Mapping[str, int], widths: Mapping[int, int]) -> float:
    """Fraction of the targeted (full-width, dense) parameters a plan removes."""
    return 1.0 - plan_cost(matrices, ranks, widths) / sum(m.dense for m in matrices)


def width_budget(layers: Sequence[int], hidden: int, inter: int, ratio: float, block: int) -> int:
    check_ratio(ratio)
    check_block_size(block)
    if inter % block:
        raise BudgetError(f"intermediate size {inter} is not a multiple of block size {block}: channel widths "
                          f"are block multiples, so the full width is not a level")
    budget = kept_params(cf.mlp_params(hidden, inter) * len(layers), ratio)
    if cf.mlp_params(hidden, block) * len(layers) > budget:
        floor = block / inter
        raise BudgetError(f"ratio {ratio} cannot be reached with channel widths of at least one block ({block} "
                          f"of {inter} channels; largest reachable ratio {reachable(1 - floor)})")
    return budget
