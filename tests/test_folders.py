"""Every model-folder kind loads in every reader, also after the folders moved elsewhere:
load_predictor, `medsig eval`'s model loading, `medsig serve` (create_app) and plain
transformers / peft. Plain transformers reproduces medsig's classifier probabilities on a
non-square image; the model cards' metadata parses and holds no local path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from medsig.data.images import load_image

LABELS = ["urgent", "category"]  # binary + multilabel (derm)
KINDS = ["full", "lora-merged", "lora-adapter", "partial", "classify", "probe",
         "contrastive-zero-shot"]
ADAPT = {"full": {"method": "full"}, "partial": {"method": "partial",
                                                 "unfreeze_last_n_layers": 1},
         "lora-merged": {"method": "lora", "lora": {"r": 2, "merge": True}},
         "lora-adapter": {"method": "lora", "lora": {"r": 2, "merge": False}}}
_ENV: dict[str, SimpleNamespace] = {}


def _train_all(root: Path) -> dict[str, Path]:
    from medsig.data.collection import load_collection
    from medsig.data.split import set_spec_splits, split_collection, write_split
    from medsig.data.synth import synthesize
    from medsig.models.tiny import write_tiny
    from medsig.train import train
    from medsig.train.probe import train_probe

    spec = synthesize("derm", root / "data", n=64, seed=0, image_size=40)
    collection = load_collection(spec)
    write_split(collection, split_collection(collection, seed=0), spec.parent)
    set_spec_splits(spec, "splits.csv")
    tiny = write_tiny(root / "tiny", arch="siglip", image_size=32, seed=0)
    base = {"spec": str(spec), "model": str(tiny), "labels": LABELS, "seed": 0,
            "precision": "fp32", "device": "cpu", "data": {"augment": False},
            "eval": {"at_start": False},
            "optim": {"epochs": 1, "max_steps": 2, "batch_size": 16, "lr": 1e-3}}
    folders = {"contrastive-zero-shot": tiny, "spec": spec}
    for kind, adapt in ADAPT.items():
        folders[kind] = train({**base, "out": str(root / kind), "objective": "contrastive",
                               "adapt": adapt})
    folders["classify"] = train({**base, "out": str(root / "classify"),
                                 "objective": "classify", "preprocess": "pad"})
    folders["classify-reference"] = train({**base, "out": str(root / "classify-reference"),
                                           "objective": "classify"})
    folders["probe"] = train_probe(spec, tiny, root / "probe", labels=LABELS)
    return folders


def _predict(model: Path, spec: Path, images: list[Path]) -> np.ndarray:
    from medsig.models.predictor import load_predictor

    zeroshot = model.name == "tiny"
    predictor = load_predictor(model, spec=spec if zeroshot else None,
                               labels=LABELS if zeroshot else None)
    pixels = torch.stack([predictor.preprocess(load_image(p)) for p in images])
    return predictor.predict_pixels(pixels)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Every kind trained once (2 steps), its probabilities, then the whole tree moved."""
    if "env" in _ENV:
        return _ENV["env"]
    from medsig.data.collection import load_collection

    first = tmp_path_factory.mktemp("where-trained")
    folders = _train_all(first)
    images = load_collection(folders["spec"]).image_paths[:4]
    before = {k: _predict(folders[k], folders["spec"], images) for k in KINDS}
    moved = tmp_path_factory.mktemp("moved") / "elsewhere"
    shutil.move(str(first), str(moved))  # models, base and data together; nothing left behind
    assert not first.exists()
    rel = {k: Path(v).relative_to(first) for k, v in folders.items()}
    _ENV["env"] = SimpleNamespace(
        root=moved, folder={k: moved / r for k, r in rel.items()}, before=before,
        images=[moved / Path(p).relative_to(first) for p in images])
    return _ENV["env"]


