"""Evaluation metrics against scikit-learn and brute-force references."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from medsig.errors import ConfigError, DataError
from medsig.evaluate.bootstrap import Resampler, bootstrap_ci, paired_bootstrap
from medsig.evaluate.leakage import check_leakage, leakage_report
from medsig.metrics.classification import (
    binary_metrics,
    calibration,
    multiclass_metrics,
    multilabel_metrics,
    roc_auc,
)
from medsig.metrics.clustering import clustering_metrics, purity
from medsig.metrics.retrieval import (
    batchwise_recall,
    distractor_accuracy,
    retrieval_metrics,
    retrieval_ranks,
    zeroshot_scores,
)
from medsig.models.thresholds import (
    choose_thresholds,
    rule_names,
    threshold_for_sensitivity,
    youden_threshold,
)


def _binary(n: int, seed: int, missing: float = 0.2, ties: bool = True):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(np.int8)
    s = rng.random(n) * 0.6 + 0.4 * y
    if ties:
        s = np.round(s, 2)
    y[rng.random(n) < missing] = -1
    return y, s


# -- thresholds -----------------------------------------------------------------------------
def test_youden_matches_roc_curve_and_ignores_missing():
    for seed in range(5):
        y, s = _binary(300, seed)
        k = y != -1
        fpr, tpr, thr = skm.roc_curve(y[k], s[k], drop_intermediate=False)
        j = tpr - fpr
        expected = thr[1:][np.argmax(j[1:])]
        assert youden_threshold(y, s) == pytest.approx(expected)
    assert youden_threshold([1, 1, -1], [0.2, 0.3, 0.9]) == 0.5  # one class: default


def test_threshold_for_sensitivity_is_highest_reaching_target():
    for seed in range(5):
        y, s = _binary(200, seed)
        k = y != -1
        for target in (0.5, 0.7, 0.9, 1.0):
            t = threshold_for_sensitivity(y, s, target)
            assert np.mean(s[k][y[k] == 1] >= t) >= target
            higher = np.unique(s[k])[np.unique(s[k]) > t]
            assert all(np.mean(s[k][y[k] == 1] >= h) < target for h in higher)
    with pytest.raises(ConfigError):
        threshold_for_sensitivity([0, 1], [0.1, 0.2], 1.5)


def test_choose_thresholds_per_label_rules_and_masking():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (150, 3)).astype(np.float32)
    s = rng.random((150, 3)) * 0.5 + 0.5 * y
    y[:20] = -1  # missing rows
    out = choose_thresholds(y, s, {"b": 0.9}, names=["a", "b", "c"])
    assert out[0] == youden_threshold(y[20:, 0], s[20:, 0])
    assert out[1] == threshold_for_sensitivity(y[20:, 1], s[20:, 1], 0.9)
    assert out[2] == youden_threshold(y[20:, 2], s[20:, 2])
    assert rule_names({"b": 0.9}, ["a", "b", "c"]) == ["youden", "sensitivity>=0.9", "youden"]
    with pytest.raises(ConfigError, match="zzz"):
        choose_thresholds(y, s, {"zzz": 0.9}, names=["a", "b", "c"])


# -- classification ---------------------------------------------------------------------------
def test_binary_metrics_equal_sklearn_with_missing_and_ties():
    for seed in range(4):
        y, s = _binary(400, seed)
        m = binary_metrics(y, s, threshold=0.55)
        k = y != -1
        yt, st = y[k], s[k]
        pred = (st >= 0.55).astype(int)
        tn, fp, fn, tp = skm.confusion_matrix(yt, pred).ravel()
        assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(yt, st), abs=1e-12)
        assert m["average_precision"] == pytest.approx(skm.average_precision_score(yt, st))
        assert m["sensitivity"] == pytest.approx(skm.recall_score(yt, pred))
        assert m["ppv"] == pytest.approx(skm.precision_score(yt, pred))
        assert m["f1"] == pytest.approx(skm.f1_score(yt, pred))
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(yt, pred))
        assert m["specificity"] == pytest.approx(tn / (tn + fp))
        assert m["npv"] == pytest.approx(tn / (tn + fn))
        assert (m["n"], m["n_pos"], m["n_missing"]) == (k.sum(), yt.sum(), (~k).sum())


def test_binary_metrics_one_class_is_nan_not_crash():
    m = binary_metrics([1, 1, -1, 1], [0.9, 0.2, 0.5, 0.7])
    assert np.isnan(m["roc_auc"]) and np.isnan(m["average_precision"])
    assert np.isnan(m["specificity"]) and m["sensitivity"] == pytest.approx(2 / 3)
    with pytest.raises(DataError, match="2"):
        binary_metrics([0, 2], [0.1, 0.2])


def test_multilabel_metrics_per_label_macro_micro():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (200, 4)).astype(np.float32)
    s = np.clip(rng.random((200, 4)) * 0.7 + 0.3 * y, 0, 1)
    thr = [0.3, 0.5, 0.6, 0.7]
    m = multilabel_metrics(y, s, ["a", "b", "c", "d"], thresholds=thr)
    for j, name in enumerate("abcd"):
        assert m["per_label"][name]["roc_auc"] == pytest.approx(skm.roc_auc_score(y[:, j], s[:, j]))
        assert m["per_label"][name]["f1"] == pytest.approx(skm.f1_score(y[:, j], s[:, j] >= thr[j]))
        assert m["per_label"][name]["at_0.5"]["f1"] == pytest.approx(
            skm.f1_score(y[:, j], s[:, j] >= 0.5))
    assert m["macro"]["roc_auc"] == pytest.approx(skm.roc_auc_score(y, s, average="macro"))
    assert m["micro"]["roc_auc"] == pytest.approx(skm.roc_auc_score(y, s, average="micro"))
    assert m["micro"]["average_precision"] == pytest.approx(
        skm.average_precision_score(y, s, average="micro"))
    assert m["macro_at_0.5"]["f1"] == pytest.approx(skm.f1_score(y, s >= 0.5, average="macro"))
    y2 = y.copy()
    y2[:30] = -1  # missing rows are excluded exactly
    m2 = multilabel_metrics(y2, s, list("abcd"))
    assert m2["n_missing_rows"] == 30
    assert m2["per_label"]["c"]["roc_auc"] == pytest.approx(
        skm.roc_auc_score(y[30:, 2], s[30:, 2]))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_multiclass_metrics_equal_sklearn():
    rng = np.random.default_rng(2)
    c, n = 5, 300
    y = rng.integers(0, c - 1, n)  # class 4 never true
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), y] += 1.0
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y_m = y.copy()
    y_m[:25] = -1
    m = multiclass_metrics(y_m, p, list("abcde"))
    yt, pt = y[25:], p[25:]
    pred = pt.argmax(1)
    pr, rc, f1, _ = skm.precision_recall_fscore_support(yt, pred, average="macro",
                                                        zero_division=0)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(yt, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(yt, pred))
    assert (m["macro_precision"], m["macro_recall"], m["macro_f1"]) == pytest.approx((pr, rc, f1))
    assert m["confusion_matrix"] == skm.confusion_matrix(yt, pred, labels=range(c)).tolist()
    for k in range(c - 1):
        assert m["per_class"]["abcde"[k]]["roc_auc_ovr"] == pytest.approx(
            skm.roc_auc_score(yt == k, pt[:, k]))
    assert np.isnan(m["per_class"]["e"]["roc_auc_ovr"]) and m["n_missing"] == 25


def test_calibration_equals_sklearn_curve():
    rng = np.random.default_rng(3)
    p = rng.random(500) ** 2
    y = (rng.random(500) < p).astype(np.int8)
    p[:5] = [0.1, 0.2, 0.5, 0.0, 1.0]  # values on bin edges
    y[-10:] = -1
    m = calibration(y, p, n_bins=10)
    k = y != -1
    true, pred = calibration_curve(y[k], p[k], n_bins=10)
    full = [b for b in m["bins"] if b["count"]]
    assert np.allclose([b["fraction_positive"] for b in full], true)
    assert np.allclose([b["mean_confidence"] for b in full], pred)
    ece = sum(b["count"] / k.sum() * abs(b["fraction_positive"] - b["mean_confidence"])
              for b in full)
    assert m["ece"] == pytest.approx(ece) and m["n"] == k.sum()
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y[k], p[k]))
    assert sum(b["count"] for b in m["bins"]) == k.sum()


# -- retrieval --------------------------------------------------------------------------------
def _brute_ranks(a, b, gi, gt):
    """Full matrix: 1 + non-positives scoring >= the best positive (ties against)."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    s = a @ b.T

    def ranks(s, ga, gb):
        out = []
        for i in range(s.shape[0]):
            if ga[i] < 0 or not (gb == ga[i]).any():
                out.append(-1)
                continue
            pos = gb == ga[i]
            out.append(int((s[i][~pos] >= s[i][pos].max() - 1e-5).sum()) + 1)
        return np.array(out)

    return ranks(s, gi, gt), ranks(s.T, gt, gi)


