"""One process of a multi-process training test (run by `accelerate launch`, see
tests/test_train_distributed.py): trains each job of a JSON job list in turn and records,
per optimizer step, the rows this process was given (``rows-<rank>.json`` in each out).

A job is {"config": {...}, "stop_at": step or null}: with ``stop_at`` the run is
interrupted after that step (an exception from the callback, on every process) and then
resumed with ``resume=True``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RECORDED: list[list[list[int]]] = []


def record_rows(cls: Any) -> None:
    """Wrap ``cls.step`` to append the rows of each micro-batch (ghost slices as [])."""
    step = cls.step

    def recording(self: Any, batches: list[Any]) -> Any:
        RECORDED.append([[] if b.ghost else list(b.rows) for b in batches])
        return step(self, batches)

    cls.step = recording


class Stop(Exception):
    pass


def run_job(job: dict[str, Any]) -> None:
    from medsig.train import train

    def stop(info: dict[str, Any]) -> None:
        if info["step"] == job["stop_at"]:
            raise Stop

    RECORDED.clear()
    if job.get("stop_at"):
        try:
            train(job["config"], callback=stop)
        except Stop:
            pass
        train(job["config"], resume=True)
    else:
        train(job["config"])


def main(jobs_file: str) -> None:
    from medsig.train.classify import ClassifyObjective
    from medsig.train.contrastive import ContrastiveObjective
    from medsig.train.distributed import world

    record_rows(ContrastiveObjective)
    record_rows(ClassifyObjective)
    for job in json.loads(Path(jobs_file).read_text()):
        run_job(job)
        rank = world()[0]
        out = Path(job["config"]["out"]) / f"rows-{rank}.json"
        out.write_text(json.dumps(RECORDED))


if __name__ == "__main__":
    main(sys.argv[1])