@pytest.mark.parametrize("kind", KINDS)
def test_load_predictor_after_a_move(env, kind: str) -> None:
    from medsig.models.artifact import Artifact

    probs = _predict(env.folder[kind], env.folder["spec"], env.images)
    np.testing.assert_allclose(probs, env.before[kind], atol=1e-5)
    if kind != "contrastive-zero-shot":
        art = Artifact.load(env.folder[kind])
        assert art.kind == kind and art.schema == 2
        text = (env.folder[kind] / "medsig.json").read_text()
        assert str(env.root) not in text and "where-trained" not in text


@pytest.mark.parametrize("kind", KINDS)
def test_eval_loads_every_kind_after_a_move(env, kind: str) -> None:
    from medsig.evaluate.run import evaluate

    tasks = ["classification"] if kind in ("classify", "probe") else ["zeroshot"]
    metrics = evaluate(env.folder["spec"], {"m": str(env.folder[kind])}, tasks=tasks,
                       split="val", n_boot=5, report=False, duplicates=None, num_workers=0)
    result = metrics[tasks[0]]["m"]
    assert "urgent" in json.dumps(result), result


@pytest.mark.parametrize("kind", KINDS)
def test_serve_predicts_with_every_kind_after_a_move(env, kind: str) -> None:
    from fastapi.testclient import TestClient

    from medsig.models.predictor import load_predictor
    from medsig.serve.app import create_app

    model = env.folder[kind] if kind != "contrastive-zero-shot" else \
        load_predictor(env.folder[kind], spec=env.folder["spec"], labels=LABELS)
    with TestClient(create_app(model)) as client:
        r = client.post("/v1/predict", files={"file": ("x.png", env.images[0].read_bytes())})
    assert r.status_code == 200, r.text
    body = r.json()
    urgent = next(lab for lab in body["labels"] if lab["name"] == "urgent")
    assert urgent["probability"] == pytest.approx(env.before[kind][0][0], abs=1e-4)
    assert urgent["probability_of"] == urgent["classes"][1]


def _image_features(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().get_image_features(pixel_values=pixels).pooler_output


@pytest.mark.parametrize("kind", ["full", "lora-merged", "partial", "lora-adapter"])
def test_plain_transformers_and_peft_load_the_image_text_kinds(env, kind: str) -> None:
    from peft import PeftModel
    from transformers import AutoModel

    from medsig.models.predictor import load_encoder

    encoder = load_encoder(env.folder[kind])
    pixels = torch.stack([encoder.preprocess(load_image(p)) for p in env.images])
    ours = encoder.embed_images(pixels)
    if kind == "lora-adapter":  # the base moved too: give peft the moved base explicitly
        base = AutoModel.from_pretrained(env.folder["contrastive-zero-shot"])
        plain = PeftModel.from_pretrained(base, env.folder[kind])
    else:
        plain = AutoModel.from_pretrained(env.folder[kind])
    theirs = torch.nn.functional.normalize(_image_features(plain, pixels), dim=-1)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_adapter_config_names_a_loadable_base(env) -> None:
    cfg = json.loads((env.folder["lora-adapter"] / "adapter_config.json").read_text())
    base = cfg["base_model_name_or_path"]
    assert Path(base).is_absolute() and Path(base).name == "tiny"  # not the name as typed
    meta = json.loads((env.folder["lora-adapter"] / "medsig.json").read_text())
    assert meta["base_model"] == "../tiny"  # what survives moving both folders


def test_plain_transformers_reproduces_the_classifier_on_a_non_square_image(env) -> None:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from medsig.models.predictor import load_predictor

    folder = env.folder["classify"]
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((128, 256, 3)) * 255).astype(np.uint8))
    predictor = load_predictor(folder)
    ours = predictor.raw_probabilities(predictor.preprocess(image)[None])[0]  # before temperatures
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(**processor(images=image, return_tensors="pt")).logits[0]
    heads = json.loads((folder / "medsig.json").read_text())["heads"]
    kinds = {h["kind"] for h in heads}
    assert kinds == {"binary", "multilabel"}
    theirs = torch.sigmoid(logits).numpy()  # binary and multilabel heads: one sigmoid each
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # without trust_remote_code transformers refuses rather than silently not padding ...
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoImageProcessor.from_pretrained(folder)
    # ... and the family's own processor (no padding) would give other numbers
    from transformers import SiglipImageProcessor

    plain = SiglipImageProcessor(size={"height": 32, "width": 32})
    with torch.no_grad():
        unpadded = torch.sigmoid(model(**plain(images=image, return_tensors="pt")).logits[0])
    assert np.abs(unpadded.numpy() - ours).max() > 1e-4


