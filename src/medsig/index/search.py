"""Search an indexed collection by image, text or point id, with payload filters."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from qdrant_client import models

from medsig.data.images import load_image
from medsig.errors import ConfigError
from medsig.index.store import Hit, VectorStore, point_id
from medsig.models.encoder import Encoder

_WHERE = re.compile(r"^\s*([\w.\-]+)\s*(!=|>=|<=|=|>|<)\s*(.*?)\s*$")


def parse_where(clauses: list[str] | None) -> models.Filter | None:
    """`key=value`, `key!=value`, `key>=n`, `key<n` ... (AND of all clauses).

    Nested payload keys use dots (`labels.urgency=needs attention`). A value that looks like an
    integer also matches the integer (CSV columns are stored as strings, targets as ints).
    """
    if not clauses:
        return None
    must, must_not = [], []
    for clause in clauses:
        m = _WHERE.match(clause)
        if not m:
            raise ConfigError(f"bad filter '{clause}': use key=value, key!=value, key>=number")
        key, op, value = m.groups()
        if op in ("=", "!="):
            cond = _match(key, value)
            (must if op == "=" else must_not).append(cond)
            continue
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"bad filter '{clause}': '{value}' is not a number") from None
        bound = {">": "gt", ">=": "gte", "<": "lt", "<=": "lte"}[op]
        must.append(models.FieldCondition(key=key, range=models.Range(**{bound: number})))
    return models.Filter(must=must or None, must_not=must_not or None)


def _match(key: str, value: str) -> models.Condition:
    options = [models.FieldCondition(key=key, match=models.MatchValue(value=value))]
    if re.fullmatch(r"-?\d+", value):
        options.append(models.FieldCondition(key=key, match=models.MatchValue(value=int(value))))
    if value.lower() in ("true", "false"):
        options.append(models.FieldCondition(
            key=key, match=models.MatchValue(value=value.lower() == "true")))
    return options[0] if len(options) == 1 else models.Filter(should=options)


def search(
    store: str | Path,
    collection: str,
    *,
    image: str | Path | bytes | None = None,
    text: str | None = None,
    id: str | None = None,
    encoder: Encoder | None = None,
    model: str | Path | None = None,
    where: list[str] | None = None,
    k: int = 5,
    using: str | None = None,
) -> list[Hit]:
    """The k nearest indexed cases to an image, a text, or an indexed point (by row id).

    Image and text queries need the model that built the index (`encoder` or `model`;
    by default the one recorded in the collection metadata).
    """
    if sum(x is not None for x in (image, text, id)) != 1:
        raise ConfigError("give exactly one of --image, --text or --id")
    vs = VectorStore(store, collection)
    if not vs.exists():
        raise ConfigError(f"no collection '{collection}' in {store}: run `medsig embed` first")
    flt = parse_where(where)
    if id is not None:
        pid = point_id(id)
        point = vs.get(pid, with_vectors=True)
        if point is None:
            raise ConfigError(f"no indexed point with id '{id}' in '{collection}'")
        name = using or "image"
        vector = np.asarray(point.vector[name], dtype=np.float32)
        return vs.search(vector, name, k, flt, exclude_id=pid)
    if encoder is None:
        model = model or vs.metadata().get("model")
        if not model:
            raise ConfigError("the collection does not record its model: pass --model")
        encoder = Encoder.load(model)
    if image is not None:
        pixels = encoder.preprocess(load_image(image, draft_size=encoder.image_size))
        vector = encoder.embed_images(pixels[None])[0].cpu().numpy()
        return vs.search(vector, using or "image", k, flt)
    vector = encoder.embed_texts([text])[0].cpu().numpy()
    # a text query looks for images by default (text -> image retrieval)
    return vs.search(vector, using or "image", k, flt)
