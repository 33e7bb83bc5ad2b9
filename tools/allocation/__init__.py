"""Allocation: which rank each projection gets and how many channels each layer
keeps, under one parameter budget. The budget arithmetic is one module
(budget.py); each allocator is one module (uniform.py, adaptive.py, hybrid.py).
This package re-exports their public names, so callers write `alloc.X`."""
from vllm_neuronmlp.tools.allocation.adaptive import allocate_adaptive, allocate_widths_greedy
from vllm_neuronmlp.tools.allocation.budget import (
    DENSE, BudgetError, Matrix, Plan, achieved_ratio, budget_params, check_block_size, check_ratio, eq5_rank,
    layer_index, matrices_from_shapes, narrowed, plan_cost, plan_ratio, rank_budget, round_theta, saves_parameters,
    tail_energies, total_cost, truncation_loss, width_budget)
from vllm_neuronmlp.tools.allocation.hybrid import allocate_hybrid, hybrid_budget
from vllm_neuronmlp.tools.allocation.uniform import allocate_uniform, allocate_widths_uniform

__all__ = [
    "DENSE", "BudgetError", "Matrix", "Plan", "achieved_ratio", "allocate_adaptive", "allocate_hybrid",
    "allocate_uniform", "allocate_widths_greedy", "allocate_widths_uniform", "budget_params", "check_block_size",
    "hybrid_budget", "rank_budget", "width_budget",
    "check_ratio", "eq5_rank", "layer_index", "matrices_from_shapes", "narrowed", "plan_cost", "plan_ratio",
    "round_theta", "saves_parameters", "tail_energies", "total_cost", "truncation_loss",
]
