"""The `compute --ci` intervals cover the true value at their nominal rate, by simulation.

Validation sets are drawn from a known generative model (Poisson counts whose rates follow a
stimulus, predicted by a fixed, misspecified model λ). The true bits per spike is the value the
estimate converges to, computed exactly from the model's expectations; the nominal 95% interval
must cover it in 93–97% of the simulated sets, for both schemes.
"""

from __future__ import annotations

import numpy as np

from bpseval.features.uncertainty import IntervalSettings, intervals
from bpseval.kernel.stats import LN2, block_stats
from bpseval.run.merge import MergedDataset
from bpseval.run.scored import score

SETS = {"blocks": 400, "cells": 200}
"""Simulated validation sets per scheme in the suite (each test takes about half a minute)."""
RESAMPLES = 200
STIMULI = np.linspace(-1.5, 1.5, 16)
"""The stimulus of each sample is one of these, uniformly: expectations over samples are exact means over them."""


def rates(offset: np.ndarray, gain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True rates ν and the model's predictions λ, (stimuli, cells): the model gets the tuning 30% too flat."""
    true = np.exp(offset + gain * STIMULI[:, None])
    model = np.exp(offset + 0.7 * gain * STIMULI[:, None] + 0.1)
    return true, model


def population(true: np.ndarray, model: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per cell, the expected log-likelihood gain per sample and the expected spikes per sample."""
    spikes = true.mean(axis=0)
    model_ll = (true * np.log(model) - model).mean(axis=0)
    return model_ll - (spikes * np.log(spikes) - spikes), spikes


def simulated_run(rng: np.random.Generator, true: np.ndarray, model: np.ndarray, samples: int, blocks: int):
    """One validation set: `samples` samples of every cell, their statistics per contiguous block, scored."""
    stimulus = rng.integers(0, len(STIMULI), samples)
    counts = rng.poisson(true[stimulus]).astype(np.float64)
    per_block = block_stats(np.arange(samples) * blocks // samples, model[stimulus], counts)
    cells = true.shape[1]
    merged = MergedDataset("sim", np.arange(cells), "rate", [per_block.total()], samples, 0, "", per_block.stats)
    return score([merged], step=0, world_size=1)


def covered(interval: tuple[float, float] | None, truth: float) -> bool:
    """The interval holds the truth (it must be defined: every simulated set has enough blocks and cells)."""
    assert interval is not None
    return interval[0] <= truth <= interval[1]


def coverage_over_blocks(sets: int = SETS["blocks"], resamples: int = RESAMPLES) -> dict[str, float]:
    """Fixed cells, new samples: the truth is the model's expected bps on new samples from the same cells."""
    rng = np.random.default_rng(1)
    offset, gain = rng.normal(-0.5, 0.5, 8), rng.normal(0.0, 0.8, 8)
    true, model = rates(offset, gain)
    cell_gain, cell_spikes = population(true, model)
    truth = {
        "bps": float(np.mean(cell_gain / (cell_spikes * LN2))),
        "bps_pooled": float(cell_gain.sum() / (LN2 * cell_spikes.sum())),
    }
    hits = dict.fromkeys(truth, 0)
    for index in range(sets):
        scored = simulated_run(rng, true, model, samples=1500, blocks=50)
        found = intervals(scored, IntervalSettings(0.95, "blocks", resamples, seed=index)).datasets["sim"]
        for metric, value in truth.items():
            hits[metric] += covered(found[metric], value)
    return {metric: count / sets for metric, count in hits.items()}


def coverage_over_cells(sets: int = SETS["cells"], resamples: int = RESAMPLES) -> dict[str, float]:
    """New cells from a population: the truth is the mean over the cell distribution (from a million cells)."""
    rng = np.random.default_rng(2)

    def cells(count: int) -> tuple[np.ndarray, np.ndarray]:
        return rates(rng.normal(-0.5, 0.4, count), rng.normal(0.0, 0.5, count))

    cell_gain, cell_spikes = population(*cells(1_000_000))
    truth = {
        "bps": float(np.mean(cell_gain / (cell_spikes * LN2))),
        "bps_pooled": float(cell_gain.mean() / (LN2 * cell_spikes.mean())),
    }
    hits = dict.fromkeys(truth, 0)
    for index in range(sets):
        scored = simulated_run(rng, *cells(150), samples=5000, blocks=1)
        found = intervals(scored, IntervalSettings(0.95, "cells", resamples, seed=index)).datasets["sim"]
        for metric, value in truth.items():
            hits[metric] += covered(found[metric], value)
    return {metric: count / sets for metric, count in hits.items()}


def test_blocks_intervals_cover_the_expected_bps_on_new_samples_at_the_nominal_rate() -> None:
    coverage = coverage_over_blocks()
    print(f"coverage over blocks: {coverage}")
    assert all(0.93 <= value <= 0.97 for value in coverage.values()), coverage


def test_cells_intervals_cover_the_population_mean_over_cells_at_the_nominal_rate() -> None:
    coverage = coverage_over_cells()
    print(f"coverage over cells: {coverage}")
    assert all(0.93 <= value <= 0.97 for value in coverage.values()), coverage
