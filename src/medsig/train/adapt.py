"""What to train: full fine-tune, LoRA (peft), the last layers of each tower, locked towers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medsig.errors import ConfigError
from medsig.models.artifact import save_model
from medsig.train.config import AdaptConfig
from medsig.train.distributed import shard_like, whole

TEXT_MARKERS = ("text_model", "text_projection")
IMAGE_MARKERS = ("vision_model", "visual_projection", "vision_tower")
SCALE_NAMES = ("logit_scale", "logit_bias")


@dataclass
class AdaptReport:
    method: str
    trainable: int
    total: int
    per_tower: dict[str, tuple[int, int]] = field(default_factory=dict)  # tower -> (train, all)

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        towers = ", ".join(f"{k} {_human(t)}/{_human(n)}" for k, (t, n) in self.per_tower.items())
        return (f"{self.method}: trainable {_human(self.trainable)} / {_human(self.total)} "
                f"parameters ({pct:.2f}%)" + (f" [{towers}]" if towers else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "trainable": self.trainable, "total": self.total,
                "per_tower": {k: list(v) for k, v in self.per_tower.items()}}


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def tower_of(name: str) -> str | None:
    """'text', 'image' or None (logit scale, classifier) for a parameter name."""
    if any(m in name for m in TEXT_MARKERS):
        return "text"
    if any(m in name for m in IMAGE_MARKERS):
        return "image"
    return None


def layer_lists(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Each tower's encoder layer list: {tower: (module name, number of layers)}."""
    found: dict[str, tuple[str, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith(("encoder.layers", "encoder.layer")):
            tower = tower_of(name) or "image"
            if tower not in found:
                found[tower] = (name, len(module))
    return found


def count(model: nn.Module) -> AdaptReport:
    per: dict[str, list[int]] = {}
    trainable = total = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
        slot = per.setdefault(tower_of(name) or "other", [0, 0])
        slot[0] += n if p.requires_grad else 0
        slot[1] += n
    return AdaptReport("", trainable, total, {k: (v[0], v[1]) for k, v in per.items()})


def _unfreeze_last(model: nn.Module, cfg: AdaptConfig) -> None:
    """Freeze each tower up to its last N (or last X%) encoder layers; keep later parts."""
    lists = layer_lists(model)
    if not lists:
        raise ConfigError("adapt.method 'partial': no encoder layer list found in the model "
                          "(expected vision_model.encoder.layers / text_model.encoder.layers)")
    names = [n for n, _ in model.named_parameters()]
    frozen: set[str] = set()
    for layers_name, n_layers in lists.values():
        if cfg.unfreeze_last_n_layers is not None:
            keep = min(cfg.unfreeze_last_n_layers, n_layers)
        else:
            keep = math.ceil(float(cfg.unfreeze_fraction or 0) * n_layers)
        root = layers_name.rsplit(".encoder.", 1)[0] + "."
        prefix = layers_name + "."
        boundary = f"{prefix}{n_layers - keep}." if keep > 0 else None
        seen_layers = False
        # parameters are registered in forward order: freeze the tower up to its first kept
        # layer (embeddings, pre-norm, early layers); everything after stays trainable
        for n in (n for n in names if n.startswith(root)):
            if boundary is not None and n.startswith(boundary):
                break
            if boundary is None and seen_layers and not n.startswith(prefix):
                break
            seen_layers = seen_layers or n.startswith(prefix)
            frozen.add(n)
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)


def _lora(model: nn.Module, cfg: AdaptConfig, modules_to_save: list[str] | None) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules), bias="none",
                          modules_to_save=modules_to_save)
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as exc:
        raise ConfigError(f"adapt.lora.target_modules {lora.target_modules}: "
                          f"{str(exc).splitlines()[0]}") from None


def adapt_model(model: nn.Module, cfg: AdaptConfig, *, head_modules: list[str] | None = None
                ) -> tuple[nn.Module, AdaptReport]:
    """Set `requires_grad` per the config. LoRA returns a peft wrapper (the base model is
    modified in place, so code holding the base model trains the adapter too)."""
    out = model
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif cfg.method == "partial":
        _unfreeze_last(model, cfg)
    else:
        out = _lora(model, cfg, head_modules)
    if cfg.lock_text or cfg.lock_image:
        locked = "text" if cfg.lock_text else "image"
        for n, p in out.named_parameters():
            if tower_of(n) == locked:
                p.requires_grad_(False)
    report = count(out)
    if report.trainable == 0:
        raise ConfigError(f"adapt: the settings leave no trainable parameter ({cfg.method}, "
                          f"lock_text={cfg.lock_text}, lock_image={cfg.lock_image})")
    report.method = cfg.method
    return out, report


def is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def export_model(model: nn.Module, out_dir: str | Path, *, merge: bool = True,
                 base_name: str | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """save_pretrained the model into out_dir; LoRA merged into the weights (default) or
    kept as a peft adapter (`adapter_config.json`). Returns the saved module.
    ``state_dict``: the model's whole weights when its parameters are FSDP shards
    (`full_state_dict`, gathered by every process)."""
    out_dir = Path(out_dir)
    if state_dict is not None:
        save_model(model, out_dir, state_dict=state_dict)
        return model
    if is_peft(model):
        if merge:
            model = model.merge_and_unload()
        else:
            if base_name is not None:
                model.peft_config["default"].base_model_name_or_path = base_name
            save_model(model, out_dir)
            return model
    save_model(model, out_dir)
    return model


def trainable_state(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The trainable parameters (what a checkpoint must keep), whole, detached on CPU. FSDP
    shards are gathered: then every process calls it, and only the main one need `keep`."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = whole(p.detach())
            if keep:
                out[name] = t.cpu().clone()
    return out


def full_state_dict(model: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """The whole state dict of a model with FSDP-sharded parameters, on CPU; every process
    calls it (one gather per tensor), only the main one need `keep` it."""
    out = {}
    for name, t in model.state_dict().items():
        t = whole(t.detach())
        if keep:
            out[name] = t.cpu().clone()
    return out


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ConfigError(f"checkpoint does not match the model (e.g. '{missing[0]}'); was it "
                          "written with another adapt / model setting?")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(shard_like(t.to(params[n].dtype), params[n]))
