"""FSDP (FSDP2 fully_shard) training: 2 CPU processes (gloo) launched with the example
accelerate config `configs/accelerate/fsdp.yaml`, against one process.

One launch trains every case; each is compared with the same config trained in this
process (final weights within 1e-5, validation metrics); the contrastive FSDP run is
interrupted after step 2 and resumed from its checkpoint (whole weights and AdamW state, cut
into shards again), so it also checks resume. The saved folders are loaded by plain
transformers and by medsig's predictor. The settings parser and the refusals are
unit-tested.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from medsig.errors import ConfigError
from medsig.train import train
from medsig.train.fsdp import FsdpSettings, check_supported, fsdp_settings, layer_classes
from tests.test_train_distributed import (
    _launch,
    _weights,
    assert_same_run,
    step_case,
)
from tests.test_train_helpers import (  # noqa: F401 (fixtures)
    assert_same_weights,
    config,
    tiny_fixture,
    wound_fixture,
)

ROOT = Path(__file__).resolve().parents[1]
FSDP_YAML = ROOT / "configs" / "accelerate" / "fsdp.yaml"


def _cases(wound: Path, tiny: Path, out: Path) -> dict[str, dict[str, Any]]:
    def case(name: str, **sections: Any) -> dict[str, Any]:
        return step_case(wound, tiny, out, name, **sections)

    return {
        # a checkpoint after every step; the 2-process run stops after step 2 and resumes
        "sigmoid": case("sigmoid", optim={"max_steps": 3},
                        eval={"at_start": False, "save_every_steps": 1}),
        # 7 rows a micro-batch: slices of 4 and 3; 2 micro-batches a step, each
        # reduce-scattered (FSDP accumulates sharded gradients, no no_sync)
        "classify": case("classify", objective="classify", optim={"batch_size": 7,
                                                                  "grad_accum": 2}),
    }


@pytest.fixture(scope="module")
def runs(wound: Path, tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("fsdp")
    two, one = _cases(wound, tiny, tmp / "two"), _cases(wound, tiny, tmp / "one")
    jobs = [{"config": c, "stop_at": 2 if name == "sigmoid" else None}
            for name, c in two.items()]
    _launch(jobs, tmp, ("--config_file", str(FSDP_YAML)))
    for cfg in one.values():
        train(cfg)
    return {"one": one, "two": two}


@pytest.mark.parametrize("name", ["sigmoid", "classify"])
def test_fsdp_ends_with_the_weights_and_metrics_of_one_process(runs: dict[str, Any],
                                                                name: str) -> None:
    one, two = runs["one"][name]["out"], runs["two"][name]["out"]
    info = assert_same_run(one, two)
    assert info["training"]["processes"] == 2 and info["training"]["sharded"] is True
    rows = [json.loads((Path(two) / f"rows-{r}.json").read_text()) for r in (0, 1)]
    assert all(len(m) < runs["two"][name]["optim"]["batch_size"]  # each process: a slice
               for step in rows[0] for m in step)


def test_the_fsdp_model_folder_loads_in_plain_transformers_and_medsig(runs: dict[str, Any]
                                                                       ) -> None:
    """Plain transformers and medsig's predictor read the FSDP folders like the
    single-process ones: the same outputs on the same pixels."""
    from transformers import AutoModel, AutoModelForImageClassification

    from medsig.models.predictor import load_predictor

    def folders(name: str) -> tuple[Path, Path]:
        return Path(runs["two"][name]["out"]), Path(runs["one"][name]["out"])

    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fsdp, one = (AutoModel.from_pretrained(f).get_image_features(pixel_values=pixels)
                     .pooler_output for f in folders("sigmoid"))
        torch.testing.assert_close(fsdp, one, rtol=0, atol=1e-4)
        fsdp, one = (AutoModelForImageClassification.from_pretrained(f)(pixel_values=pixels)
                     .logits for f in folders("classify"))
        torch.testing.assert_close(fsdp, one, rtol=0, atol=1e-4)
    fsdp, one = (load_predictor(f, device="cpu", safe_outputs=False).predict_pixels(pixels)
                 for f in folders("classify"))
    assert fsdp.shape == one.shape and fsdp.shape[0] == 3
    assert abs(fsdp - one).max() < 1e-4


def test_the_fsdp_checkpoint_holds_whole_tensors_and_resumed(runs: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    from medsig.train.checkpoint import load_plain

    out = Path(runs["two"]["sigmoid"]["out"])
    last = out / "checkpoints" / "last"
    assert json.loads((last / "state.json").read_text())["step"] == 3
    weights, saved = load_file(str(last / "trainable.safetensors")), _weights(out)
    assert all(weights[k].shape == saved[k].shape for k in saved)  # whole, not shards
    optim = load_plain(last / "optimizer.pt")
    shapes = sorted(tuple(t.shape) for t in weights.values())
    moments = sorted(tuple(s["exp_avg"].shape) for s in optim["state"].values())
    assert moments == shapes


# ----------------------------------------------------------------------------- settings
def _accelerator(kind: str = "MULTI_CPU") -> Any:
    return SimpleNamespace(distributed_type=SimpleNamespace(value=kind),
                           state=SimpleNamespace(fsdp_plugin=None))


FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
            "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
            "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "SiglipEncoderLayer,CLIPEncoderLayer",
            "FSDP_RESHARD_AFTER_FORWARD": "false", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}


def _env(monkeypatch: pytest.MonkeyPatch, **changes: str) -> None:
    for k, v in {**FSDP_ENV, **changes}.items():
        monkeypatch.setenv(k, v)


def test_settings_come_from_the_accelerate_fsdp_environment(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert fsdp_settings(_accelerator()) is None  # plain DDP / one process
    _env(monkeypatch)
    s = fsdp_settings(_accelerator())
    assert s is not None and s.wrap == "TRANSFORMER_BASED_WRAP"
    assert s.layer_classes == ("SiglipEncoderLayer", "CLIPEncoderLayer")
    assert s.reshard_after_forward is False and not s.activation_checkpointing


@pytest.mark.parametrize(("key", "value", "message"), [
    ("FSDP_VERSION", "1", "fsdp_version: 2"),
    ("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT", "FULL_STATE_DICT"),
    ("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP", "TRANSFORMER_BASED_WRAP"),
    ("FSDP_CPU_RAM_EFFICIENT_LOADING", "true", "cpu_ram_efficient_loading: false"),
])
def test_unsupported_fsdp_settings_are_refused_by_name(monkeypatch: pytest.MonkeyPatch,
                                                       key: str, value: str,
                                                       message: str) -> None:
    _env(monkeypatch, **{key: value})
    with pytest.raises(ConfigError, match=message):
        fsdp_settings(_accelerator())


def test_layer_classes_pick_the_encoder_layers_of_each_family(tiny: Path) -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny)
    both = FsdpSettings("TRANSFORMER_BASED_WRAP", ("SiglipEncoderLayer", "CLIPEncoderLayer"),
                        True, None, False)
    assert layer_classes(model, both) == {"SiglipEncoderLayer"}
    default = FsdpSettings("TRANSFORMER_BASED_WRAP", None, True, None, False)
    assert "SiglipEncoderLayer" in layer_classes(model, default)  # _no_split_modules
    assert layer_classes(model, FsdpSettings("NO_WRAP", None, True, None, False)) == set()
    with pytest.raises(ConfigError, match="names no module"):
        layer_classes(model, FsdpSettings("TRANSFORMER_BASED_WRAP", ("CLIPEncoderLayer",),
                                          True, None, False))


@pytest.mark.parametrize(("section", "resolved", "message"), [
    ({"adapt": {"method": "lora"}}, "no", "LoRA fits one GPU"),
    ({"optim": {"gradcache": True}}, "no", "gradcache"),
    ({"precision": "fp16"}, "fp16", "fp16 is not"),
    ({"precision": "auto"}, "fp16", r"'auto' chose it"),  # a GPU without bf16
])
def test_what_fsdp_does_not_run_is_refused_with_the_way_out(wound: Path, tiny: Path,
                                                            tmp_path: Path,
                                                            section: dict[str, Any],
                                                            resolved: str,
                                                            message: str) -> None:
    from medsig.train.config import load_config

    cfg = load_config(config(wound, tiny, tmp_path / "x", **section))
    with pytest.raises(ConfigError, match=message):
        check_supported(cfg, resolved)
    check_supported(load_config(config(wound, tiny, tmp_path / "y")), "bf16")  # runs


def test_lockstep_evaluation_gives_every_process_the_same_number_of_batches() -> None:
    from medsig.train.data import eval_batches

    assert eval_batches(70, 32) == [list(range(32)), list(range(32, 64)), list(range(64, 70))]
    for world in (2, 3, 4):
        for n in range(world, 200, 7):
            plain = [eval_batches(n, 32, r, world) for r in range(world)]
            locked = [eval_batches(n, 32, r, world, lockstep=True) for r in range(world)]
            assert len({len(b) for b in locked}) == 1, (n, world)  # FSDP: lockstep
            for p, q in zip(plain, locked):  # the same rows, in order, batches <= 32
                assert sum(p, []) == sum(q, []) and all(0 < len(b) <= 32 for b in q)
    assert len(eval_batches(65, 32, 0, 2)) != len(eval_batches(65, 32, 1, 2))  # DDP: 2 vs 1
