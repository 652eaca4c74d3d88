"""Probes on frozen image embeddings: logistic regression or a small MLP, in seconds on a CPU.

The encoder embeds every image once; the probe is fitted on train (MISSING entries masked),
its regularisation chosen on val, thresholds tuned on val like the classifier. Output:
``probe.safetensors`` (a ``ProbeNet``: standardisation + linear / MLP, loadable in torch),
``probe.joblib`` for the logistic probe (scikit-learn estimators per head), ``medsig.json``
and a model card. ``load_predictor(OUT)`` serves it.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medsig.errors import ConfigError
from medsig.models.predictor import PROBE_WEIGHTS, ProbeNet, head_probabilities
from medsig.train.classify import Head, build_heads
from medsig.train.config import TrainConfig, load_config


def _targets(collection: Any, h: Head) -> np.ndarray:
    """(n, size) targets: 0/1 per output (-1 missing); multiclass: class index column."""
    t = collection.labels[h.name].targets
    if h.kind == "binary":
        return t.astype(np.float32)[:, None]
    if h.kind == "multilabel":
        return t.astype(np.float32)
    return t.astype(np.int64)[:, None]


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    ok = y >= 0
    if len(set(y[ok].tolist())) < 2:
        return None
    return float(roc_auc_score(y[ok], p[ok]))


def _onehot(h: Head, t: np.ndarray) -> np.ndarray:
    if h.kind != "multiclass":
        return t
    out = np.full((len(t), h.size), -1.0, np.float32)
    ok = t[:, 0] >= 0
    out[ok] = 0
    out[np.nonzero(ok)[0], t[ok, 0]] = 1
    return out


def head_aucs(heads: list[Head], collection: Any, probs: np.ndarray) -> dict[str, float]:
    """Mean one-vs-rest AUC per head and their macro average (NaN-free keys only)."""
    out: dict[str, float] = {}
    for h in heads:
        y = _onehot(h, _targets(collection, h))
        aucs = [a for a in (_auc(y[:, j], probs[:, h.offset + j]) for j in range(h.size))
                if a is not None]
        if aucs:
            out[f"val/auc/{h.name}"] = float(np.mean(aucs))
    if out:
        out["val/macro_auc"] = float(np.mean(list(out.values())))
    return out


# -- logistic --------------------------------------------------------------------------------
def _fit_logistic_head(h: Head, x: np.ndarray, t: np.ndarray, xv: np.ndarray,
                       tv: np.ndarray, grid: list[float], seed: int
                       ) -> tuple[np.ndarray, np.ndarray, list[Any], float]:
    """(W (size, d), b (size,), estimators, C) for one head on standardised features."""
    from sklearn.linear_model import LogisticRegression

    d = x.shape[1]
    w, b = np.zeros((h.size, d), np.float32), np.zeros(h.size, np.float32)
    columns = [0] if h.kind == "multiclass" else list(range(h.size))
    best_c, estimators = grid[0], []
    for j in columns:
        ok, okv = t[:, j] >= 0, tv[:, j] >= 0
        y, yv = t[ok, j].astype(int), tv[okv, j].astype(int)
        present = sorted(set(y.tolist()))
        if len(present) < 2:  # one class in train: a constant at its rate
            rate = float(np.clip(np.mean(y) if len(y) else 0.5, 1e-3, 1 - 1e-3))
            if h.kind == "multiclass":
                b[:] = -20.0
                if present:
                    b[present[0]] = 0.0
            else:
                b[j] = np.log(rate / (1 - rate))
            estimators.append(None)
            continue
        scores = []
        for c in grid:
            est = LogisticRegression(C=c, max_iter=2000, random_state=seed)
            est.fit(x[ok], y)
            scores.append(_val_score(est, xv[okv], yv))
        best_c = grid[int(np.nanargmax(scores))] if not np.all(np.isnan(scores)) else 1.0
        est = LogisticRegression(C=best_c, max_iter=2000, random_state=seed).fit(x[ok], y)
        estimators.append(est)
        if h.kind == "multiclass":
            b[:] = -20.0
            if len(est.classes_) == 2:  # sklearn keeps one row for two classes
                w[est.classes_[1]], b[est.classes_[1]] = est.coef_[0], est.intercept_[0]
                b[est.classes_[0]] = 0.0
            else:
                w[est.classes_], b[est.classes_] = est.coef_, est.intercept_
        else:
            w[j], b[j] = est.coef_[0], est.intercept_[0]
    return w, b, estimators, best_c


def _val_score(est: Any, xv: np.ndarray, yv: np.ndarray) -> float:
    from sklearn.metrics import log_loss

    if len(yv) == 0:
        return float("nan")
    p = est.predict_proba(xv)
    return -float(log_loss(yv, p, labels=est.classes_))


# -- MLP ---------------------------------------------------------------------------------------
def _fit_mlp(heads: list[Head], x: np.ndarray, targets: list[np.ndarray], xv: np.ndarray,
             targets_v: list[np.ndarray], cfg: TrainConfig) -> tuple[ProbeNet, int]:
    torch.manual_seed(cfg.seed)
    p = cfg.probe
    k = sum(h.size for h in heads)
    net = ProbeNet(x.shape[1], k, p.hidden, p.dropout)
    opt = torch.optim.AdamW(net.parameters(), lr=p.lr, weight_decay=p.l2)
    xt, xvt = torch.as_tensor(x), torch.as_tensor(xv)
    tt = [torch.as_tensor(t) for t in targets]
    tvt = [torch.as_tensor(t) for t in targets_v]
    pos_w = [_pos_weight(t) if h.kind != "multiclass" else None for h, t in zip(heads, tt)]
    best, best_state, best_epoch = float("inf"), None, 0
    for epoch in range(p.epochs):
        net.train()
        opt.zero_grad()
        _mlp_loss(net(xt), heads, tt, pos_w).backward()
        opt.step()
        net.eval()
        with torch.no_grad():
            val = float(_mlp_loss(net(xvt), heads, tvt, pos_w))
        if val < best - 1e-6:
            best, best_epoch = val, epoch + 1
            best_state = {n: v.clone() for n, v in net.state_dict().items()}
    if best_state is not None:
        net.load_state_dict(best_state)
    return net.eval(), best_epoch


def _pos_weight(t: torch.Tensor) -> torch.Tensor:
    valid = t >= 0
    pos = ((t == 1) & valid).sum(0).float()
    neg = ((t == 0) & valid).sum(0).float()
    return torch.where(pos > 0, neg / pos.clamp(min=1), torch.ones_like(pos))


def _mlp_loss(logits: torch.Tensor, heads: list[Head], targets: list[torch.Tensor],
              pos_w: list[torch.Tensor | None]) -> torch.Tensor:
    total = logits.new_zeros(())
    for h, t, pw in zip(heads, targets, pos_w):
        z = logits[:, h.offset:h.offset + h.size]
        if h.kind == "multiclass":
            y = t[:, 0]
            if (y >= 0).any():
                total = total + F.cross_entropy(z, y, ignore_index=-1)
            continue
        mask = t >= 0
        if mask.any():
            raw = F.binary_cross_entropy_with_logits(z, t.clamp(min=0), pos_weight=pw,
                                                     reduction="none")
            total = total + (raw * mask).sum() / mask.sum()
    return total


# -- entry point -------------------------------------------------------------------------------
def train_probe(config: TrainConfig | dict | str | Path, model: str | Path | None = None,
                out: str | Path | None = None, **overrides: Any) -> Path:
    """Fit a probe; ``train_probe(cfg)`` or ``train_probe(spec, model, out, probe={...})``."""
    from medsig.train.data import check_labels

    if model is not None or out is not None:
        raw = {"spec": str(config), "model": str(model), "out": str(out),
               "objective": "probe", **overrides}
        cfg = load_config(raw)
    else:
        cfg = load_config(config, {"objective": "probe", **overrides} if overrides else None)
    started = time.perf_counter()
    out_dir = Path(cfg.out)
    if (out_dir / "medsig.json").exists():
        raise ConfigError("the output folder already holds a model; choose another 'out'",
                          file=out_dir)
    collection, split_note = _with_split(cfg)
    labels = check_labels(collection, cfg.labels, cfg.spec)
    heads = build_heads(collection, labels)
    emb, kept, skipped, encoder = _embed(cfg, collection)
    split = np.asarray(collection.split)[kept]
    train_rows, val_rows = kept[split == "train"], kept[split == "val"]
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise ConfigError("the probe needs images in both the train and val splits",
                          file=cfg.spec)
    pos = {r: i for i, r in enumerate(kept.tolist())}
    x = emb[[pos[r] for r in train_rows]]
    xv = emb[[pos[r] for r in val_rows]]
    train, val = collection.subset(train_rows), collection.subset(val_rows)
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs, xvs = (x - mean) / std, (xv - mean) / std
    targets = [_targets(train, h) for h in heads]
    targets_v = [_targets(val, h) for h in heads]
    info: dict[str, Any] = {"kind": cfg.probe.kind, "dim": int(x.shape[1]),
                            "outputs": sum(h.size for h in heads)}
    if cfg.probe.kind == "mlp":
        net, epoch = _fit_mlp(heads, xs.astype(np.float32), targets, xvs.astype(np.float32),
                              targets_v, cfg)
        info.update(hidden=cfg.probe.hidden, dropout=cfg.probe.dropout, best_epoch=epoch)
        estimators = None
    else:
        net, estimators, chosen = _fit_logistic(heads, xs, targets, xvs, targets_v, cfg)
        info["C"] = chosen
    net.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
    net.std.copy_(torch.as_tensor(std, dtype=torch.float32))
    with torch.no_grad():
        probs_v = head_probabilities(net(torch.as_tensor(xv, dtype=torch.float32)),
                                     [_as_dict(h) for h in heads]).numpy()
    head_info = _thresholds(heads, val, probs_v, cfg.eval.thresholds)
    metrics = head_aucs(heads, val, probs_v)
    _save(cfg, out_dir, net, estimators, mean, std, info, head_info, metrics, collection,
          encoder, time.perf_counter() - started, skipped, split_note,
          {"train": len(train_rows), "val": len(val_rows)})
    return out_dir


def _as_dict(h: Head) -> dict[str, Any]:
    return {"name": h.name, "kind": h.kind, "classes": h.classes, "offset": h.offset,
            "size": h.size}


def _with_split(cfg: TrainConfig) -> tuple[Any, str | None]:
    from medsig.data.collection import load_collection
    from medsig.data.split import split_collection

    collection = load_collection(cfg.spec)
    if collection.split is not None:
        return collection, None
    result = split_collection(collection, seed=cfg.seed)
    return collection.with_split(result.split), (
        f"no split in the spec: group-wise stratified split made with seed {cfg.seed}")


def _embed(cfg: TrainConfig, collection: Any) -> tuple[np.ndarray, np.ndarray, dict, Any]:
    from medsig.index.runner import embed_arrays
    from medsig.models.encoder import Encoder

    device = None if cfg.device == "auto" else cfg.device
    encoder = Encoder.load(cfg.model, device=device, preprocess=cfg.preprocess)
    split = np.asarray(collection.split)
    rows = np.nonzero(np.isin(split, ["train", "val"]))[0]
    emb, _, kept, skipped = embed_arrays(encoder, collection.subset(rows),
                                         batch_size=cfg.optim.batch_size, texts=False,
                                         num_workers=cfg.num_workers)
    return emb.astype(np.float32), rows[kept], dict(skipped), encoder


def _fit_logistic(heads: list[Head], xs: np.ndarray, targets: list[np.ndarray],
                  xvs: np.ndarray, targets_v: list[np.ndarray], cfg: TrainConfig
                  ) -> tuple[ProbeNet, dict[str, list[Any]], dict[str, float]]:
    k = sum(h.size for h in heads)
    net = ProbeNet(xs.shape[1], k)
    weight, bias = np.zeros((k, xs.shape[1]), np.float32), np.zeros(k, np.float32)
    estimators, chosen = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on tiny val sets
        for h, t, tv in zip(heads, targets, targets_v):
            w, b, est, c = _fit_logistic_head(h, xs, t, xvs, tv, list(cfg.probe.C), cfg.seed)
            weight[h.offset:h.offset + h.size], bias[h.offset:h.offset + h.size] = w, b
            estimators[h.name], chosen[h.name] = est, c
    with torch.no_grad():
        net.net[0].weight.copy_(torch.as_tensor(weight))
        net.net[0].bias.copy_(torch.as_tensor(bias))
    return net, estimators, chosen


def _thresholds(heads: list[Head], val: Any, probs: np.ndarray, rule: Any
                ) -> list[dict[str, Any]]:
    from medsig.evaluate.thresholds import choose_thresholds, rule_names

    out = []
    for h in heads:
        entry = {**_as_dict(h), "thresholds": [], "threshold_rule": "argmax"}
        if h.kind != "multiclass":
            y = _targets(val, h)
            names = [h.name] * h.size
            label_rule = {h.name: rule[h.name]} if isinstance(rule, dict) and h.name in rule \
                else ("youden" if isinstance(rule, dict) else rule)
            entry["thresholds"] = [float(v) for v in choose_thresholds(
                y, probs[:, h.offset:h.offset + h.size], label_rule, names)]
            entry["threshold_rule"] = rule_names(label_rule, [h.name])[0]
        out.append(entry)
    return out


def _save(cfg: TrainConfig, out: Path, net: ProbeNet, estimators: Any, mean: np.ndarray,
          std: np.ndarray, info: dict, heads: list[dict], metrics: dict, collection: Any,
          encoder: Any, seconds: float, skipped: dict, split_note: str | None,
          counts: dict[str, int]) -> None:
    from safetensors.torch import save_file

    from medsig import __version__
    from medsig.train.card import write_card
    from medsig.train.data import spec_fingerprint, split_fingerprint

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / PROBE_WEIGHTS))
    if estimators is not None:
        import joblib

        joblib.dump({"mean": mean, "std": std, "heads": heads, "estimators": estimators},
                    out / "probe.joblib")
    base = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
    spec = collection.spec
    meta = {
        "medsig_version": __version__, "objective": "probe", "base_model": base,
        "encoder": base, "preprocess": cfg.preprocess, "image_size": encoder.image_size,
        "spec": {"name": spec.name, "path": str(spec.path),
                 "fingerprint": spec_fingerprint(collection)},
        "split": {"fingerprint": split_fingerprint(collection), "counts": counts,
                  "note": split_note},
        "labels": [h["name"] for h in heads], "heads": heads, "prompts": {}, "probe": info,
        "config": cfg.to_dict(), "metrics": {"val": metrics},
        "training": {"seconds": round(seconds, 2), "skipped_images": skipped,
                     "device": str(encoder.device)},
    }
    (out / "medsig.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    write_card(out, meta)
