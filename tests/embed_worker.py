"""One process of a sharded-embedding test (started by `medsig.index.sharded.launch`, see
tests/test_embed_distributed.py): runs each job of a JSON job list with `embed_collection`,
records the rows this process embedded and writes rank 0's report (``report-<job>.json``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from medsig.index import runner
from medsig.index.store import close_store

ROWS: list[int] = []


def _recording(iter_embeddings):
    def wrapped(encoder, collection, rows, *args, **kwargs):
        ROWS.extend(rows)
        return iter_embeddings(encoder, collection, rows, *args, **kwargs)

    return wrapped


def main(jobs_file: str) -> None:
    runner.iter_embeddings = _recording(runner.iter_embeddings)
    for k, job in enumerate(json.loads(Path(jobs_file).read_text())):
        ROWS.clear()
        report = runner.embed_collection(job["spec"], job["model"], job["store"], "wounds",
                                         batch_size=4, limit=job["limit"], num_workers=0,
                                         progress=False)
        close_store(job["store"])
        out = Path(job["store"]).parent
        (out / f"rows-{k}-{report.rank}.json").write_text(json.dumps(ROWS))
        if report.rank == 0:
            (out / f"report-{k}.json").write_text(json.dumps(report.to_dict()))
    assert dist.is_initialized()  # the first call joined the launcher's group, the next reused it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
