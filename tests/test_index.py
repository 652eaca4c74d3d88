"""Embed + index + search: resumable, exact, filtered; bad images counted; real X-rays."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from medsig.data.collection import load_collection
from medsig.errors import ConfigError
from medsig.index.runner import embed_collection
from medsig.index.search import parse_where, search
from medsig.index.store import VectorStore, close_store, point_id
from medsig.models.embedding import embed_arrays
from medsig.models.encoder import Encoder
from medsig.models.tiny import write_tiny
from tests.conftest import write_wound_spec


def _images(spec_dir, names, seed=0):
    rng = np.random.default_rng(seed)
    for name in names:
        arr = rng.integers(0, 255, size=(40, 50, 3), dtype=np.uint8)
        Image.fromarray(arr).save(spec_dir / "img" / name)


@pytest.fixture
def indexed(tmp_path, encoder):
    spec = write_wound_spec(tmp_path)
    _images(tmp_path, [f"a{i}.png" for i in range(1, 6)])
    store = tmp_path / "qdrant"
    report = embed_collection(spec, encoder, store, "wounds", batch_size=2, num_workers=0,
                              progress=False)
    yield spec, store, report
    close_store(store)


def test_reindex_adds_nothing_and_resumes(indexed, encoder):
    spec, store, report = indexed
    assert report.embedded == 5 and report.points_after == 5
    again = embed_collection(spec, encoder, store, "wounds", num_workers=0, progress=False)
    assert again.embedded == 0 and again.already_indexed == 5 and again.points_after == 5
    # a crash after 2 rows: the next run adds only the 3 missing points
    vs = VectorStore(store, "wounds")
    vs.delete([point_id(f"a{i}") for i in (3, 4, 5)])
    resumed = embed_collection(spec, encoder, store, "wounds", num_workers=0, progress=False)
    assert resumed.embedded == 3 and resumed.points_after == 5


def test_search_equals_brute_force_cosine(indexed, encoder):
    spec, store, _ = indexed
    col = load_collection(spec)
    image, text, rows, _ = embed_arrays(encoder, col, num_workers=0)
    assert np.allclose(np.linalg.norm(image, axis=1), 1, atol=1e-5)
    for q in range(len(col)):
        expected = np.argsort(-(image @ image[q]), kind="stable")[:3]
        hits = search(store, "wounds", image=col.image_paths[q], encoder=encoder, k=3)
        assert [h.payload["id"] for h in hits] == [col.ids[rows[j]] for j in expected]
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    query = "A post-surgical wound with erythema."
    qv = encoder.embed_texts([query])[0].numpy()
    hits = search(store, "wounds", text=query, encoder=encoder, k=5)
    assert [h.payload["id"] for h in hits] == [col.ids[j] for j in np.argsort(-(image @ qv))]


def test_filters_and_payload(indexed, encoder):
    spec, store, _ = indexed
    hits = search(store, "wounds", id="a1", encoder=encoder, k=10,
                  where=["labels.urgency=needs attention"])
    assert {h.payload["id"] for h in hits} == {"a2", "a3"}
    hits = search(store, "wounds", id="a1", encoder=encoder, k=10, where=["targets.urgency!=1"])
    assert {h.payload["id"] for h in hits} == {"a4", "a5"}  # the query itself is excluded
    payload = hits[0].payload
    assert payload["image"] in ("a4.png", "a5.png")  # relative to the image root, no abs path
    assert set(payload["labels"]) == {"urgency", "erythema", "infection_risk", "condition",
                                      "category"}
    with pytest.raises(ConfigError, match="bad filter"):
        parse_where(["urgency"])
    with pytest.raises(ConfigError, match="exactly one"):
        search(store, "wounds", text="x", id="a1", encoder=encoder)


def test_bad_images_are_skipped_and_counted(tmp_path, encoder):
    spec = write_wound_spec(tmp_path)
    _images(tmp_path, ["a1.png", "a2.png"])
    (tmp_path / "img" / "a3.png").write_bytes(b"")
    (tmp_path / "img" / "a4.png").write_text("not an image at all")
    # a5.png is missing
    report = embed_collection(spec, encoder, tmp_path / "q", "w", num_workers=0, progress=False)
    assert report.embedded == 2 and report.points_after == 2
    assert dict(report.skipped) == {"empty": 1, "not_an_image": 1, "missing": 1}
    close_store(tmp_path / "q")


def test_other_model_into_same_collection_is_refused(indexed, tmp_path):
    spec, store, _ = indexed
    other = Encoder.load(write_tiny(tmp_path / "clip", arch="clip", image_size=32))
    with pytest.raises(ConfigError, match="holds embeddings of model"):
        embed_collection(spec, other, store, "wounds", num_workers=0, progress=False)


COVID_SPEC = """
name: covid-cxr
table: {root}/metadata.csv
image_root: {root}/images
columns: {{image: filename, group: patientid, text: clinical_notes}}
missing_values: ["", "todo"]
templates: ["A chest X-ray ({{view}}) with finding {{finding}}."]
metadata: [patientid, sex, age, view, finding]
labels:
  - {{name: finding, type: multiclass, column: finding}}
  - {{name: covid, type: binary, column: finding, positive: [COVID-19],
      negative: [Pneumocystis, ARDS, No Finding, Unknown]}}
"""


def test_real_chest_xrays(shared_data, tmp_path, encoder):
    from medsig.data.split import split_collection

    root = shared_data / "covid-cxr"
    spec = tmp_path / "covid.yaml"
    spec.write_text(COVID_SPEC.format(root=root))
    col = load_collection(spec)
    assert len(col) == 113 and len(set(col.groups)) == 63
    assert int(col.labels["finding"].missing.sum()) == 22  # "todo" is missing, not a class
    assert "todo" not in col.labels["finding"].classes
    res = split_collection(col, seed=0)
    for g in set(col.groups):
        assert len(set(res.split[col.groups == g])) == 1
    col = col.with_split(res.split)
    report = embed_collection(col, encoder, tmp_path / "q", "cxr", num_workers=0,
                              progress=False)
    assert report.embedded == 113 and not report.skipped
    hits = search(tmp_path / "q", "cxr", image=col.image_paths[0], encoder=encoder, k=3,
                  where=["view=PA"])
    assert len(hits) == 3 and all(h.payload["view"] == "PA" for h in hits)
    assert all(not h.payload["image"].startswith("/") for h in hits)
    close_store(tmp_path / "q")
    shutil.rmtree(tmp_path / "q")
