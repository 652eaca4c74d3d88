"""Probes on frozen image embeddings: logistic regression or a small MLP, in seconds on a CPU.

The encoder embeds every image once; the probe is fitted on train (MISSING entries masked),
its regularisation chosen on val, thresholds tuned on val like the classifier. Output:
``probe.safetensors`` (a ``ProbeNet``: standardisation + linear / MLP, loadable in torch),
``probe.joblib`` for the logistic probe (scikit-learn estimators per head), ``medsig.json``
and a model card. ``load_predictor(OUT)`` serves it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medsig.errors import ConfigError
from medsig.models.heads import Head, head_probabilities
from medsig.models.predictor import PROBE_WEIGHTS, ProbeNet
from medsig.train.classify import build_heads, output_aucs
from medsig.train.config import TrainConfig, load_config
from medsig.train.losses import pos_weight_from_targets


def _targets(collection: Any, h: Head) -> np.ndarray:
    """(n, size) targets: 0/1 per output (-1 missing); multiclass: class index column."""
    t = collection.labels[h.name].targets
    if h.kind == "binary":
        return t.astype(np.float32)[:, None]
    if h.kind == "multilabel":
        return t.astype(np.float32)
    return t.astype(np.int64)[:, None]


def head_aucs(heads: list[Head], collection: Any, probs: np.ndarray) -> dict[str, float]:
    """Mean one-vs-rest AUC per head and their macro average (NaN-free keys only)."""
    out: dict[str, float] = {}
    for h in heads:
        aucs = output_aucs(h, h.onehot(collection.labels[h.name].targets), probs)
        if aucs:
            out[f"val/auc/{h.name}"] = float(np.mean(aucs))
    if out:
        out["val/macro_auc"] = float(np.mean(list(out.values())))
    return out


# -- logistic --------------------------------------------------------------------------------
def _fit_linear(heads: list[Head], x: torch.Tensor, targets: list[torch.Tensor], c: float,
                init: ProbeNet | None = None) -> ProbeNet:
    """Every head's logistic regression at once: L-BFGS on the masked mean loss + L2 / (2Cn).

    The objective is separable across outputs, so one joint fit per C gives each head the
    same solution as its own fit (what scikit-learn would solve one output at a time).
    """
    k = sum(h.size for h in heads)
    net = ProbeNet(x.shape[1], k)
    if init is not None:
        net.load_state_dict(init.state_dict())
    layer = net.net[0]
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=200, tolerance_grad=1e-6,
                            history_size=20, line_search_fn="strong_wolfe")
    penalty = 1.0 / (2.0 * c * len(x))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _head_losses(layer(x), heads, targets, None).sum() \
            + penalty * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return net.eval()


def _head_losses(logits: torch.Tensor, heads: list[Head], targets: list[torch.Tensor],
                 pos_w: list[torch.Tensor | None] | None) -> torch.Tensor:
    """(H,) loss per head: masked mean BCE per output (summed) or cross-entropy."""
    out = []
    for i, (h, t) in enumerate(zip(heads, targets)):
        z = logits[:, h.offset:h.offset + h.size]
        if h.kind == "multiclass":
            y = t[:, 0]
            out.append(F.cross_entropy(z, y, ignore_index=-1) if (y >= 0).any()
                       else z.sum() * 0)
            continue
        mask = (t >= 0).float()
        pw = pos_w[i] if pos_w is not None else None
        raw = F.binary_cross_entropy_with_logits(z, t.clamp(min=0), pos_weight=pw,
                                                 reduction="none")
        out.append(((raw * mask).sum(0) / mask.sum(0).clamp(min=1)).sum())
    return torch.stack(out)


def _fit_logistic(heads: list[Head], xs: np.ndarray, targets: list[np.ndarray],
                  xvs: np.ndarray, targets_v: list[np.ndarray], cfg: TrainConfig
                  ) -> tuple[ProbeNet, dict[str, Any], dict[str, float]]:
    """Logistic probes with C chosen per head by val loss; sklearn twins for probe.joblib."""
    torch.manual_seed(cfg.seed)
    x, xv = torch.as_tensor(xs, dtype=torch.float32), torch.as_tensor(xvs, dtype=torch.float32)
    tt = [torch.as_tensor(t) for t in targets]
    tv = [torch.as_tensor(t) for t in targets_v]
    fits, val_losses, previous = [], [], None
    for c in sorted(cfg.probe.C):  # strong → weak regularisation, warm-started
        previous = _fit_linear(heads, x, tt, float(c), previous)
        fits.append(previous)
        with torch.no_grad():
            val_losses.append(_head_losses(previous(xv), heads, tv, None))
    losses = torch.stack(val_losses)  # (grid, heads)
    best = losses.argmin(dim=0).tolist()
    grid = sorted(cfg.probe.C)
    net = ProbeNet(xs.shape[1], sum(h.size for h in heads))
    with torch.no_grad():
        for h, j in zip(heads, best):
            cols = slice(h.offset, h.offset + h.size)
            net.net[0].weight[cols] = fits[j].net[0].weight[cols]
            net.net[0].bias[cols] = fits[j].net[0].bias[cols]
    chosen = {h.name: float(grid[j]) for h, j in zip(heads, best)}
    return net.eval(), _sklearn_twins(heads, net), chosen


def _sklearn_twins(heads: list[Head], net: ProbeNet) -> dict[str, Any]:
    """scikit-learn LogisticRegression objects with the fitted coefficients (standardised x)."""
    from sklearn.linear_model import LogisticRegression

    w = net.net[0].weight.detach().numpy().astype(np.float64)
    b = net.net[0].bias.detach().numpy().astype(np.float64)
    out: dict[str, Any] = {}
    for h in heads:
        cols = slice(h.offset, h.offset + h.size)
        if h.kind == "multiclass":
            est = LogisticRegression()
            est.classes_ = np.arange(h.size)
            est.coef_, est.intercept_ = w[cols].copy(), b[cols].copy()
            out[h.name] = [est]
            continue
        ests = []
        for j in range(h.size):
            est = LogisticRegression()
            est.classes_ = np.array([0, 1])
            est.coef_ = w[h.offset + j][None].copy()
            est.intercept_ = b[h.offset + j:h.offset + j + 1].copy()
            ests.append(est)
        out[h.name] = ests
    return out


# -- MLP ---------------------------------------------------------------------------------------
def _fit_mlp(heads: list[Head], x: np.ndarray, targets: list[np.ndarray], xv: np.ndarray,
             targets_v: list[np.ndarray], cfg: TrainConfig) -> tuple[ProbeNet, int]:
    torch.manual_seed(cfg.seed)
    p = cfg.probe
    k = sum(h.size for h in heads)
    net = ProbeNet(x.shape[1], k, p.hidden, p.mlp_dropout)
    opt = torch.optim.AdamW(net.parameters(), lr=p.mlp_lr, weight_decay=p.l2)
    xt, xvt = torch.as_tensor(x), torch.as_tensor(xv)
    tt = [torch.as_tensor(t) for t in targets]
    tvt = [torch.as_tensor(t) for t in targets_v]
    pos_w = [pos_weight_from_targets(t) if h.kind != "multiclass" else None
             for h, t in zip(heads, tt)]
    best, best_state, best_epoch = float("inf"), None, 0
    for epoch in range(p.mlp_epochs):
        net.train()
        opt.zero_grad()
        _head_losses(net(xt), heads, tt, pos_w).sum().backward()
        opt.step()
        net.eval()
        with torch.no_grad():
            val = float(_head_losses(net(xvt), heads, tvt, pos_w).sum())
        if val < best - 1e-6:
            best, best_epoch = val, epoch + 1
            best_state = {n: v.clone() for n, v in net.state_dict().items()}
    if best_state is not None:
        net.load_state_dict(best_state)
    return net.eval(), best_epoch


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
        info.update(hidden=cfg.probe.hidden, dropout=cfg.probe.mlp_dropout, best_epoch=epoch)
        estimators = None
    else:
        net, estimators, chosen = _fit_logistic(heads, xs, targets, xvs, targets_v, cfg)
        info["C"] = chosen
    net.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
    net.std.copy_(torch.as_tensor(std, dtype=torch.float32))
    with torch.no_grad():
        probs_v = head_probabilities(net(torch.as_tensor(xv, dtype=torch.float32)),
                                     heads).numpy()
    head_info = _thresholds(heads, val, probs_v, cfg.eval.thresholds)
    metrics = head_aucs(heads, val, probs_v)
    _save(cfg, out_dir, net, estimators, mean, std, info, head_info, metrics, collection,
          encoder, time.perf_counter() - started, skipped, split_note,
          {"train": len(train_rows), "val": len(val_rows)})
    if cfg.eval.safe_outputs:  # temperatures, conformal sets, OOD gate (medsig.train.safety)
        from medsig.train.safety import fit_safety

        fit_safety(out_dir, cfg.spec, cfg.eval.alpha, cfg.eval.ood_false_reject, cfg.seed,
                   cfg.optim.batch_size, None if cfg.device == "auto" else cfg.device)
    return out_dir


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
    from medsig.models.embedding import embed_arrays
    from medsig.models.encoder import Encoder

    device = None if cfg.device == "auto" else cfg.device
    encoder = Encoder.load(cfg.model, device=device, preprocess=cfg.preprocess,
                           max_num_patches=cfg.max_num_patches)
    split = np.asarray(collection.split)
    rows = np.nonzero(np.isin(split, ["train", "val"]))[0]
    emb, _, kept, skipped = embed_arrays(encoder, collection.subset(rows),
                                         batch_size=cfg.optim.batch_size, texts=False,
                                         num_workers=cfg.num_workers)
    return emb.astype(np.float32), rows[kept], dict(skipped), encoder


def _thresholds(heads: list[Head], val: Any, probs: np.ndarray, rule: Any) -> list[Head]:
    from medsig.models.thresholds import head_thresholds

    targets = [h.onehot(val.labels[h.name].targets) for h in heads]
    return head_thresholds(heads, targets, probs, rule)


def _save(cfg: TrainConfig, out: Path, net: ProbeNet, estimators: Any, mean: np.ndarray,
          std: np.ndarray, info: dict, heads: list[Head], metrics: dict, collection: Any,
          encoder: Any, seconds: float, skipped: dict, split_note: str | None,
          counts: dict[str, int]) -> None:
    from safetensors.torch import save_file

    from medsig.models.artifact import reference
    from medsig.train.output import build_artifact, write_outputs

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / PROBE_WEIGHTS))
    if estimators is not None:
        import joblib

        joblib.dump({"mean": mean, "std": std, "heads": [h.to_dict() for h in heads],
                     "estimators": estimators},
                    out / "probe.joblib")
    training = {"seconds": round(seconds, 2), "skipped_images": skipped,
                "device": str(encoder.device)}
    write_outputs(out, build_artifact(cfg, out, collection, counts, heads, encoder.preprocess,
                                      metrics={"val": metrics}, training=training, probe=info,
                                      split_note=split_note,
                                      encoder=reference(cfg.model, out)))
