#!/usr/bin/env python
"""Benchmarks of `bpseval compute` against the I/O floor, a numpy floor and the legacy per-cell loop.

    python benchmarks/run.py --scale realistic [--repeat 5] [--json results.json]
    python benchmarks/run.py all [--quick] [--repeat 3] [--json benchmarks/results/all.json]
    python benchmarks/run.py hdf5-settings [--repeat 3]
    python benchmarks/run.py profile --scale realistic
    python benchmarks/run.py steps --steps 100 --ranks 4 --repeat 3
    python benchmarks/run.py writer [--repeat 5] [--hdf5-cells 181,23]
    python benchmarks/run.py cache --steps 30 --samples 20000 --repeat 3
    python benchmarks/run.py online --repeat 5 --json benchmarks/results/online.json
    python benchmarks/run.py parallel --repeat 3 --json benchmarks/results/parallel.json

The first form (mode `shards`, benchmarks/shards.py) generates synthetic shards with
`bpseval.ShardWriter` (or reuses them), warms the page cache and times, in one run: plain h5py
reads, bpseval's kernel alone and a naive numpy pass (the numpy floor), `bpseval compute` end to
end as a subprocess (also with --jobs 2; peak RSS and the process tree's PSS), the legacy per-rank
per-cell loop, the in-memory `bpseval.bits_per_spike` on one (samples, 1000) dataset, and the
machine's capacity to run two processes at once; it also counts the CPU other processes used
meanwhile. `hdf5-settings` (benchmarks/hdf5_settings.py) times writing and reading one dataset's
arrays under several chunk shapes and compressions. `profile` (benchmarks/profiling.py) runs the
merge under cProfile. `writer` (benchmarks/writer.py) times ShardWriter, synchronous and with
background=True, against plain h5py appends and torch.save. `online` (benchmarks/online.py) times
`DistributedBPS.update` against one fused torch reduction of the same sums. `parallel`
(benchmarks/parallel.py) times `--jobs 1/2` on 3,000 tiny datasets and 256 small shards against 32
large ones holding the same data. `all` (benchmarks/overview.py) runs the measurements behind
every ratio of issue #17 and prints them in one table. benchmarks/README.md explains every
measurement and gives results.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import the `benchmarks` package, not its files as top-level modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import cache, hdf5_settings, many_steps, overview, parallel, profiling, shards, writer
from benchmarks.data import SCALES, resolve_scale
from benchmarks.shards import MEASUREMENTS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = ("shards", "all", "hdf5-settings", "profile", "steps", "writer", "cache", "online", "parallel")
    parser.add_argument(
        "mode",
        nargs="?",
        default="shards",
        choices=modes,
        help="shards (default): the full benchmark; all: every ratio of issue #17 in one table;"
        " hdf5-settings: chunk/compression table;"
        " profile: cProfile of the merge; steps: --all-steps on many small steps;"
        " writer: ShardWriter against plain h5py and torch.save;"
        " cache: --all-steps run again with the merge cache;"
        " online: DistributedBPS.update against a fused torch reduction;"
        " parallel: --jobs on 3,000 tiny datasets, 256 small shards against 32 large",
    )
    parser.add_argument("--scale", choices=SCALES, help="default: small for shards, realistic otherwise")
    parser.add_argument("--datasets", type=int, help="override the scale's number of datasets")
    parser.add_argument("--cells", type=int, help="override the scale's total number of cells")
    parser.add_argument("--samples", type=int, help="override the scale's validation samples per dataset")
    parser.add_argument("--ranks", type=int, help="override the scale's number of ranks")
    parser.add_argument("--data-dir", type=Path, help="where shards go (default: a reusable dir under the temp dir)")
    parser.add_argument("--quick", action="store_true", help="all: the smallest sizes, a smoke run (about a minute)")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions of every timing (default 5)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--measure",
        type=lambda text: text.split(","),
        default=list(MEASUREMENTS),
        help=f"comma-separated subset of {','.join(MEASUREMENTS)} (default: all)",
    )
    parser.add_argument(
        "--legacy-datasets",
        type=int,
        help="time legacy on this many datasets and extrapolate by entries (default: all)",
    )
    parser.add_argument("--in-memory-cells", type=int, default=1000, help="cells of the in-memory dataset")
    parser.add_argument("--steps", type=int, help="steps, cache: number of validation steps (default 100, 30)")
    parser.add_argument(
        "--hdf5-cells",
        type=lambda text: [int(value) for value in text.split(",")],
        default="181,23",
        help="hdf5-settings, writer: comma-separated cell counts",
    )
    args = parser.parse_args(argv)
    if args.quick and args.mode != "all":
        parser.error("--quick applies to the all mode only")
    if args.mode == "all":
        given = [
            f"--{key}" for key in ("scale", "datasets", "cells", "samples", "ranks", "steps") if getattr(args, key)
        ]
        if given:
            parser.error(f"all: {', '.join(given)} do not apply (the sizes are fixed; --quick for a smoke run)")
    unknown = set(args.measure) - set(MEASUREMENTS)
    if unknown:
        parser.error(f"unknown --measure {', '.join(sorted(unknown))}; choose from {', '.join(MEASUREMENTS)}")
    return args


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None, so that its JSON is standard (null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def main(argv: list[str] | None = None) -> None:
    """Run the chosen mode and write its JSON document when asked."""
    args = parse_args(argv)
    scale_name = args.scale or ("small" if args.mode in ("shards", "cache") else "realistic")
    overridden = any(getattr(args, key) for key in ("datasets", "cells", "samples", "ranks"))
    scale = resolve_scale(SCALES[scale_name], args.datasets, args.cells, args.samples, args.ranks)
    if args.mode == "all":
        document = overview.main(args)
    elif args.mode == "hdf5-settings":
        document = hdf5_settings.main(args, scale)
    elif args.mode == "steps":
        document = many_steps.main(args.steps or 100, args.ranks or 4, args.repeat)
    elif args.mode == "writer":
        document = writer.main(args.hdf5_cells, scale.samples, args.repeat, args.data_dir)
    elif args.mode == "cache":
        document = cache.main(scale, args.steps or 30, args.repeat, args.data_dir)
    elif args.mode == "online":
        from benchmarks import online  # imports torch, which the other modes do not need

        document = online.main(args.repeat)
    elif args.mode == "parallel":
        document = parallel.main(args.repeat, args.data_dir)
    elif args.mode == "profile":
        document = profiling.main(scale, args.data_dir)
    else:
        document = shards.main(args, f"{scale_name} (overridden)" if overridden else scale_name, scale)
    if args.json:
        args.json.write_text(json.dumps(finite(document), indent=2, default=float))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
