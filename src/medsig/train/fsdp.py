"""Fully sharded data parallel training (PyTorch FSDP2 ``fully_shard``) from an accelerate
FSDP config: parameters, gradients and AdamW state are split across the processes.

`accelerate launch --config_file fsdp.yaml` (``distributed_type: FSDP``) sets
``ACCELERATE_USE_FSDP`` and the ``FSDP_*`` settings; accelerate's own parser
(``FullyShardedDataParallelPlugin``) reads them here, on GPUs and on CPU (where accelerate
itself falls back to plain multi-CPU data parallelism). medsig then shards the model itself,
the same way on every device (docs/scaling.md, "FSDP"):

- one FSDP unit per layer class (``fsdp_transformer_layer_cls_to_wrap``, by default the
  model's ``_no_split_modules``, e.g. SiglipEncoderLayer / CLIPEncoderLayer), one per tower
  and projection (each direct sub-module of the model), and the trained module as the root;
- the model's own parameters (logit scale and bias, used by the loss outside any forward)
  are replicated, not sharded: their gradients are averaged by `sync_replicated`;
- the optimizer is created after sharding (over the sharded parameters);
- checkpoints and the saved model hold whole tensors, gathered on the main process
  (``medsig.train.distributed.whole`` / ``shard_like``): the same files as without FSDP.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from medsig.errors import ConfigError
from medsig.train.config import TrainConfig
from medsig.train.distributed import world

POLICIES = {"transformer_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "size_based_auto_wrap_policy": "SIZE_BASED_WRAP"}


@dataclass(frozen=True)
class FsdpSettings:
    """What medsig takes from an accelerate FSDP config."""

    wrap: str  # TRANSFORMER_BASED_WRAP or NO_WRAP
    layer_classes: tuple[str, ...] | None  # None: the model's _no_split_modules
    reshard_after_forward: bool  # true: FULL_SHARD (ZeRO-3), false: SHARD_GRAD_OP (ZeRO-2)
    offload: Any  # torch's OffloadPolicy (CPUOffloadPolicy with fsdp_offload_params: true)
    activation_checkpointing: bool


def fsdp_requested(accelerator: Any) -> bool:
    """An FSDP launch: accelerate's distributed type, or its environment variable (on CPU
    accelerate reports MULTI_CPU even under an FSDP config)."""
    return (accelerator.distributed_type.value == "FSDP"
            or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes"))


def fsdp_settings(accelerator: Any) -> FsdpSettings | None:
    """The FSDP settings of this launch (None without FSDP); ConfigError for settings medsig
    does not support, naming the accelerate config key."""
    if not fsdp_requested(accelerator):
        return None
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        from accelerate.utils import FullyShardedDataParallelPlugin

        try:
            plugin = FullyShardedDataParallelPlugin()
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"accelerate FSDP config: {str(exc).splitlines()[0]}") from None
    if int(plugin.fsdp_version) != 2:
        raise ConfigError("accelerate FSDP config: medsig shards with FSDP2 (fully_shard); "
                          "set 'fsdp_version: 2' (see configs/accelerate/fsdp.yaml)")
    kind = str(getattr(plugin.state_dict_type, "name", plugin.state_dict_type))
    if not kind.endswith("FULL_STATE_DICT"):
        raise ConfigError(f"accelerate FSDP config: fsdp_state_dict_type '{kind}' - medsig "
                          "writes whole (FULL_STATE_DICT) checkpoints and model folders that "
                          "load in plain transformers; set 'fsdp_state_dict_type: "
                          "FULL_STATE_DICT'")
    if plugin.cpu_ram_efficient_loading:
        raise ConfigError("accelerate FSDP config: set 'fsdp_cpu_ram_efficient_loading: "
                          "false' - every medsig process loads the whole model, then shards it")
    policy = plugin.auto_wrap_policy
    wrap = "NO_WRAP" if policy is None else POLICIES.get(getattr(policy, "__name__", ""), "?")
    if wrap not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP"):
        raise ConfigError("accelerate FSDP config: fsdp_auto_wrap_policy must be "
                          "TRANSFORMER_BASED_WRAP (one unit per encoder layer) or NO_WRAP")
    names = plugin.transformer_cls_names_to_wrap
    return FsdpSettings(wrap, tuple(n.strip() for n in names if n.strip()) if names else None,
                        bool(plugin.reshard_after_forward), plugin.cpu_offload,
                        bool(plugin.activation_checkpointing))


def check_supported(cfg: TrainConfig, precision: str) -> None:
    """What FSDP does not run in medsig: ConfigError naming the setting and the way out.
    ``precision``: the run's resolved mixed precision (accelerate's: no | bf16 | fp16)."""
    if cfg.adapt.method == "lora":
        raise ConfigError("adapt.method 'lora' is not supported under FSDP (the adapter is "
                          "merged or saved through peft, which reads whole weights); LoRA "
                          "fits one GPU - launch it with DDP (--multi_gpu)")
    if cfg.optim.gradcache:
        raise ConfigError("optim.gradcache is not supported under FSDP (its re-encode passes "
                          "would all-gather every layer twice per micro-batch): use "
                          "optim.grad_accum with FSDP, or gradient caching under DDP")
    if str(precision) == "fp16":
        how = "" if cfg.precision == "fp16" else f" ('{cfg.precision}' chose it: no bf16 here)"
        raise ConfigError(f"precision fp16{how} is not supported under FSDP (its loss scaler "
                          "does not see other processes' gradient shards): use bf16 on GPUs "
                          "that have it, or precision: fp32")


def layer_classes(model: nn.Module, settings: FsdpSettings) -> set[str]:
    """The class names of the modules that become one FSDP unit each."""
    if settings.wrap == "NO_WRAP":
        return set()
    wanted = settings.layer_classes or tuple(getattr(model, "_no_split_modules", None) or ())
    present = {type(m).__name__ for m in model.modules()}
    found = set(wanted) & present
    if not found:
        raise ConfigError("accelerate FSDP config: fsdp_transformer_layer_cls_to_wrap names "
                          f"no module of this model ({', '.join(wanted) or 'nothing'}); its "
                          f"layers: {', '.join(getattr(model, '_no_split_modules', None) or [])}")
    return found


def shard(net: nn.Module, model: nn.Module, settings: FsdpSettings, device: torch.device
          ) -> nn.Module:
    """fully_shard ``net`` (the trained module, holding ``model``) in place (module
    docstring); returns it. Every process calls it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if settings.activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError("fsdp_activation_checkpointing: this model does not support "
                              "gradient checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": False})
    # the towers return views (pooled features); medsig never changes them in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view")
    mesh = init_device_mesh(device.type, (world()[1],))
    kwargs: dict[str, Any] = {"mesh": mesh,
                              "reshard_after_forward": settings.reshard_after_forward}
    if device.type != "cpu" and settings.offload is not None:
        kwargs["offload_policy"] = settings.offload
    names = layer_classes(model, settings)
    for module in reversed(list(model.modules())):  # inner units first
        if type(module).__name__ in names and module is not model:
            fully_shard(module, **kwargs)
    for child in model.children():  # towers, projections, heads
        if not isinstance(child, FSDPModule) and any(True for _ in child.parameters()):
            fully_shard(child, **kwargs)
    replicated = list(model.parameters(recurse=False))  # logit scale / bias
    fully_shard(net, ignored_params=set(replicated), **kwargs)
    net.medsig_replicated = replicated  # type: ignore[assignment]
    # the trained module is the root, even when evaluation first calls a tower directly
    net._get_fsdp_state()._lazy_init()  # type: ignore[operator]
    return net


def sync_replicated(net: nn.Module) -> None:
    """Average the gradients of the replicated (not sharded) parameters over the processes
    (FSDP reduces the sharded ones). A no-op without FSDP."""
    n = world()[1]
    for p in getattr(net, "medsig_replicated", []):
        if p.grad is not None and n > 1:
            dist.all_reduce(p.grad)
            p.grad.div_(n)


def reshard(net: nn.Module) -> None:
    """Free the gathered parameters an evaluation left behind (``fsdp_reshard_after_forward:
    false`` keeps them until a backward that evaluation never runs), so that the module
    holds its shards again before weights are read or loaded. A no-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    for module in net.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
