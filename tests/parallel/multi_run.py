"""A ``torchrun`` entry that trains several layouts one after another in one process group, each
through the same code path as ``deepwhale train --parallel`` (:func:`deepwhale.train.cli.
_run_parallel`). The equivalence matrix uses it so that 20 runs cost 3 process-group start-ups
(importing torch and rendezvous take most of a tiny run's time on 2 cores) instead of 20.

Usage: ``torchrun --nproc-per-node N -m tests.parallel.multi_run JOBS.json`` where the file is a
list of ``{"config": path, "parallel": "dp=2,tp=2"}``. Each finished run writes its out_dir as
usual; a failing one stops the job (torchrun stops the other ranks).
"""

from __future__ import annotations

import gc
import json
import sys

from deepwhale.parallel.layout import parse_layout
from deepwhale.parallel.runtime import shutdown
from deepwhale.train.cli import _run_parallel
from deepwhale.train.config import load_config


def main(path: str) -> None:
    """Run every job of the JSON file at ``path`` in order."""
    import torch.distributed as dist

    with open(path, encoding="utf-8") as f:
        jobs = json.load(f)
    for job in jobs:
        extra = [f"parallel.{k}={v}" for k, v in parse_layout(job["parallel"]).items()]
        _run_parallel(load_config(job["config"], extra), keep_group=True)
        gc.collect()
        dist.barrier()
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
