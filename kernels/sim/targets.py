"""Hardware numbers of the emulated NeuronCores, one `Target` per name.

Sources (AWS Neuron documentation; docs/kernels.md lists them with the assumptions):
tensor engine 128x128 PEs at 2.8 GHz (trn1) / 2.4 GHz (trn2); vector engine
1.12 / 0.96 GHz, scalar engine 1.4 / 1.2 GHz, GpSimd 1.4 / 1.2 GHz (tables "Data-path
Width ... Frequency" of trainium_inferentia2_arch.rst and trainium2_arch.rst); SBUF
128 partitions x 192 KiB (trn1) / 224 KiB (trn2); PSUM 128 x 16 KiB in 8 banks
of 2 KiB; 16 DMA engines per core at ~27.2 GB/s each; ~1.3 us latency per
DMA transfer ("semaphore-to-start latency (~1300 ns cross-engine)",
nki/deep-dives/nki-dma-bandwidth-guide.rst); HBM ~410 GB/s (trn1) / ~362 GB/s (trn2) per NeuronCore.

Documented DMA and engine costs beyond those (each constant cites its page; paths are in
github.com/aws-neuron/aws-neuron-sdk, the same text as awsdocs-neuron.readthedocs-hosted.com):
* sustained DMA throughput per engine with >= 4 KiB payloads: 17 B/ns (trn1), 23 B/ns
  (trn2), i.e. 272 / 368 GB/s per NeuronCore -- nki/deep-dives/nki-dma-bandwidth-guide.rst
  and nki/get-started/about/nki-dma-overview.rst (table "BW / Engine"). 27.2 GB/s is the
  "theoretical" per-engine figure of the same overview page; it is kept for reference.
* DMA efficiency by contiguous bytes per partition (`DMA_CHUNK_EFFICIENCY`): the curve
  "DMA Throughput varying Bytes per Partition for p_dim = 128", figure
  nki/img/overviews/nki-dma-intro-1.jpg of nki-dma-overview.rst (values read off the
  plot, relative to its 4 KiB point; the bandwidth guide states the same rule in words:
  "< 256 B severely overhead-bound", ">= 2 KiB approaches peak", ">= 4 KiB saturates").
* DMA transpose: "up to 90% DMA throughput utilization ... compared to up to 100% for a
  DMA copy" -- nki/guides/architecture/trainium2_arch.rst, section "DMA Transpose".
  For trn1 the perf guide only says "much lower DMA bandwidth" than a plain load
  (nki/deep-dives/nki_perf_guide.rst, Opt #10) and recommends the tensor engine's
  transpose instead, without a number: trn1's figure is BRACKETED (`bracket`) between
  trn2's 0.9 (optimistic) and the documented efficiency of 2-byte runs, one element per
  descriptor (the curve's floor, pessimistic).
* SBUF/PSUM access overhead of ~60 cycles per instruction, which the engines "can
  typically hide" (trainium_inferentia2_arch.rst / nki_perf_guide.rst): BRACKETED between
  0 (hidden) and 60 cycles on every compute instruction (not hidden).
* LoadStationary: a matmul whose moving free size is small is bound by loading its
  stationary operand (trainium_inferentia2_arch.rst, Tensor Engine "Cost Model"): charged
  as max(moving free size, stationary free size, 64) cycles.
* DMA with an element stride over 16 B runs at half bandwidth (nki-dma-bandwidth-guide.rst).
* Descriptor generation (nki/deep-dives/nki-dge.rst): trn2 generates descriptors in
  hardware, ~600 ns per DMA on the issuing engine; trn1 has no hardware DGE, so DMAs
  with a register (dynamic) address get their descriptors from GpSimd software, cost
  unstated: BRACKETED between 0 and the documented 1.3 us fixed DMA cost.
* VectorE: "If there are two input tiles, the instruction can execute in roughly 2N
  cycles (example: nki.isa.tensor_tensor)" -- nki/guides/architecture/
  trainium_inferentia2_arch.rst, Vector Engine "Cost Model".
* NeuronCore-v2 only: "VectorE and ScalarE cannot access PSUM in parallel" (same page,
  "Data Movement"; lifted on NeuronCore-v3 per trainium2_arch.rst): their PSUM-touching
  instructions share one port and serialize.
"""
import dataclasses
import math
from dataclasses import dataclass

