"""Hidden-subgroup audit: a planted weak group is found and flagged."""

from __future__ import annotations

import numpy as np

from medsig.evaluate.audit import audit_partition, embedding_clusters


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("one class")
    ranks = np.empty(len(s))
    ranks[np.argsort(s, kind="stable")] = np.arange(1, len(s) + 1)  # continuous: no ties
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _planted(seed: int, per_group: int = 150, weak: int = 2):
    """4 lightings (embedding blobs); the heads score lighting ``weak`` at chance."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, 16)) * 2.0
    lighting = np.repeat(np.arange(4), per_group)
    emb = centres[lighting] + rng.normal(size=(len(lighting), 16))
    y = rng.integers(0, 2, len(lighting))
    scores = y + rng.normal(0, 0.6, len(lighting))
    scores[lighting == weak] = rng.normal(0, 1, per_group)
    groups = np.array([f"p{i // 2}" for i in range(len(lighting))])  # 2 images per patient
    return emb, y, scores, lighting, groups


def test_audit_finds_a_planted_weak_group_in_at_least_9_of_10_seeds():
    found_cluster = found_column = 0
    for seed in range(10):
        emb, y, s, lighting, groups = _planted(seed)
        clusters = embedding_clusters(emb, seed=seed)
        res = audit_partition(clusters, _auc, (y, s), groups, n_boot=60, seed=seed)
        worst = res["worst"]
        rows = clusters == worst["value"]
        if worst["flagged"] and (lighting[rows] == 2).mean() >= 0.8:
            found_cluster += 1
        col = audit_partition(lighting.astype(str), _auc, (y, s), groups, n_boot=60,
                              seed=seed)
        found_column += col["worst"]["value"] == "2" and col["worst"]["flagged"]
        sub = col["subgroups"]["2"]
        assert sub["n"] == 150 and sub["groups"] == 75 and sub["low"] <= sub["point"]
    assert found_cluster >= 9 and found_column >= 9


def test_audit_does_not_flag_when_every_group_is_alike():
    flagged = 0
    for seed in range(5):
        emb, y, s, lighting, groups = _planted(seed)
        s = y + np.random.default_rng(seed + 99).normal(0, 0.6, len(y))  # no weak group
        res = audit_partition(embedding_clusters(emb, seed=seed), _auc, (y, s), groups,
                              n_boot=60, seed=seed)
        flagged += res["worst"]["flagged"]
    assert flagged <= 1


def test_small_subgroups_are_listed_never_flagged():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = y + rng.normal(0, 0.5, 200)
    part = np.array(["big"] * 190 + ["tiny"] * 10)
    s[190:] = -y[190:]  # the tiny group is perfectly wrong
    res = audit_partition(part, _auc, (y, s), None, n_boot=50, seed=0, min_n=20)
    assert res["subgroups"]["tiny"]["small"] is True
    assert res["worst"]["value"] == "big"