@pytest.mark.parametrize("case", ["diagonal", "groups", "unequal"])
def test_retrieval_ranks_equal_brute_force_for_any_chunk(case):
    rng = np.random.default_rng(4)
    n_i, n_t = (60, 90) if case == "unequal" else (80, 80)
    a = rng.normal(size=(n_i, 12)).astype(np.float32)
    b = rng.normal(size=(n_t, 12)).astype(np.float32) * 3  # not unit: normalised inside
    if case == "diagonal":
        gi = gt = np.arange(n_i)
        positives = None
    elif case == "groups":
        gi = gt = rng.integers(-1, 6, n_i)  # -1 = label missing
        positives = gi
    else:
        gi, gt = rng.integers(-1, 12, n_i), rng.integers(0, 10, n_t)
        positives = (gi, gt)
    want_i, want_t = _brute_ranks(a, b, gi, gt)
    for chunk in (1, 7, 32, 4096):
        got_i, got_t = retrieval_ranks(a, b, positives, chunk_size=chunk)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_array_equal(got_t, want_t)
    m = retrieval_metrics(a, b, positives, ks=(1, 5), chunk_size=16)
    ok = want_i > 0
    assert m["image_to_text"]["recall@5"] == pytest.approx(np.mean(want_i[ok] <= 5))
    assert m["image_to_text"]["median_rank"] == pytest.approx(np.median(want_i[ok]))
    assert m["text_to_image"]["recall@1"] == pytest.approx(np.mean(want_t[want_t > 0] == 1))
    assert m["image_to_text"]["n_without_positive"] == int((~ok).sum())


