"""BPSShardCallback in a real 2-process Lightning run (ddp_spawn, gloo, CPU)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn.functional import softplus
from torch.utils.data import DataLoader, Dataset

import bpseval
from bpseval.torch import WithSampleIndex
from bpseval.views.dashboards import PREFIX, metric_keys

pl = pytest.importorskip("lightning.pytorch")
from bpseval.errors import install_hint  # noqa: E402
from bpseval.lightning import BPSShardCallback, dataset_name  # noqa: E402

N_FEATURES = 4
SESSIONS = {"A": (1001, 5), "B": (801, 3)}
"""Validation samples and cells: with batches of 20, each rank has 21 to 26 batches, and 5% is one."""
VAL_BATCH, EPOCHS = 20, 2
LATE_CELL = 4
"""Cell 4 of session A is valid at sample 1 only, which DistributedSampler gives to rank 1: rank 0 has none."""


class Session(Dataset):
    """Simulated samples of one session as dict items (stim, robs, dfs, dataset)."""

    def __init__(self, name: str, n_samples: int, n_cells: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.name = name
        self.stim = torch.tensor(rng.standard_normal((n_samples, N_FEATURES)), dtype=torch.float32)
        rates = np.logaddexp(0.0, self.stim.numpy() @ rng.normal(0, 0.5, (N_FEATURES, n_cells)))
        self.robs = torch.tensor(rng.poisson(rates), dtype=torch.float32)
        self.dfs = torch.tensor(rng.random((n_samples, n_cells)) > 0.1, dtype=torch.float32)
        if name == "A":
            self.dfs[:, LATE_CELL] = 0.0
            self.dfs[1, LATE_CELL] = 1.0
            self.robs[1, LATE_CELL] = 3.0

    def __len__(self) -> int:
        return len(self.stim)

    def __getitem__(self, index: int) -> dict:
        return {"stim": self.stim[index], "robs": self.robs[index], "dfs": self.dfs[index], "dataset": self.name}


class TinyModel(pl.LightningModule):
    """A linear-softplus Poisson model with one readout per session; validation_step returns the callback's dict."""

    def __init__(self) -> None:
        super().__init__()
        self.readouts = nn.ModuleDict({name: nn.Linear(N_FEATURES, cells) for name, (_, cells) in SESSIONS.items()})

    def rates(self, batch: dict) -> torch.Tensor:
        return softplus(self.readouts[batch["dataset"][0]](batch["stim"]))

    def training_step(self, batches: dict[str, dict], batch_idx: int) -> torch.Tensor:
        return sum(nn.functional.poisson_nll_loss(self.rates(b), b["robs"], log_input=False) for b in batches.values())

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        keys = ("robs", "dfs", "dataset", "sample_idx")
        return {"rhat": self.rates(batch), **{key: batch[key] for key in keys}}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class RecordWarnings(pl.Callback):
    """Every warning raised in a rank's process during the fit, one line each in `<folder>/warnings-<rank>.txt`
    (the ranks are spawned processes: pytest's own recording does not reach them)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.catcher: warnings.catch_warnings | None = None
        self.caught: list[warnings.WarningMessage] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.catcher = warnings.catch_warnings(record=True)
        self.caught = self.catcher.__enter__()
        warnings.simplefilter("always")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        assert self.catcher is not None
        self.catcher.__exit__(None, None, None)
        lines = [f"{caught.category.__name__}: {caught.message}" for caught in self.caught]
        (self.folder / f"warnings-{trainer.global_rank}.txt").write_text("".join(line + "\n" for line in lines))


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """Fit for 2 epochs on 2 CPU processes; returns the shard directory, the CSV log and the final metrics."""
    root = tmp_path_factory.mktemp("lightning")
    run_dir = root / "shards"
    train = {
        name: DataLoader(Session(name, 100, cells, seed=9), batch_size=50) for name, (_, cells) in SESSIONS.items()
    }
    val = [
        DataLoader(WithSampleIndex(Session(name, n, c, seed)), batch_size=VAL_BATCH)
        for seed, (name, (n, c)) in enumerate(SESSIONS.items())
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=EPOCHS,
        limit_train_batches=2,
        limit_val_batches=0.05,
        num_sanity_val_steps=2,  # a sanity pass runs, and must write and log nothing
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=pl.loggers.CSVLogger(root, name="logs"),
        callbacks=[
            BPSShardCallback(run_dir),
            pl.callbacks.ModelCheckpoint(root / "checkpoints", monitor="val_bps_overall", mode="max"),
            RecordWarnings(root),
        ],
    )
    trainer.fit(TinyModel(), train, val)
    return run_dir, root / "logs" / "version_0" / "metrics.csv", dict(trainer.callback_metrics)


def test_one_shard_per_rank_and_epoch_and_none_for_the_sanity_check(lightning_run):
    run_dir, _, _ = lightning_run
    shards = sorted(str(path.relative_to(run_dir)) for path in run_dir.rglob("*.h5"))
    assert shards == [f"step-{epoch:06d}/rank-{rank:04d}.h5" for epoch in range(EPOCHS) for rank in range(2)]


def test_the_logged_metric_is_bpseval_compute_of_that_epochs_shards(lightning_run):
    run_dir, csv, final = lightning_run
    log = pd.read_csv(csv).dropna(subset=["val_bps_overall"]).set_index("epoch")
    assert log.index.tolist() == list(range(EPOCHS))
    for epoch in range(EPOCHS):
        offline = bpseval.evaluate(run_dir, step=epoch)
        assert log.loc[epoch, "val_bps_overall"] == pytest.approx(offline.overall.bps, rel=1e-12)
        for row in offline.datasets.itertuples():
            assert log.loc[epoch, f"val_bps/{row.name}"] == pytest.approx(row.bps, rel=1e-12)
        logged = {key for key in log.columns if key.startswith("val_")}
        assert logged == set(offline.metrics(keep_undefined=True))  # one definition: Result.metrics, pooled included
        for key, value in offline.metrics().items():
            assert log.loc[epoch, key] == pytest.approx(value, rel=1e-12)
        for metric in ("pseudo_r2", "corr", "pseudo_r2_pooled"):  # deviance explained and correlation, online
            want = getattr(offline.overall, metric)
            assert math.isfinite(want) and log.loc[epoch, f"val_{metric}_overall"] == pytest.approx(want, rel=1e-9)
        for row in offline.datasets.itertuples():
            for metric in ("pseudo_r2", "corr"):
                want = getattr(row, metric)
                assert math.isfinite(want) and log.loc[epoch, f"val_{metric}/{row.name}"] == pytest.approx(
                    want, rel=1e-9
                )
        assert offline.datasets["samples"].tolist() == [2 * VAL_BATCH] * 2  # one batch per rank and session
    assert final["val_bps_overall"].dtype == torch.float64
    assert final["val_bps_overall"].item() == pytest.approx(bpseval.evaluate(run_dir).overall.bps, rel=1e-12)


def test_logging_the_metrics_raises_no_warning_on_any_rank(lightning_run):
    run_dir, _, _ = lightning_run
    files = sorted(run_dir.parent.glob("warnings-*.txt"))
    assert [path.name for path in files] == ["warnings-0.txt", "warnings-1.txt"]  # the recorder ran on both ranks
    caught = [line for path in files for line in path.read_text().splitlines()]
    assert not [line for line in caught if "sync_dist" in line or "val_" in line or "bpseval" in line], caught


def test_the_callback_logs_exactly_the_declared_metric_keys_and_compute_metrics_writes_them(lightning_run, tmp_path):
    run_dir, csv, _ = lightning_run
    log = pd.read_csv(csv)
    keys = metric_keys(SESSIONS)
    assert [key for key in log.columns if key.startswith(PREFIX)] == sorted(keys)  # the CSV logger sorts them
    written = tmp_path / "metrics.json"
    subprocess.run(
        [sys.executable, "-m", "bpseval", "compute", str(run_dir), "--metrics", str(written)],
        check=True,
        capture_output=True,
    )
    assert list(json.loads(written.read_text())) == keys  # every value defined here: every key, in the declared order


def test_the_seed_scenario_cell_is_scored_although_rank_0_has_no_valid_sample(lightning_run):
    run_dir, _, _ = lightning_run
    coverage = bpseval.check_coverage(run_dir, min_samples=10**6).cells.set_index(["dataset", "cell"])
    assert coverage.loc[("A", LATE_CELL), "per_rank"] == [0, 1]
    cells = bpseval.evaluate(run_dir).cells.set_index(["dataset", "cell"])
    assert cells.loc[("A", LATE_CELL), "status"] == "ok"


def test_outputs_that_are_not_the_documented_dict_are_refused_clearly():
    callback = BPSShardCallback("unused")
    with pytest.raises(ValueError, match="validation_step must return a dict with keys 'rhat', 'robs' and 'dataset'"):
        callback.batch_outputs(None, None, torch.tensor(0.5), None, 0, 0)


@pytest.mark.parametrize(
    ("value", "name"),
    [("A", "A"), (["A", "A"], "A"), (3, "3"), (torch.tensor([2, 2]), "2"), (np.int64(5), "5"), (torch.tensor(1), "1")],
)
def test_the_dataset_entry_is_a_name_or_an_index_collated_or_not(value, name):
    assert dataset_name(value) == name


def test_a_batch_mixing_datasets_is_refused():
    with pytest.raises(ValueError, match=r"must hold one dataset, got \['A', 'B'\]"):
        dataset_name(["A", "B"])


def test_bpseval_imports_without_lightning_and_bpseval_lightning_says_how_to_get_it():
    script = (
        "import sys; sys.modules['lightning'] = None\n"
        "import bpseval, bpseval.torch\n"
        "try:\n    import bpseval.lightning\nexcept ImportError as error:\n    print(error)\n"
    )
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert install_hint("lightning") in output