def test_plain_transformers_reproduces_a_reference_classifier(env) -> None:
    """The default (the family's reference pipeline): the folder keeps the checkpoint's own
    processor, so plain transformers needs no remote code to give medsig's numbers."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from medsig.models.predictor import load_predictor

    folder = env.folder["classify-reference"]
    image = Image.fromarray((np.random.default_rng(1).random((90, 200, 3)) * 255
                             ).astype(np.uint8))
    predictor = load_predictor(folder)
    assert predictor.preprocess.mode == "reference"
    ours = predictor.raw_probabilities(predictor.preprocess(image)[None])[0]
    processor = AutoImageProcessor.from_pretrained(folder)  # no trust_remote_code
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        theirs = torch.sigmoid(model(**processor(images=image, return_tensors="pt")).logits[0])
    np.testing.assert_allclose(theirs.numpy(), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS[:-1])
def test_model_card_metadata_per_kind(env, kind: str) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(env.folder[kind] / "README.md")
    meta = card.data.to_dict()
    library = {"classify": "transformers", "probe": "medsig", "lora-adapter": "peft"}
    assert meta["library_name"] == library.get(kind, "transformers")
    assert meta["pipeline_tag"] == ("image-classification" if kind in ("classify", "probe")
                                    else "zero-shot-image-classification")
    assert "base_model" not in meta  # a local base has no hub id: none is invented
    assert kind in meta["tags"] and meta["datasets"] == ["derm-synth"] or meta["datasets"]
    assert str(env.root) not in card.content and "/tmp/" not in card.content
    assert "None" not in card.text
    if kind == "classify":
        assert "softmax" in card.text and 'h["thresholds"]' in card.text


def test_the_classifier_card_code_runs_and_gives_medsig_decisions(env, tmp_path, capsys) -> None:
    from medsig.models.predictor import load_predictor

    folder = env.folder["classify"]
    text = (folder / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    image = tmp_path / "image.png"
    Image.fromarray((np.random.default_rng(1).random((60, 90, 3)) * 255).astype(np.uint8)
                    ).save(image)
    code = code.replace("path/to/this/folder", str(folder)).replace("image.png", str(image))
    exec(compile(code, "card", "exec"), {})  # noqa: S102 - the card's own lines
    printed = capsys.readouterr().out.splitlines()
    predictor = load_predictor(folder, safe_outputs=False)  # the card shows raw probabilities
    probs = predictor.predict_pixels(predictor.preprocess(load_image(image))[None])[0]
    for line, decision in zip(printed, predictor.decide(probs)):
        assert line.startswith(decision["name"])
        for score in decision["scores"]:
            assert f"'{score['name']}': ({round(score['probability'], 4)}, " \
                f"{score['positive']})" in line


def test_plain_torch_reproduces_the_probe_after_a_move(env) -> None:
    """transformers (the recorded encoder, relative to the folder) + safetensors (the probe):
    standardise, linear, sigmoid gives medsig's probabilities."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    from medsig.models.predictor import load_predictor

    folder = env.folder["probe"]
    meta = json.loads((folder / "medsig.json").read_text())
    encoder = AutoModel.from_pretrained(folder / meta["encoder"])
    weights = load_file(str(folder / "probe.safetensors"))
    predictor = load_predictor(folder)
    pixels = torch.stack([predictor.preprocess(load_image(p)) for p in env.images])
    emb = torch.nn.functional.normalize(_image_features(encoder, pixels), dim=-1)
    x = (emb - weights["mean"]) / weights["std"]
    probs = torch.sigmoid(x @ weights["net.0.weight"].T + weights["net.0.bias"]).numpy()
    raw = predictor.raw_probabilities(pixels)  # medsig's, before its saved calibration
    np.testing.assert_allclose(probs, raw, atol=1e-5)
