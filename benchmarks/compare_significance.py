"""Time `compare --significance` (paired bootstrap of the change) in memory, at the realistic scale.

    python benchmarks/compare_significance.py [--repeat 3] [--bootstrap N]

30 datasets of 93 cells (2,790 cells) and 1,700 samples each (51,000), in 100 blocks of sample_idx, two
models scored on the same samples: the paired bootstrap of `bpseval compare --significance 0.05`, best of
`--repeat` calls in one process (the merge and the I/O are not timed: they are `compute`'s).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bpseval.features.compare import CompareSettings, Side, compare
from bpseval.kernel.stats import block_stats
from bpseval.run.merge import MergedDataset, MergedRun
from bpseval.run.scored import score_run

DATASETS, CELLS, SAMPLES, BLOCKS = 30, 93, 1700, 100


def side(label: str, gain: float) -> Side:
    """A run of the realistic scale whose model's rates are the truth times `gain`, with noise."""
    rng = np.random.default_rng(1)
    datasets = []
    for index in range(DATASETS):
        rates = rng.gamma(2.0, 0.5, (SAMPLES, CELLS))
        robs = rng.poisson(rates).astype(np.float64)
        model = rates * gain * np.exp(np.random.default_rng(index).normal(0, 0.3, rates.shape))
        blocks = block_stats(np.arange(SAMPLES) * BLOCKS // SAMPLES, model, robs)
        datasets.append(
            MergedDataset(f"d{index}", np.arange(CELLS), "rate", [blocks.total()], SAMPLES, 0, "same", blocks.stats)
        )
    return Side(label, score_run(MergedRun(Path(label), 0, 1, [], datasets)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bootstrap", type=int, default=CompareSettings().bootstrap)
    options = parser.parse_args()
    new, base = side("new", 1.0), side("base", 0.98)
    settings = CompareSettings(significance=0.05, bootstrap=options.bootstrap, blocks=BLOCKS)
    times = []
    for _ in range(options.repeat):
        start = time.perf_counter()
        result = compare(new, base, settings)
        times.append(time.perf_counter() - start)
    print(
        f"compare --significance 0.05 --bootstrap {options.bootstrap} ({result.mode}), {DATASETS} datasets x"
        f" {CELLS} cells x {BLOCKS} blocks: best {min(times):.2f} s of {options.repeat}"
    )


if __name__ == "__main__":
    main()