KIB = 1024

# Relative DMA throughput by contiguous bytes per partition (DMA buffer size), read off
# the figure nki/img/overviews/nki-dma-intro-1.jpg (nki-dma-overview.rst), normalised to
# its 4096-byte point (where the bandwidth guide says the engines reach their sustained
# peak). Plot readings, +-0.02. Interpolated linearly in log2(bytes); clamped at both ends.
DMA_CHUNK_EFFICIENCY = (
    (32, 0.015), (64, 0.027), (128, 0.052), (256, 0.105), (512, 0.22),
    (1024, 0.43), (2048, 0.84), (4096, 1.0),
)
DMA_TRANSPOSE_EFFICIENCY = 0.9     # trainium2_arch.rst "DMA Transpose": up to 90% vs 100%
ACCESS_OVERHEAD_CYCLES = 60        # per-instruction SBUF/PSUM access overhead (hidden: 0)


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
    # sustained per-engine DMA throughput with >= 4 KiB per partition (nki-dma-bandwidth-
    # guide.rst: 17 B/ns trn1, 23 B/ns trn2); the DMA cost model uses this one
    dma_engine_sustained_bytes_per_s: float = 0.0
    psum_shared_vector_scalar: bool = False   # NC-v2: VectorE/ScalarE PSUM accesses serialize
    partitions: int = 128
    pe_rows: int = 128
    pe_cols: int = 128
    # nc_matmul initiation interval max(N, MM_INIT_LATENCY), "MM_INIT_LATENCY is 64 TensorE
    # cycles on NeuronCore-v2" (trainium_inferentia2_arch.rst, Tensor Engine "Cost Model";
    # used for trn2 as well, an assumption)
    matmul_min_cycles: int = 64
    # "For FP32 input data type, the instruction cost is roughly 4x higher" (same section)
    fp32_matmul_factor: int = 4
    # VectorE: ~N cycles, ~2N with two input tiles, plus "a static instruction overhead of
    # 100 engine cycles" for N << 128 (same page, Vector Engine "Cost Model"); ScalarE and
    # GpSimd are charged by the same rule (an assumption: no cost model is documented)
    vector_two_input_factor: int = 2
    engine_static_overhead_cycles: int = 100
    # "each DMA engine is typically responsible for moving data for eight SBUF partitions"
    # (nki-dma-overview.rst, "Performance Considerations")
    dma_partitions_per_engine: int = 8
    # Cross-engine semaphore wait added when a compute instruction waits on another
    # engine's result. Not documented: 0 unless calibrated (docs/kernels.md).
    sync_latency_s: float = 0.0
    # Multiplier on the DMA efficiency curve (capped at 1). 1 = the documented curve; a
    # calibration knob only (docs/kernels.md, "Calibration").
    dma_efficiency_scale: float = 1.0
    # DMA transpose throughput relative to a copy; None: undocumented (trn1), `bracket`
    # gives the extremes and the nominal model uses the optimistic one
    dma_transpose_efficiency: float = DMA_TRANSPOSE_EFFICIENCY
    dma_transpose_documented: bool = True
    # SBUF/PSUM access overhead per compute instruction (cycles of its engine); 0 = hidden
    access_overhead_cycles: int = 0
    # hardware descriptor generation per DMA on the issuing engine (trn2: ~600 ns)
    hwdge_s: float = 0.0
    # software descriptor generation on GpSimd for a DMA with a dynamic (register)
    # address (trn1: no hardware DGE; cost unstated, bracketed)
    swdge_dynamic_s: float = 0.0
    # half DMA bandwidth for element strides over this many bytes
    dma_stride_limit_bytes: int = 16
    # the one calibration knob: the tensor engine's efficiency while busy (1 = the
    # documented instruction costs); fitted on the paper's Table 3 only
    pe_efficiency: float = 1.0

    @property
    def psum_bank_bytes(self) -> int:
        return self.psum_bytes_per_partition // self.psum_banks

    @property
    def dma_cost_bytes_per_s(self) -> float:
        """Per-engine DMA rate the cost model charges (sustained, else theoretical)."""
        return self.dma_engine_sustained_bytes_per_s or self.dma_engine_bytes_per_s

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
    dma_engine_sustained_bytes_per_s=17e9, psum_shared_vector_scalar=True,
    dma_transpose_documented=False,
)

