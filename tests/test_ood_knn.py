"""The OOD gate's image-statistics channel as a relative nearest-neighbour distance: it
follows a train split made of several populations where one Gaussian cannot, and gates
written before it (one Gaussian, no ``stats_method``) load and score as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medsig.errors import ConfigError
from medsig.metrics.classification import roc_auc
from medsig.models.ood import OodGate, _nearest, fit_ood


def _two_populations(n: int, rng: np.random.Generator, d: int = 3) -> np.ndarray:
    """Two tight groups of 'image statistics' far apart along the first axis."""
    x = rng.normal(scale=0.3, size=(n, d))
    x[:, 0] += np.where(rng.random(n) < 0.5, -4.0, 4.0)
    return x


def _auroc(s_in: np.ndarray, s_out: np.ndarray) -> float:
    return roc_auc(np.r_[np.zeros(len(s_in)), np.ones(len(s_out))], np.r_[s_in, s_out])


def _gates(rng: np.random.Generator) -> tuple[dict[str, OodGate], dict[str, np.ndarray]]:
    x = {"train": _two_populations(300, rng), "val": _two_populations(200, rng),
         "test": _two_populations(200, rng)}
    between = rng.normal(scale=0.3, size=(100, 3))  # between the groups: near the mean
    emb = {k: rng.normal(size=(len(v), 8)) for k, v in {**x, "out": between}.items()}
    gates = {m: fit_ood(emb["train"], emb["val"], 0.05, train_stats=x["train"],
                        val_stats=x["val"], stats_method=m) for m in ("knn", "mahalanobis")}
    return gates, {"emb_test": emb["test"], "emb_out": emb["out"], "test": x["test"],
                   "out": between}


def test_knn_channel_sees_what_lies_between_two_populations() -> None:
    gates, d = _gates(np.random.default_rng(5))
    auroc = {m: _auroc(g.stats_score(d["test"]), g.stats_score(d["out"]))
             for m, g in gates.items()}
    assert auroc["knn"] >= 0.95 and auroc["mahalanobis"] < 0.6, auroc  # measured 0.99, 0.25
    knn = gates["knn"]
    assert knn.stats_method == "knn" and knn.info()["stats_method"] == "knn"
    s_in, s_out = knn.score(d["emb_test"], d["test"]), knn.score(d["emb_out"], d["out"])
    assert knn.flag(s_in).mean() <= 0.12  # false rejects near the chosen 5 %
    assert knn.flag(s_out).mean() >= 0.8
    with pytest.raises(ConfigError, match="image-statistics method"):
        fit_ood(d["emb_test"], d["emb_test"], train_stats=d["test"], val_stats=d["test"],
                stats_method="gmm")


def test_nearest_neighbours_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    ref, q = rng.normal(size=(50, 3)), rng.normal(size=(7, 3))
    dist, idx = _nearest(q, ref, 4, chunk=3)
    full = np.linalg.norm(q[:, None] - ref[None], axis=-1)
    assert np.array_equal(idx, np.argsort(full, axis=1)[:, :4])
    assert np.allclose(dist, np.sort(full, axis=1)[:, :4], atol=1e-5)
    own, idx = _nearest(ref, ref, 1, exclude_self=True, chunk=16)
    assert (idx[:, 0] != np.arange(50)).all() and (own > 0).all()


def test_gate_written_before_the_knn_channel_loads_and_scores_as_before(
        tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    gates, d = _gates(np.random.default_rng(6))
    old = gates["mahalanobis"]
    old.save(tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), framework="numpy") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != "stats_method"}
        arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert not any(k.endswith(("reference", "radius", "whiten")) for k in arrays)
    save_file(arrays, str(tmp_path / "old.safetensors"), metadata=meta)  # as written before
    back = OodGate.load(tmp_path / "old.safetensors")
    assert back.stats_method == "mahalanobis" and back.threshold == old.threshold
    assert np.allclose(back.score(d["emb_out"], d["out"]), old.score(d["emb_out"], d["out"]),
                       rtol=1e-5)
    knn = gates["knn"]  # a kNN gate that lost its neighbours is refused with one clear line
    arrays = {k: v for k, v in knn.arrays.items() if not k.endswith("reference")}
    save_file(arrays, str(tmp_path / "broken.safetensors"),
              metadata={"kind": "mahalanobis", "k": "5", "threshold": "2",
                        "false_reject": "0.05", "stats_method": "knn",
                        "calibration": '{"embedding": [1, 1], "image_stats": [1, 1]}'})
    with pytest.raises(ConfigError, match="unreadable OOD statistics"):
        OodGate.load(tmp_path / "broken.safetensors")
