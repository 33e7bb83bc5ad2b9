"""Hardware numbers of the emulated NeuronCores, one `Target` per name.

Sources (AWS Neuron documentation, as collected in the project's design notes):
tensor engine 128x128 PEs at 2.8 GHz (trn1) / 2.4 GHz (trn2); vector engine
1.12 / 0.96 GHz, scalar engine 1.4 / 1.2 GHz (NKI architecture guides); SBUF
128 partitions x 192 KiB (trn1) / 224 KiB (trn2); PSUM 128 x 16 KiB in 8 banks
of 2 KiB; 16 DMA engines per core at ~27.2 GB/s each; ~1.3 us fixed cost per
DMA transfer; HBM ~410 GB/s (trn1) / ~362 GB/s (trn2) per NeuronCore.
"""
from dataclasses import dataclass

KIB = 1024


@dataclass(frozen=True)
class Target:
    name: str
    nc_version: int            # 2 = NeuronCore-v2 (trn1), 3 = NeuronCore-v3 (trn2)
    pe_hz: float               # tensor engine clock
    vector_hz: float
    scalar_hz: float
    gpsimd_hz: float
    sbuf_bytes_per_partition: int
    psum_bytes_per_partition: int
    psum_banks: int
    hbm_bytes_per_s: float     # per NeuronCore
    dma_engines: int
    dma_engine_bytes_per_s: float
    dma_fixed_s: float         # fixed cost of one DMA transfer
    partitions: int = 128
    pe_rows: int = 128
    pe_cols: int = 128
    matmul_min_cycles: int = 64    # initiation interval floor of one nc_matmul
    engine_min_cycles: int = 64    # floor of one vector/scalar/gpsimd instruction
    fp32_matmul_factor: int = 4    # 4-byte inputs take 4 passes through the PE array

    @property
    def psum_bank_bytes(self) -> int:
        return self.psum_bytes_per_partition // self.psum_banks

    @property
    def peak_flops(self) -> float:
        """bf16 peak: every PE does one multiply-add per cycle."""
        return 2.0 * self.pe_rows * self.pe_cols * self.pe_hz

    @property
    def ridge_flop_per_byte(self) -> float:
        """Roofline ridge: peak bf16 FLOP/s over HBM bytes/s."""
        return self.peak_flops / self.hbm_bytes_per_s


TRN1 = Target(
    name="trn1", nc_version=2, pe_hz=2.8e9, vector_hz=1.12e9, scalar_hz=1.4e9,
    gpsimd_hz=1.4e9, sbuf_bytes_per_partition=192 * KIB,
    psum_bytes_per_partition=16 * KIB, psum_banks=8, hbm_bytes_per_s=410e9,
    dma_engines=16, dma_engine_bytes_per_s=27.2e9, dma_fixed_s=1.3e-6,
)

TRN2 = Target(
    name="trn2", nc_version=3, pe_hz=2.4e9, vector_hz=0.96e9, scalar_hz=1.2e9,
    gpsimd_hz=1.2e9, sbuf_bytes_per_partition=224 * KIB,
    psum_bytes_per_partition=16 * KIB, psum_banks=8, hbm_bytes_per_s=362e9,
    dma_engines=16, dma_engine_bytes_per_s=27.2e9, dma_fixed_s=1.3e-6,
)

TARGETS = {"trn1": TRN1, "trn2": TRN2}


def get_target(target) -> Target:
    """Accept a `Target` or its name ("trn1", "trn2")."""
    if isinstance(target, Target):
        return target
    try:
        return TARGETS[str(target).lower()]
    except KeyError:
        raise ValueError(f"unknown target {target!r}; expected one of {sorted(TARGETS)}") from None