TRN2 = Target(
    name="trn2", nc_version=3, pe_hz=2.4e9, vector_hz=0.96e9, scalar_hz=1.2e9,
    gpsimd_hz=1.2e9, sbuf_bytes_per_partition=224 * KIB,
    psum_bytes_per_partition=16 * KIB, psum_banks=8, hbm_bytes_per_s=362e9,
    dma_engines=16, dma_engine_bytes_per_s=27.2e9, dma_fixed_s=1.3e-6,
    dma_engine_sustained_bytes_per_s=23e9, psum_shared_vector_scalar=False,
    hwdge_s=600e-9,
)

TARGETS = {"trn1": TRN1, "trn2": TRN2}


def dma_chunk_efficiency(run_bytes: int) -> float:
    """Relative DMA throughput for contiguous runs of `run_bytes` (see DMA_CHUNK_EFFICIENCY)."""
    pts = DMA_CHUNK_EFFICIENCY
    if run_bytes <= pts[0][0]:
        return pts[0][1]
    if run_bytes >= pts[-1][0]:
        return pts[-1][1]
    x = math.log2(run_bytes)
    for (b0, e0), (b1, e1) in zip(pts, pts[1:]):
        if run_bytes <= b1:
            x0, x1 = math.log2(b0), math.log2(b1)
            return e0 + (e1 - e0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


# The undocumented constants at their plausible extremes (docs/kernels.md, "Brackets").
# "optimistic" is the nominal model: each unknown at its cheapest plausible value.
SWDGE_PESSIMISTIC_S = 1.3e-6


def bracket_end(target, end: str) -> Target:
    """`target` with every undocumented constant at one end of its bracket:
    end="optimistic" (the nominal model) or "pessimistic"."""
    t = get_target(target)
    if end == "optimistic":
        return dataclasses.replace(
            t, access_overhead_cycles=0,
            dma_transpose_efficiency=DMA_TRANSPOSE_EFFICIENCY if not t.dma_transpose_documented
            else t.dma_transpose_efficiency,
            swdge_dynamic_s=0.0)
    if end == "pessimistic":
        return dataclasses.replace(
            t, access_overhead_cycles=ACCESS_OVERHEAD_CYCLES,
            dma_transpose_efficiency=DMA_CHUNK_EFFICIENCY[0][1] if not t.dma_transpose_documented
            else t.dma_transpose_efficiency,
            swdge_dynamic_s=SWDGE_PESSIMISTIC_S if t.nc_version == 2 else 0.0)
    raise ValueError(f"bracket end must be 'optimistic' or 'pessimistic', got {end!r}")


def bracket(target):
    """(optimistic, pessimistic) variants of `target` (see `bracket_end`)."""
    return bracket_end(target, "optimistic"), bracket_end(target, "pessimistic")


def get_target(target) -> Target:
    """Accept a `Target` or its name ("trn1", "trn2")."""
    if isinstance(target, Target):
        return target
    try:
        return TARGETS[str(target).lower()]
    except KeyError:
        raise ValueError(f"unknown target {target!r}; expected one of {sorted(TARGETS)}") from None
