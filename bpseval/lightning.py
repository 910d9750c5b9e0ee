"""Lightning integration: `BPSShardCallback` writes shards and logs the exact bits per spike.

Needs the optional dependency `lightning` (the `lightning` extra); the rest of
bpseval works without it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from bpseval._arrays import is_tensor, to_numpy
from bpseval._distributed import missing_torch
from bpseval.api import Result
from bpseval.errors import ArgumentError, MissingExtraError, install_hint
from bpseval.shard.writer import ShardWriter
from bpseval.views.dashboards import dashboard_metrics

try:
    import torch
except ImportError as error:
    raise missing_torch("bpseval.lightning", error, extra="lightning") from error
try:
    import lightning.pytorch as pl
except ImportError as error:
    raise MissingExtraError(
        f"bpseval.lightning needs Lightning, which cannot be imported ({error}): {install_hint('lightning')}"
    ) from error

from bpseval.torch import DEFAULT_DEDUP_WINDOW, DistributedBPS

REQUIRED_KEYS = ("rhat", "robs", "dataset")


class BPSShardCallback(pl.Callback):
    """One shard per rank per validation epoch, and the exact `val_bps_overall` and `val_bps/<dataset>` (and pooled).

    `validation_step` returns a dict with `rhat`, `robs` (samples, cells), `dataset` (its name,
    or an int index whose name is then str(index); a collated list or tensor of one value is
    fine) and optionally `dfs`, `sample_idx`, `cell_ids` and `rate_kind`, as `ShardWriter.add`
    takes them. To take them from elsewhere, override `batch_outputs`.

    Shards go to `run_dir/step-<epoch>/rank-<r>.h5` on every `every_n_epochs`-th epoch
    (`(epoch + 1) % every_n_epochs == 0`, as `check_val_every_n_epoch`; 0 = never); a later
    validation in the same epoch replaces them. With `also_log`, every validation epoch the
    same tensors feed a `DistributedBPS`, whose exact, global values (`Result.metrics`: pooled
    twins `val_bps_pooled_overall` and `val_bps_pooled/<dataset>`, deviance explained
    `val_pseudo_r2_overall`, `val_pseudo_r2_pooled_overall`, `val_pseudo_r2/<dataset>` and correlation
    `val_corr_overall`, `val_corr/<dataset>` included) are logged in float64
    on every rank (so ModelCheckpoint and EarlyStopping can monitor `val_bps_overall`; a value is
    NaN when no cell could be scored). The sanity-check pass is neither written nor logged.

    Args:
        run_dir: where the shards go.
        every_n_epochs: write shards every this many validation epochs (0: never).
        also_log: log the exact numbers every validation epoch (a `DistributedBPS`).
        dedup_window: the `DistributedBPS`'s.

    Example:
        >>> from bpseval.lightning import BPSShardCallback
        >>> callback = BPSShardCallback("runs/exp1", every_n_epochs=5)  # then: Trainer(callbacks=[callback])
        >>> callback.every_n_epochs, callback.also_log
        (5, True)
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        every_n_epochs: int = 1,
        also_log: bool = True,
        dedup_window: int = DEFAULT_DEDUP_WINDOW,
    ) -> None:
        if not isinstance(every_n_epochs, int) or every_n_epochs < 0:
            raise ArgumentError(f"every_n_epochs must be an int >= 0, not {every_n_epochs!r}")
        self.run_dir = run_dir
        self.every_n_epochs = every_n_epochs
        self.also_log = also_log
        self.metric = DistributedBPS(dedup_window)
        self.result: Result | None = None
        """The last `DistributedBPS.compute()` result on this rank."""
        self._writer: ShardWriter | None = None
        self._active = False

    def batch_outputs(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> Mapping[str, Any] | None:
        """What to write and score for one validation batch (None skips it); default: `outputs`."""
        if not isinstance(outputs, Mapping) or any(key not in outputs for key in REQUIRED_KEYS):
            raise ArgumentError(
                "BPSShardCallback: validation_step must return a dict with keys 'rhat', 'robs' and 'dataset'"
                " (optional: 'dfs', 'sample_idx', 'cell_ids', 'rate_kind'); got"
                f" {sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__}."
                " Or override BPSShardCallback.batch_outputs."
            )
        return outputs

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.metric.reset()
        self._active = not trainer.sanity_checking
        epoch = trainer.current_epoch
        if self._active and self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            # overwrite: a second validation in the same epoch replaces that epoch's shard (documented)
            self._writer = ShardWriter(
                self.run_dir, trainer.global_rank, trainer.world_size, step=epoch, overwrite=True
            )
            self._writer.open()

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active:
            return
        record = self.batch_outputs(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if record is None:
            return
        name = dataset_name(record["dataset"])
        arrays = (record["rhat"], record["robs"], record.get("dfs"), record.get("sample_idx"))
        options = {"cell_ids": record.get("cell_ids"), "rate_kind": record.get("rate_kind", "rate")}
        if self._writer is not None:
            self._writer.add(name, *arrays, **options)
        if self.also_log:
            self.metric.update(name, *arrays, **options)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.also_log:
            self.result = self.metric.compute(step=trainer.current_epoch)
            # NaN kept: ModelCheckpoint and EarlyStopping expect their monitored key every epoch
            for key, value in dashboard_metrics(self.result.scored, keep_undefined=True).items():
                # float64 tensor: a Python float would be logged as float32. The value is already global, the
                # same on every rank: sync_dist with max hands it back unchanged (a mean could round it) and
                # tells Lightning it needs no accumulating (without it, it warns once per key); every rank keeps
                # it, so monitors work on every rank (rank_zero_only would take it from them).
                tensor = torch.tensor(value, dtype=torch.float64, device=pl_module.device)
                pl_module.log(key, tensor, sync_dist=True, reduce_fx="max", batch_size=1)
        self.metric.reset()
        self._active = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


def dataset_name(value: Any) -> str:
    """The dataset name of a batch from its `dataset` entry: a name, an index, or a collated batch of one of them."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) or is_tensor(value) or hasattr(value, "shape"):
        values = list(value) if isinstance(value, (list, tuple)) else to_numpy(value).reshape(-1).tolist()
        distinct = {dataset_name(item) for item in values}
        if len(distinct) != 1:
            raise ArgumentError(f"a validation batch must hold one dataset, got {sorted(distinct) or 'none'}")
        return distinct.pop()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ArgumentError(f"'dataset' must be a name (str) or an index (int), not {value!r}")
