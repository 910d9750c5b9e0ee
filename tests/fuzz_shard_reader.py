"""Coverage-guided fuzzing of the shard reader with atheris (not part of the pytest run).

    pip install atheris
    python tests/fuzz_shard_reader.py -max_total_time=120

Each input is written as a shard and merged with `bpseval.evaluate`; a BpsevalError (exit 2 on
the command line) is the expected outcome for a broken file, any other exception is a crash.
The seed is a valid shard, so the fuzzer starts from a file the reader accepts.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import atheris
import numpy as np

with atheris.instrument_imports():
    import bpseval
    from bpseval.errors import BpsevalError

WORK = Path(tempfile.mkdtemp(prefix="bpseval-fuzz-"))


def seed_shard() -> bytes:
    rng = np.random.default_rng(0)
    rhat = rng.gamma(2.0, 0.5, size=(16, 3)).astype(np.float32)
    run = WORK / "seed"
    with bpseval.ShardWriter(run, 0, 1) as writer:
        writer.add("d", rhat, rng.poisson(rhat), (rng.random((16, 3)) > 0.2), sample_idx=np.arange(16))
    return writer.path.read_bytes()


def one_input(data: bytes) -> None:
    run = WORK / "run"
    run.mkdir(exist_ok=True)
    (run / "rank-0000.h5").write_bytes(data)
    with contextlib.suppress(BpsevalError):
        bpseval.evaluate(run)


if __name__ == "__main__":
    corpus = WORK / "corpus"
    corpus.mkdir()
    (corpus / "valid.h5").write_bytes(seed_shard())
    atheris.Setup([sys.argv[0], str(corpus), *sys.argv[1:]], one_input)
    atheris.Fuzz()
