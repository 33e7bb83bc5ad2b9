"""Time of the greedy rank allocation on spectra shaped like an 8B model.

Llama-3-8B's MLPs: 32 layers x (gate, up [4096 -> 14336], down [14336 -> 4096]),
i.e. 96 matrices whose spectra have 4096 singular values each. The spectra here
are synthetic (power-law decay with per-matrix scale, seeded): the allocation's
cost depends on the shapes and the number of greedy steps, not on the values.
Not a test: a measurement, written to benchmarks/results/allocate_timing.json.

    python benchmarks/allocate_timing.py
"""
from __future__ import annotations

import json
import os
import platform
import random
import time

from vllm_neuronmlp.tools import allocation as alloc

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LAYERS, HIDDEN, INTERMEDIATE, BLOCK = 32, 4096, 14336, 128


def matrices_and_spectra(seed: int = 0):
    shapes = {}
    for i in range(LAYERS):
        shapes[f"model.layers.{i}.mlp.gate_proj"] = (HIDDEN, INTERMEDIATE)
        shapes[f"model.layers.{i}.mlp.up_proj"] = (HIDDEN, INTERMEDIATE)
        shapes[f"model.layers.{i}.mlp.down_proj"] = (INTERMEDIATE, HIDDEN)
    mats = alloc.matrices_from_shapes(shapes)
    rnd = random.Random(seed)
    spectra = {}
    for m in mats:
        scale, decay = rnd.uniform(0.5, 2.0), rnd.uniform(0.3, 0.8)
        spectra[m.name] = [scale * (k + 1) ** -decay for k in range(min(m.m, m.n))]
    return mats, spectra


def main() -> None:
    mats, spectra = matrices_and_spectra()
    rows = []
    for ratio in (0.05, 0.2, 0.4):
        for normalize in (True, False):
            t0 = time.perf_counter()
            ranks = alloc.allocate_adaptive(mats, spectra, ratio, BLOCK, normalize=normalize)
            seconds = time.perf_counter() - t0
            achieved = alloc.achieved_ratio(mats, ranks)
            rows.append({"ratio": ratio, "normalize": normalize, "seconds": round(seconds, 3),
                         "achieved_ratio": round(achieved, 5)})
            print(f"ratio {ratio} normalize {normalize}: {seconds:.2f} s (achieved {achieved:.4f})", flush=True)
    out = {"matrices": len(mats), "spectrum_length": HIDDEN, "block": BLOCK, "python": platform.python_version(),
           "machine": platform.machine(), "rows": rows}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "allocate_timing.json"), "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
