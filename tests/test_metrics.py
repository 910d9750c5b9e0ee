"""Flat metrics for dashboards: `Result.metrics`, `compute --metrics`, `compute --tensorboard` (issue #15.9)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bpseval
from bpseval.errors import install_hint
from tests.conftest import poisson_dataset, write_raw_shard

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "runs" / "exp1"
REPO = Path(__file__).resolve().parents[1]


def write_run(run: Path, steps: tuple[int, ...] = (0,)) -> Path:
    """A 2-rank run with a scored dataset `a`, an all-silent `quiet` and an all-uncovered `none`, at each step."""
    for step in steps:
        for rank in range(2):
            a = poisson_dataset(10 * step + rank)
            a["rhat"] = a["rhat"] * (1.0 + 0.1 * step)  # a different model at each step
            quiet = {"rhat": np.full((5, 2), 0.3), "robs": np.zeros((5, 2))}
            none = {"rhat": np.full((5, 2), 0.3), "robs": np.ones((5, 2)), "dfs": np.zeros((5, 2))}
            shard = run / f"step-{step}" / f"rank{rank}.h5"
            write_raw_shard(shard, {"a": a, "quiet": quiet, "none": none}, rank=rank, world_size=2, step=step)
    return run


def test_metrics_are_the_callback_names_with_undefined_values_left_out(tmp_path):
    result = bpseval.evaluate(write_run(tmp_path))
    metrics = result.metrics()
    a, overall = result.scored.dataset("a"), result.overall
    assert metrics == {
        "val_bps_overall": overall.bps,
        "val_bps_pooled_overall": overall.bps_pooled,
        "val_pseudo_r2_overall": overall.pseudo_r2,
        "val_pseudo_r2_pooled_overall": overall.pseudo_r2_pooled,
        "val_corr_overall": overall.corr,
        "val_bps/a": a.bps,
        "val_bps_pooled/a": a.bps_pooled,
        "val_pseudo_r2/a": a.pseudo_r2,
        "val_pseudo_r2_pooled/a": a.pseudo_r2_pooled,
        "val_corr/a": a.corr,
    }
    assert all(isinstance(value, float) and math.isfinite(value) for value in metrics.values())
    kept = result.metrics(keep_undefined=True)
    names = ("bps", "bps_pooled", "pseudo_r2", "pseudo_r2_pooled", "corr")
    assert [key for key in kept if key not in metrics] == [
        f"val_{name}/{dataset}" for dataset in ("none", "quiet") for name in names
    ]
    assert all(math.isnan(kept[key]) for key in kept if key not in metrics)
    assert set(result.metrics(prefix="")) == {f"{name}_overall" for name in names} | {f"{name}/a" for name in names}


def test_compute_metrics_writes_result_metrics_as_json(invoke, tmp_path):
    run = write_run(tmp_path / "run")
    result = invoke("compute", run, "--metrics", tmp_path / "out" / "m.json", "--no-cache")
    assert result.exit_code == 0, result.output
    assert "Bits per spike" in result.stdout  # the table is still shown
    written = json.loads((tmp_path / "out" / "m.json").read_text())
    assert written == pytest.approx(bpseval.evaluate(run).metrics(), rel=1e-15)

    to_stdout = invoke("compute", EXAMPLE, "--metrics", "-")
    assert to_stdout.exit_code == 0
    assert json.loads(to_stdout.stdout) == pytest.approx(bpseval.evaluate(EXAMPLE).metrics(), rel=1e-15)


def test_all_steps_metrics_are_json_lines_one_per_step(invoke, tmp_path):
    run = write_run(tmp_path / "run", steps=(0, 3, 7))
    result = invoke("compute", run, "--all-steps", "--metrics", "-", "--no-cache")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["step"] for line in lines] == [0, 3, 7]
    for line in lines:
        expected = {"step": line["step"], **bpseval.evaluate(run, line["step"]).metrics()}
        assert line == pytest.approx(expected, rel=1e-15)
    assert len({line["val_bps_overall"] for line in lines}) == 3


def test_all_steps_tensorboard_writes_each_metric_at_each_step(invoke, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from tensorboard.util import tensor_util

    run = write_run(tmp_path / "run", steps=(1, 4))
    result = invoke("compute", run, "--all-steps", "--tensorboard", tmp_path / "tb", "--no-cache")
    assert result.exit_code == 0, result.output
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"), size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    expected = {step: bpseval.evaluate(run, step).metrics() for step in (1, 4)}
    assert sorted(events.Tags()[event_accumulator.TENSORS]) == sorted(expected[1])
    for tag in expected[1]:
        points = {event.step: tensor_util.make_ndarray(event.tensor_proto).item() for event in events.Tensors(tag)}
        assert points == {step: float(np.float32(values[tag])) for step, values in expected.items()}


def tensorboard_points(folder: Path) -> list[tuple[str, int]]:
    """Every (tag, step) point in every event file below `folder`, as TensorBoard's loader reads each file (no
    purging of repeated steps, which would hide duplicates)."""
    loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
    points = []
    for path in sorted(folder.rglob("*tfevents*")):
        for event in loader.EventFileLoader(str(path)).Load():
            points += [(value.tag, event.step) for value in event.summary.value]
    return points


def test_rerunning_tensorboard_on_the_same_folder_writes_each_step_once(invoke, tmp_path):
    run = write_run(tmp_path / "run", steps=(1, 4))
    expected = sorted((tag, step) for step in (1, 4) for tag in bpseval.evaluate(run, step).metrics())
    for arguments in (["--all-steps"], ["--all-steps"], ["--step", "4"]):
        result = invoke("compute", run, *arguments, "--tensorboard", tmp_path / "tb", "--no-cache")
        assert result.exit_code == 0, result.output
        assert sorted(tensorboard_points(tmp_path / "tb")) == expected
    assert sorted(path.name for path in (tmp_path / "tb").iterdir()) == [
        "events.out.tfevents.bpseval.step-000001",
        "events.out.tfevents.bpseval.step-000004",
    ]  # no staging folder left behind


def test_tensorboard_of_one_step_is_written_at_that_step(invoke, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    result = invoke("compute", EXAMPLE, "--tensorboard", tmp_path / "tb")
    assert result.exit_code == 0, result.output
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"), size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    assert [event.step for event in events.Tensors("val_bps_overall")] == [4]


def test_a_value_beyond_float32_is_left_out_of_tensorboard_with_a_warning_never_written_as_inf(invoke, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from tensorboard.util import tensor_util

    run = write_run(tmp_path / "run")
    huge = {"rhat": np.full((4, 1), 1e45), "robs": np.ones((4, 1))}  # bps about -1.4e45: -inf as a float32
    write_raw_shard(run / "step-0" / "rank2.h5", {"huge": huge}, rank=0, world_size=1, step=1)
    expected = bpseval.evaluate(run, 1).metrics()
    beyond = {tag: value for tag, value in expected.items() if abs(value) > float(np.finfo(np.float32).max)}
    assert "val_bps/huge" in beyond and beyond["val_bps/huge"] < -1e44
    result = invoke("compute", run, "--step", "1", "--tensorboard", tmp_path / "tb")
    assert result.exit_code == 0, result.output
    for tag, value in beyond.items():
        assert (
            f"Warning: --tensorboard: {tag} = {value:.6g} at step 1 is beyond the float32 range of TensorBoard's"
            " scalars, so it is not written there (--metrics and --json hold it)\n" in result.stderr
        )
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"), size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    assert sorted(events.Tags()[event_accumulator.TENSORS]) == sorted(set(expected) - set(beyond))
    for tag in events.Tags()[event_accumulator.TENSORS]:
        (point,) = events.Tensors(tag)
        assert np.isfinite(tensor_util.make_ndarray(point.tensor_proto).item()), tag


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--tensorboard", "{file}"], "--tensorboard {file}: is not a directory"),
        (["--metrics", "{folder}"], "--metrics {folder}: is a directory"),
        (["--metrics", "-", "--json", "-"], "both write to stdout"),
        (["--metrics", "-", "--tensorboard", "-"], "--tensorboard -: this option takes a folder"),
    ],
    ids=["tensorboard file", "metrics folder", "two stdouts", "tensorboard stdout"],
)
def test_unusable_dashboard_outputs_exit_2_before_any_work(invoke, tmp_path, options, message):
    (tmp_path / "file").write_text("x")
    paths = {"file": tmp_path / "file", "folder": tmp_path}
    missing_run = tmp_path / "no-such-run"  # never read: the outputs are checked first
    result = invoke("compute", missing_run, *(option.format(**paths) for option in options))
    assert result.exit_code == 2
    assert message.format(**paths) in result.stderr and "no-such-run" not in result.stderr


def test_dashboard_outputs_take_one_run(invoke, tmp_path):
    result = invoke("compute", EXAMPLE, EXAMPLE, "--metrics", tmp_path / "m.json")
    assert result.exit_code == 2 and "--metrics and --tensorboard take one run directory, not 2" in result.stderr
    assert not (tmp_path / "m.json").exists()


BLOCK_TENSORBOARD = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError("No module named 'tensorboard'")
sys.meta_path.insert(0, Block())
sys.argv = ["bpseval", "compute", sys.argv[1], "--tensorboard", sys.argv[2]]
from bpseval.cli import main
main()
"""


def test_tensorboard_without_the_package_exits_2_naming_the_extra(tmp_path):
    process = subprocess.run(
        [sys.executable, "-c", BLOCK_TENSORBOARD, str(tmp_path / "no-such-run"), str(tmp_path / "tb")],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
        timeout=60,
    )
    assert process.returncode == 2, process.stderr
    assert install_hint("tensorboard") in process.stderr and "Traceback" not in process.stderr
    assert not (tmp_path / "tb").exists()
