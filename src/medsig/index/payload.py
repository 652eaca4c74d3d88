"""Payload of a point: every metadata column, the text, the split and the encoded labels."""

from __future__ import annotations

from typing import Any

from medsig.data.collection import Collection


def row_payload(collection: Collection, i: int, text: str | None = None) -> dict[str, Any]:
    """JSON-safe payload for row i. `image` is relative to the image root (no absolute paths).

    labels: readable values (binary state, class name, list of class names; None = missing);
    targets: encoded values (1 / 0 / -1, class index, list of class indices).
    """
    spec = collection.spec
    payload: dict[str, Any] = {}
    for col in collection.metadata_columns:
        value = collection.frame.at[i, col]
        payload[col] = value if isinstance(value, (list, dict)) else str(value)
    try:
        image = str(collection.image_paths[i].relative_to(spec.image_root_path))
    except ValueError:
        image = collection.image_paths[i].name
    payload.update({
        "id": collection.ids[i],
        "image": image,
        "group": str(collection.groups[i]),
        "split": None if collection.split is None else str(collection.split[i]),
        "text": text if text is not None else collection.text(i),
        "collection": spec.name,
    })
    labels: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    for name, lab in collection.labels.items():
        if lab.missing[i]:
            labels[name], targets[name] = None, -1 if lab.kind != "multilabel" else []
        elif lab.kind == "multilabel":
            present = [k for k, v in enumerate(lab.targets[i]) if v > 0]
            labels[name] = [lab.classes[k] for k in present]
            targets[name] = present
        else:
            labels[name] = lab.classes[int(lab.targets[i])]
            targets[name] = int(lab.targets[i])
    payload["labels"] = labels
    payload["targets"] = targets
    return payload


def payload_indexes(collection: Collection) -> dict[str, str]:
    """The payload fields searches filter on, with their index type (keyword / integer)."""
    return _indexes(list(collection.labels))


def indexes_for_payload(payload: dict[str, Any]) -> dict[str, str]:
    """The same fields for a stored payload (e.g. a collection exported without them)."""
    return _indexes(list(payload.get("labels") or {}))


def _indexes(labels: list[str]) -> dict[str, str]:
    fields = {"id": "keyword", "split": "keyword", "group": "keyword"}
    for name in labels:
        fields[f"labels.{name}"] = "keyword"
        fields[f"targets.{name}"] = "integer"
    return fields
