"""The options of `compress` and their checks (importable without torch, so
`--help` can show the defaults)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.tools import allocation as alloc
from vllm_neuronmlp.tools.data import text_data
from vllm_neuronmlp.tools.errors import UserError
from vllm_neuronmlp.tools import methods
from vllm_neuronmlp.tools.methods import ALLOCATIONS, DEFAULT_ALLOCATION, DEFAULT_METHOD

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda")  # where the passes compute; auto = a CUDA GPU when torch sees one
# what --ratio counts: the MLP projections, or every decoder linear; auto = all where the method
# can factor the attention projections (its capabilities.attention_allocations; it measured better
# than the MLP alone at the same parameter count on SmolLM2, README "Whole-model budgets"), mlp otherwise
SCOPES = ("auto", "mlp", "all")
EXPORTS = ("svd_neuron", "dense")  # dense: a plain smaller model of the same architecture (tools/export.py)
DEFAULT_CALIB_TEXT = text_data.BUILTIN_PREFIX + "calibration"
DEFAULT_FISHER_SAMPLES = 32  # windows of the Fisher pass (its stored activations grow with them)
# LoRA recovery defaults; benchmarks/accuracy_vs_ratio.py's LoRA rows used batch 1, lr 3e-4 (README)
LORA_RANK, LORA_LR, LORA_BATCH = 8, 2e-4, 4


@dataclass
class CompressOptions:
    ratio: float
    block_size: int = cf.DEFAULT_BLOCK_SIZE
    rounding_threshold: float = 0.5
    calib_text: Sequence[str] = (DEFAULT_CALIB_TEXT,)
    calib_samples: int = 64
    calib_seq_len: int = 512
    fisher_samples: int = DEFAULT_FISHER_SAMPLES  # at most calib_samples are used
    seed: int = 0
    rank_allocation: str = DEFAULT_ALLOCATION
    method: str = DEFAULT_METHOD
    scope: str = "auto"  # validate() resolves it to "mlp" or "all"
    damping: float = 0.0  # ridge added to every Gram matrix, relative to its mean diagonal
    lora_steps: int = 0
    lora_rank: int = LORA_RANK
    lora_lr: float = LORA_LR
    lora_batch: int = LORA_BATCH
    dtype: str = "auto"
    export: str = "svd_neuron"
    overwrite: bool = False
    max_shard_bytes: int = 512 * 1024 ** 2  # also bounds the write buffer held in memory
    progress: bool = True
    device: str = "auto"
    resume: bool = False  # continue from OUT.resume (run_state.py)
    dry_run: bool = False  # print the memory estimate and the planned work, write nothing
    memory_check: bool = True  # refuse a run whose estimated peak exceeds the memory available
    memory_limit_gib: Optional[float] = None  # the memory the check compares with (default: what is available)

    def resolved_device(self) -> str:
        """"cpu" or "cuda" (auto: a CUDA GPU when torch sees one); UserError for cuda without one."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise UserError(f"--device cuda: torch {torch.__version__} ({built}) sees no CUDA GPU; use --device cpu "
                            f"or auto")
        return self.device

    def validate(self) -> None:
        """Checks every option (UserError naming the flag) and resolves --scope auto."""
        try:
            alloc.check_ratio(self.ratio)
        except ValueError as e:
            raise UserError(f"--ratio: {e}") from None
        try:
            alloc.check_block_size(self.block_size)
        except ValueError as e:
            raise UserError(f"--block-size: {e}") from None
        if not 0.0 < self.rounding_threshold <= 1.0:
            raise UserError(f"--rounding-threshold must be in (0, 1], got {self.rounding_threshold}")
        for flag, value, low in (("--calib-samples", self.calib_samples, 1), ("--calib-seq-len", self.calib_seq_len, 2),
                                 ("--fisher-samples", self.fisher_samples, 1), ("--lora-steps", self.lora_steps, 0),
                                 ("--lora-rank", self.lora_rank, 1), ("--lora-batch", self.lora_batch, 1)):
            if value < low:
                raise UserError(f"{flag} must be at least {low}, got {value}")
        if not self.lora_lr > 0:
            raise UserError(f"--lora-lr must be positive, got {self.lora_lr}")
        if self.rank_allocation not in ALLOCATIONS:
            raise UserError(f"--rank-allocation must be one of {', '.join(ALLOCATIONS)}, got {self.rank_allocation!r}")
        if self.method not in methods.REGISTRY:
            raise UserError(f"--method must be one of {', '.join(methods.REGISTRY)}, got {self.method!r}")
        caps = methods.get(self.method).capabilities
        if self.export not in EXPORTS:
            raise UserError(f"--export must be one of {', '.join(EXPORTS)}, got {self.export!r}")
        if self.export == "dense" and not caps.keeps_architecture:
            keepers = " or ".join(methods.names_where(lambda c: c.keeps_architecture))
            raise UserError(f"--export dense needs --method {keepers} (only channel selection keeps the model's "
                            f"architecture), got --method {self.method}")
        if self.rank_allocation not in caps.allocations:
            note = caps.allocations_note or f"--method {self.method} accepts {' or '.join(caps.allocations)}"
            raise UserError(f"--rank-allocation {self.rank_allocation}: {note}")
        if self.memory_limit_gib is not None and not self.memory_limit_gib > 0:
            raise UserError(f"--memory-limit must be positive (GiB), got {self.memory_limit_gib}")
        if self.scope not in SCOPES:
            raise UserError(f"--scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.scope == "auto":
            self.scope = "all" if caps.factors_attention(self.rank_allocation) else "mlp"
        if self.scope == "all" and not caps.attention_allocations:
            able = ", ".join(methods.names_where(lambda c: c.attention_allocations))
            raise UserError(f"--scope all factors the attention projections, which --method {self.method} cannot "
                            f"({caps.scope_note}); use one of {able}")
        if self.scope == "all" and not caps.factors_attention(self.rank_allocation):
            raise UserError(f"--scope all with --method {self.method} needs --rank-allocation "
                            f"{' or '.join(caps.attention_allocations)} ({caps.scope_note})")
        if self.device not in DEVICES:
            raise UserError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if not self.calib_text:
            raise UserError("--calib-text: at least one text file is needed")
