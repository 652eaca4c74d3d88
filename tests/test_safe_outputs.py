"""Temperature scaling, split-conformal sets and the OOD gate on synthetic score arrays."""

from __future__ import annotations

import numpy as np
import pytest

from medsig.errors import ConfigError
from medsig.metrics.classification import calibration
from medsig.models.calibration import apply_calibration, fit_calibration, fit_scaling
from medsig.models.conformal import conformal_quantile, coverage, fit_conformal
from medsig.models.heads import Head
from medsig.models.ood import OodGate, fit_ood

HEADS = [Head("urgency", "binary", ["home care", "needs attention"], 0, 1),
         Head("risk", "multiclass", ["low", "medium", "high"], 1, 3),
         Head("signs", "multilabel", ["red", "swollen"], 4, 2)]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _world(n: int, rng: np.random.Generator, sharpen: float = 3.0):
    """True probabilities, labels drawn from them, and over-confident model outputs."""
    zb = rng.normal(0, 1.5, n)
    zm = rng.normal(0, 1.5, (n, 3))
    zl = rng.normal(0, 1.5, (n, 2))
    yb = (rng.random(n) < 1 / (1 + np.exp(-zb))).astype(np.int8)
    pm = _softmax(zm)
    ym = np.array([rng.choice(3, p=p) for p in pm])
    yl = (rng.random((n, 2)) < 1 / (1 + np.exp(-zl))).astype(np.float32)
    probs = np.concatenate([1 / (1 + np.exp(-sharpen * zb[:, None])), _softmax(sharpen * zm),
                            1 / (1 + np.exp(-sharpen * zl))], axis=1)
    return probs, {"urgency": yb, "risk": ym, "signs": yl}


def test_calibration_recovers_overconfidence_and_lowers_ece():
    rng = np.random.default_rng(0)
    val, yv = _world(3000, rng)
    test, yt = _world(3000, rng)
    temps = fit_calibration(HEADS, yv, val)
    assert temps["urgency"][0][0] == pytest.approx(1 / 3, rel=0.15)  # Platt a = 1 / 3
    assert abs(temps["urgency"][0][1]) < 0.15  # no shift to undo
    assert temps["risk"][0][0] == pytest.approx(1 / 3, rel=0.15)  # temperature 3
    assert len(temps["signs"]) == 2
    cal = apply_calibration(HEADS, temps, test)
    before = calibration(yt["urgency"], test[:, 0])
    after = calibration(yt["urgency"], cal[:, 0])
    assert after["ece"] < before["ece"] / 2 and after["brier"] < before["brier"]
    m_before, m_after = calibration(yt["risk"], test[:, 1:4]), calibration(yt["risk"],
                                                                              cal[:, 1:4])
    assert m_after["ece"] < m_before["ece"] / 2
    # rankings and argmax unchanged; exactly invertible
    assert (cal[:, 1:4].argmax(1) == test[:, 1:4].argmax(1)).all()
    order = np.argsort(test[:, 0])
    assert (np.diff(cal[order, 0]) >= 0).all()  # monotone: the same ranking
    back = apply_calibration(HEADS, temps, cal, invert=True)
    assert np.abs(back - test).max() < 1e-4


def test_platt_undoes_a_shifted_base_rate():
    """A classifier trained with a positive-class weight: right ranking, shifted logits
    (the demo's urgent head, ECE 0.397) - a temperature cannot fix it, Platt's b can."""
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.5, 6000)
    y = (rng.random(6000) < 1 / (1 + np.exp(-z))).astype(np.int8)
    shifted = 1 / (1 + np.exp(-(z + 2.0)))
    a, b = fit_scaling(y[:3000], shifted[:3000], "binary")
    assert a == pytest.approx(1.0, abs=0.1) and b == pytest.approx(-2.0, abs=0.2)
    head = [Head("u", "binary", ["no", "yes"], 0, 1)]
    cal = apply_calibration(head, {"u": [[a, b]]}, shifted[3000:, None])[:, 0]
    before, after = calibration(y[3000:], shifted[3000:]), calibration(y[3000:], cal)
    assert before["ece"] > 0.2 and after["ece"] < 0.03


def test_calibration_ignores_missing_and_degenerate_targets():
    p = np.array([0.9, 0.2, 0.7, 0.1, 0.6, 0.3])
    assert fit_scaling(np.array([1, 1, 1, -1, 1, 1]), p, "binary") == (1.0, 0.0)
    t1 = fit_scaling(np.array([1, 0, 0, 1, 1, 0, -1]), np.r_[p, 0.99], "binary")
    t2 = fit_scaling(np.array([1, 0, 0, 1, 1, 0]), p, "binary")
    assert t1 == pytest.approx(t2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_conformal_coverage_within_003_on_500_plus_test_images(seed):
    rng = np.random.default_rng(seed)
    val, yv = _world(1000, rng, sharpen=1.5)
    test, yt = _world(600, rng, sharpen=1.5)
    sets = fit_conformal(HEADS, yv, val, alpha={"urgency": 0.1, "risk": 0.2, "signs": 0.1})
    assert sets["risk"]["alpha"] == 0.2 and len(sets["signs"]["qhat"]) == 2
    for h in HEADS:
        cov = coverage(h, sets[h.name], yt[h.name], test[:, h.cols])
        assert abs(cov["coverage"] - cov["target"]) <= 0.03, (h.name, cov)
        assert 0 < cov["abstention"] < 1
    risk = coverage(HEADS[1], sets["risk"], yt["risk"], test[:, 1:4])
    assert risk["mean_set_size"] < 3


def test_conformal_quantile_rule():
    scores = np.arange(1, 10) / 10  # n = 9
    assert conformal_quantile(scores, 0.1) == pytest.approx(0.9)  # k = ceil(10 * 0.9) = 9
    assert conformal_quantile(scores[:8], 0.1) == float("inf")  # k = ceil(8.1) = 9 > n
    # n = 9, alpha = 0.2: k = ceil(10 * 0.8) = 8 -> the 8th smallest
    assert conformal_quantile(scores, 0.2) == pytest.approx(0.8)
    with pytest.raises(ConfigError, match="alpha"):
        conformal_quantile(scores, 1.5)


def _cluster(n: int, centres: np.ndarray, rng: np.random.Generator, spread: float = 0.15):
    idx = rng.integers(0, len(centres), n)
    return centres[idx] + spread * rng.normal(size=(n, centres.shape[1]))


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
def test_ood_gate_false_reject_rate_and_separation(tmp_path, method):
    from medsig.metrics.classification import roc_auc

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    gate = fit_ood(_cluster(800, centres, rng), _cluster(400, centres, rng), false_reject=0.05,
                   method=method)
    fresh = gate.score(_cluster(2000, centres, rng))
    assert abs(gate.flag(fresh).mean() - 0.05) < 0.03
    other = rng.normal(size=(300, 32))
    auroc = roc_auc(np.r_[np.zeros(2000), np.ones(300)], np.r_[fresh, gate.score(other)])
    assert auroc > 0.95
    gate.save(tmp_path / "ood.safetensors")
    again = OodGate.load(tmp_path / "ood.safetensors")
    assert again.threshold == gate.threshold and again.method == method
    assert np.allclose(again.score(other), gate.score(other), rtol=1e-5)
    with pytest.raises(ConfigError, match="dimension"):
        gate.score(np.ones((2, 8)))
    with pytest.raises(ConfigError, match="false-reject"):
        fit_ood(other, other, false_reject=0)