def test_retrieval_string_groups_and_torch_input():
    rng = np.random.default_rng(5)
    a = torch.nn.functional.normalize(torch.randn(40, 8, generator=torch.Generator()
                                                  .manual_seed(0)), dim=1)
    b = a + 0.3 * torch.from_numpy(rng.normal(size=(40, 8)).astype(np.float32))
    caps = np.array([f"case{i % 13}" for i in range(40)], dtype=object)
    caps[3] = None  # no caption: not a query
    ints = np.array([i % 13 for i in range(40)])
    ints[3] = -1
    got = retrieval_ranks(a, b, caps)
    want = retrieval_ranks(a.numpy(), b.numpy(), ints)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[0][3] == -1


def test_batchwise_recall_equals_brute_force_per_batch():
    rng = np.random.default_rng(6)
    n, bs = 100, 16
    a = rng.normal(size=(n, 10)).astype(np.float32)
    b = a + rng.normal(size=(n, 10)).astype(np.float32)
    g = rng.integers(0, 4, n)
    for positives in (None, g):
        m = batchwise_recall(a, b, batch_size=bs, ks=(1, 3), positives=positives, seed=3)
        perm = np.random.default_rng(3).permutation(n)[: (n // bs) * bs].reshape(-1, bs)
        ri, rt = [], []
        for idx in perm:
            gg = np.arange(bs) if positives is None else g[idx]
            r = _brute_ranks(a[idx], b[idx], gg, gg)
            ri.append(r[0])
            rt.append(r[1])
        ri, rt = np.concatenate(ri), np.concatenate(rt)
        assert m["n_batches"] == n // bs and m["n_dropped"] == n % bs
        assert m["image_to_text"]["recall@1"] == pytest.approx(np.mean(ri == 1))
        assert m["text_to_image"]["recall@3"] == pytest.approx(np.mean(rt <= 3))
    glob = retrieval_metrics(a, b, ks=(1,))["image_to_text"]["recall@1"]
    assert batchwise_recall(a, b, 16, ks=(1,))["image_to_text"]["recall@1"] > glob


def test_distractor_accuracy_and_zeroshot():
    rng = np.random.default_rng(7)
    c, n = 12, 300
    cls = rng.normal(size=(c, 16)).astype(np.float32)
    y = rng.integers(0, c, n)
    img = cls[y] + 1.2 * rng.normal(size=(n, 16)).astype(np.float32)
    y[:10] = -1
    full = distractor_accuracy(img, cls, y, n_distractors=50)  # capped at C - 1 = all others
    top1 = (img[10:] @ (cls / np.linalg.norm(cls, axis=1, keepdims=True)).T).argmax(1)
    assert full["n_distractors"] == c - 1 and full["n"] == n - 10
    assert full["accuracy"] == pytest.approx(np.mean(top1 == y[10:]))
    easy = distractor_accuracy(img, cls, y, n_distractors=3, seed=1)
    assert easy["chance"] == 0.25 and easy["accuracy"] > full["accuracy"]
    noise = distractor_accuracy(rng.normal(size=(4000, 16)), cls, rng.integers(0, c, 4000), 9)
    assert abs(noise["accuracy"] - 0.1) < 0.03  # chance level for random embeddings

    templ = np.stack([cls, cls + 0.1 * rng.normal(size=cls.shape)], axis=1)  # (C, T, d)
    p = zeroshot_scores(img, templ, logit_scale=50.0)
    u = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    proto = u(u(templ).mean(1))
    logits = 50.0 * u(img) @ proto.T
    soft = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(p, soft / soft.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)
    sig = zeroshot_scores(img, cls, logit_scale=10.0, logit_bias=-2.0)
    np.testing.assert_allclose(sig, 1 / (1 + np.exp(-(10 * u(img) @ u(cls).T - 2))), rtol=1e-4)


# -- clustering -------------------------------------------------------------------------------
def test_clustering_metrics_planted_clusters_and_missing_labels():
    rng = np.random.default_rng(8)
    centers = rng.normal(size=(3, 20)) * 5
    y = np.repeat([0, 1, 2], 40)
    x = centers[y] + rng.normal(size=(120, 20))
    m = clustering_metrics(x, y, class_names=["a", "b", "c"])
    assert m["nmi"] == pytest.approx(1.0) and m["purity"] == 1.0 and m["ari"] == pytest.approx(1)
    assert m["silhouette"] > 0.5 and m["per_category"]["b"]["purity"] == 1.0
    noisy = np.r_[x, rng.normal(size=(30, 20)) * 9]  # rows with missing labels
    m2 = clustering_metrics(noisy, np.r_[y, -np.ones(30, int)], class_names=["a", "b", "c"])
    assert m2["n"] == 120 and m2["n_missing"] == 30 and m2["nmi"] == pytest.approx(m["nmi"])
    rand = clustering_metrics(rng.normal(size=(300, 20)), rng.integers(0, 3, 300))
    assert rand["nmi"] < 0.1 and abs(rand["ari"]) < 0.05 and rand["k"] == 3
    lab, clu = rng.integers(0, 4, 200), rng.integers(0, 6, 200)
    brute = sum(np.bincount(lab[clu == c]).max() for c in np.unique(clu)) / 200
    assert purity(lab, clu) == pytest.approx(brute)


# -- bootstrap --------------------------------------------------------------------------------
def test_bootstrap_ci_contains_point_and_narrows_with_n():
    widths = []
    for n in (100, 2000):
        y, s = _binary(n, 9, missing=0.0)
        r = bootstrap_ci(roc_auc, y, s, n_boot=300, seed=1)
        point, low, high = r
        assert low <= point <= high and r.unit == "rows"
        assert point == pytest.approx(skm.roc_auc_score(y, s))
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def test_group_resampling_includes_whole_groups_and_is_wider_for_clustered_data():
    rng = np.random.default_rng(10)
    groups = np.repeat(np.arange(40), 25)  # 40 patients x 25 images
    rs = Resampler(len(groups), groups, seed=0)
    idx = rs.draw()
    drawn, counts = np.unique(groups[idx], return_counts=True)
    assert (counts % 25 == 0).all() and len(idx) == 1000
    # outcome shared within a patient: rows are not independent
    y = np.repeat(rng.integers(0, 2, 40), 25)
    s = np.repeat(rng.random(40), 25) + 0.3 * y
    by_row = bootstrap_ci(roc_auc, y, s, n_boot=300, seed=2)
    by_group = bootstrap_ci(roc_auc, y, s, groups=groups, n_boot=300, seed=2)
    assert by_group.unit == "groups" and by_group.n_units == 40
    assert (by_group.high - by_group.low) > 2 * (by_row.high - by_row.low)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_bootstrap_skips_degenerate_resamples_and_is_fast():
    y = np.array([1, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.5])
    r = bootstrap_ci(skm.roc_auc_score, y, s, n_boot=200, seed=0)  # raises on one class
    assert 0 < r.n_skipped < 200 and np.isfinite(r.low)
    y, s = _binary(2000, 11, missing=0.0)
    t = time.perf_counter()
    bootstrap_ci(roc_auc, y, s, n_boot=1000)
    assert time.perf_counter() - t < 5.0


def test_paired_bootstrap_verdicts():
    rng = np.random.default_rng(12)
    n = 600
    y = rng.integers(0, 2, n)
    groups = np.arange(n) // 3
    same_a = y + rng.normal(size=n) * 1.5
    same_b = y + rng.normal(size=n) * 1.5
    good = y + rng.normal(size=n) * 0.5
    tie = paired_bootstrap(roc_auc, (y, same_a), (y, same_b), groups, n_boot=400)
    assert not tie["significant"] and tie["verdict"].startswith("not significant (95% CI")
    win = paired_bootstrap(roc_auc, (y, good), (y, same_a), groups, n_boot=400)
    assert win["significant"] and win["low"] > 0 and win["verdict"].startswith("A better (+0.")
    lose = paired_bootstrap(roc_auc, (y, same_a), (y, good), groups, n_boot=400,
                            names=("base", "tuned"))
    assert lose["verdict"].startswith("tuned better (-0.")


# -- leakage ----------------------------------------------------------------------------------
def test_leakage_check_catches_planted_leak():
    groups = np.array([f"p{i // 2}" for i in range(40)])
    split = np.array(["train"] * 20 + ["val"] * 10 + ["test"] * 10)
    check_leakage(groups, split)  # groups never straddle a split boundary here
    split[21] = "test"  # p10: val + test
    split[19] = "test"  # p9: train + test
    with pytest.raises(DataError, match=r"2 group\(s\).*'p10' \(val, test\).*'p9' \(train, test\)"):
        check_leakage(groups, split)
    rep = leakage_report(groups, split)
    assert rep["n_leaked_groups"] == 2 and rep["n_leaked_rows"] == 4
    assert rep["pairs"] == {"val/test": 1, "train/test": 1}
    assert rep["splits"]["train"] == {"rows": 19, "groups": 10}


def test_leakage_report_near_duplicate_images():
    rng = np.random.default_rng(13)
    emb = rng.normal(size=(30, 16))
    split = np.array(["train"] * 20 + ["test"] * 10)
    emb[25] = emb[4] + 1e-3  # same image under another patient id
    rep = leakage_report(np.arange(30).astype(str), split, emb=emb, dup_threshold=0.99)
    assert rep["n_leaked_groups"] == 0
    assert rep["near_duplicates"]["counts"] == {"train/test": 1}
    ex = rep["near_duplicates"]["examples"][0]
    assert (ex["row"], ex["duplicate_of_row"]) == (26, 5)
