"""Every recipe in configs/ runs end to end (train -> eval -> serve) on its real architecture.

The models are `medsig model tiny --like HUB_ID` checkpoints: the real image size, patch
size, text length, module names (LoRA targets) and layer structure (unfreezing by layer),
with fewer layers and a narrow width so a few steps take seconds.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
import yaml
from PIL import Image

from medsig.data.collection import load_collection
from medsig.data.split import set_spec_splits, split_collection, write_split
from medsig.data.synth import synthesize
from medsig.models.tiny import write_like

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST = ["optim.epochs=1", "optim.max_steps=2", "eval.at_start=false", "num_workers=0",
        "prefetch=0"]


def _split(spec: Path) -> Path:
    col = load_collection(spec)
    path, _ = write_split(col, split_collection(col, seed=0), spec.parent)
    set_spec_splits(spec, path.name)
    return spec


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recipes")


@pytest.fixture(scope="module")
def derm(root: Path) -> Path:
    return _split(synthesize("derm", root / "derm", n=48, image_size=64))


@pytest.fixture(scope="module")
def wound(root: Path) -> Path:
    """SurgWound-like data with six binary labels (infection risk and exudate binarised)."""
    spec = synthesize("wound", root / "wound", n=48, image_size=64)
    raw = yaml.safe_load(spec.read_text())
    for lab in raw["labels"]:
        if lab["name"] == "infection_risk":
            lab.update(type="binary", positive=["Medium", "High"], negative=["Low"])
        elif lab["name"] == "exudate":
            lab.update(type="binary", positive=["Purulent"],
                       negative=["No exudate", "Serous", "Sanguineous"])
        lab.pop("classes", None) if lab["type"] == "binary" else None
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    return _split(spec)


@pytest.fixture(scope="module")
def radiology(root: Path) -> Path:
    return _split(synthesize("radiology", root / "radiology", n=40, image_size=64))


@pytest.fixture(scope="module")
def like(root: Path):
    made: dict[str, Path] = {}

    def get(hub_id: str, layers: int = 2) -> Path:
        key = f"{hub_id}-{layers}"
        if key not in made:
            made[key] = write_like(root / "models" / key.replace("/", "_"), hub_id,
                                   layers=layers, hidden_size=32)
        return made[key]

    return get


def _recipe(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def _train(name: str, spec: Path, model: Path, out: Path, extra: list[str] = ()) -> Path:
    from medsig.train import train

    return train(CONFIGS / name, overrides=[f"spec={spec}", f"model={model}", f"out={out}",
                                            *FAST, *extra])


def _eval_and_serve(spec: Path, models: dict[str, Path], out: Path, tasks: list[str],
                    serve: Path | None) -> dict:
    from fastapi.testclient import TestClient

    from medsig.evaluate.run import evaluate
    from medsig.serve import create_app

    metrics = evaluate(spec, {k: str(v) for k, v in models.items()}, tasks=tasks,
                       split="test", out=out, n_boot=20, seed=0, num_workers=0,
                       duplicates=0)
    assert set(metrics["model_order"]) == set(models)
    if serve is not None:
        col = load_collection(spec)
        buf = BytesIO()
        Image.open(col.image_paths[0]).convert("RGB").save(buf, format="PNG")
        with TestClient(create_app(serve)) as client:
            r = client.post("/v1/predict", files={"file": ("x.png", buf.getvalue())})
            assert r.status_code == 200, r.text
            assert r.json()["labels"] or r.json().get("predictions")
    return metrics


def test_every_recipe_names_a_real_architecture() -> None:
    from medsig.models.tiny import LIKE
    from medsig.train import load_config

    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert len(names) == 7
    for name in names:
        raw = _recipe(name)
        assert raw["model"] in LIKE, name
        if name != "scin-embed.yaml":
            load_config(CONFIGS / name)  # valid keys and values


def test_scin_contrastive_lora(derm, like, root) -> None:
    model = like("google/siglip-base-patch16-224")
    out = _train("scin-contrastive.yaml", derm, model, root / "scin", ["optim.batch_size=8"])
    info = yaml.safe_load((out / "config.yaml").read_text())
    assert info["adapt"]["method"] == "lora" and info["data"]["oversample"]["min_count"] == 30
    _eval_and_serve(derm, {"base": model, "tuned": out}, root / "scin-eval",
                    ["zeroshot", "retrieval"], out)


def test_surgwound_partial_classify_and_mlp_probe(wound, like, root) -> None:
    import json

    model = like("google/medsiglip-448", layers=5)  # the last 4 of 5 blocks train
    out = _train("surgwound-classify.yaml", wound, model, root / "sw",
                 ["optim.grad_accum=2"])
    meta = json.loads((out / "medsig.json").read_text())
    assert meta["preprocessing"]["size"] == 448 and len(meta["heads"]) == 6
    adapt = meta["training"]["adapt"]
    assert 0 < adapt["trainable"] < adapt["total"]  # the first block stayed frozen
    probe = _train("surgwound-probe.yaml", wound, model, root / "sw-probe",
                   ["probe.mlp_epochs=5"])
    assert json.loads((probe / "medsig.json").read_text())["probe"]["hidden"] == [512, 256]
    _eval_and_serve(wound, {"classify": out, "probe": probe}, root / "sw-eval",
                    ["classification"], out)


def test_scin_embed_into_qdrant(derm, like, root) -> None:
    from medsig.index.runner import embed_collection
    from medsig.index.search import search
    from medsig.index.store import close_store

    kwargs = _recipe("scin-embed.yaml")
    kwargs.update(spec=derm, model=like("google/siglip-base-patch16-224"),
                  store=root / "qdrant", progress=False, num_workers=0)
    report = embed_collection(**kwargs)
    assert report.embedded == 48
    hits = search(root / "qdrant", kwargs["collection_name"], text="eczema", k=3)
    meta = yaml.safe_load(derm.read_text())["metadata"]
    assert all(col in hits[0].payload for col in meta)  # every metadata column
    close_store(root / "qdrant")


def test_roco_partial_gradcache_hard_negatives(radiology, like, root) -> None:
    model = like("openai/clip-vit-base-patch16")
    out = _train("roco-contrastive.yaml", radiology, model, root / "roco",
                 ["optim.batch_size=4", "optim.grad_accum=2"])
    import json

    adapt = json.loads((out / "medsig.json").read_text())["training"]["adapt"]
    assert 0 < adapt["trainable"] < adapt["total"]  # 30 % of the layers
    _eval_and_serve(radiology, {"base": model, "tuned": out}, root / "roco-eval",
                    ["retrieval"], out)


def test_scin_coarse_three_models(derm, like, root) -> None:
    model = like("google/siglip-base-patch16-224")
    fine = _train("scin-coarse-fine.yaml", derm, model, root / "fine", ["optim.batch_size=8"])
    coarse = _train("scin-coarse-coarse.yaml", derm, model, root / "coarse",
                    ["optim.batch_size=8"])
    metrics = _eval_and_serve(derm, {"vanilla": model, "fine": fine, "coarse": coarse},
                              root / "coarse-eval", ["clustering"], None)
    assert {"vanilla", "fine", "coarse"} <= set(metrics["clustering"])
