"""Unit vectors and chunked cosine search: the one place embeddings are normalised and
nearest rows found, for near-duplicate checks (data), leakage and retrieval (evaluate)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medsig.errors import DataError


def normalize(emb: Any, device: torch.device, what: str = "embeddings") -> torch.Tensor:
    """(n, d) float32 tensor on ``device`` with unit rows (no copy when already so)."""
    t = emb.detach() if isinstance(emb, torch.Tensor) else torch.as_tensor(np.asarray(emb))
    if t.ndim != 2:
        raise DataError(f"{what} must be a 2-D (n, d) array, got shape {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.float32).contiguous()
    if t.shape[0] == 0:
        return t
    norms = torch.linalg.vector_norm(t, dim=1)
    if not bool(torch.isfinite(norms).all()):
        row = int((~torch.isfinite(norms)).nonzero()[0])
        raise DataError(f"{what}: row {row + 1} contains NaN or infinite values")
    if bool((norms == 0).any()):
        row = int((norms == 0).nonzero()[0])
        raise DataError(f"{what}: row {row + 1} is an all-zero vector")
    if float((norms - 1).abs().max()) > 1e-4:
        t = t / norms[:, None]
    return t


def max_cosine(q: torch.Tensor, r: torch.Tensor, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``q`` its best cosine against ``r`` and that row's index (chunked)."""
    best = torch.full((q.shape[0],), -torch.inf)
    arg = torch.zeros(q.shape[0], dtype=torch.int64)
    for c0 in range(0, r.shape[0], chunk):
        s = q @ r[c0:c0 + chunk].T
        v, i = s.max(dim=1)
        better = v > best
        best = torch.where(better, v, best)
        arg = torch.where(better, i + c0, arg)
    return best.numpy(), arg.numpy()


def split_near_duplicates(emb: Any, s: np.ndarray, rows: np.ndarray, names: list[str],
                     threshold: float, chunk: int, max_examples: int) -> dict[str, Any]:
    """Rows of each later split whose embedding has a cosine >= ``threshold`` to a row of an
    earlier split (`names` in split order), counted per split pair, with examples."""
    x = normalize(emb, torch.device("cpu"), "embeddings")
    if x.shape[0] != len(s):
        raise DataError(f"{x.shape[0]} embeddings for {len(s)} rows")
    counts: dict[str, int] = {}
    examples = []
    for i, a in enumerate(names):
        ref = rows[s[rows] == a]
        for b in names[i + 1:]:
            qry = rows[s[rows] == b]
            best, arg = max_cosine(x[torch.from_numpy(qry)], x[torch.from_numpy(ref)], chunk)
            hit = np.nonzero(best >= threshold)[0]
            counts[f"{a}/{b}"] = int(len(hit))
            for h in hit[: max(0, max_examples - len(examples))]:
                examples.append({"row": int(qry[h]) + 1, "split": b,
                                 "duplicate_of_row": int(ref[arg[h]]) + 1, "split_of_duplicate": a,
                                 "cosine": float(best[h])})
    return {"threshold": threshold, "counts": counts, "examples": examples}
