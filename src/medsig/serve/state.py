"""What a server holds: the model (loaded once), the index, encoders and batchers."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsig.errors import ConfigError
from medsig.models.heads import Head, heads_of
from medsig.serve.batching import MicroBatcher, as_list, model_executor, stack_tensors
from medsig.serve.schemas import ModelInfo


@dataclass
class ServeSettings:
    """Server settings; `api_key` defaults to the MEDSIG_API_KEY environment variable."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    batching: bool = True
    max_batch: int = 32
    max_wait_ms: float = 5.0
    api_key: str | None = field(default_factory=lambda: os.environ.get("MEDSIG_API_KEY") or None)
    cors_origins: list[str] = field(default_factory=list)
    image_root: Path | None = None
    thumbnail_size: int = 160
    max_k: int = 50
    device: str | None = None


@dataclass
class Embedder:
    """Image / text embedding functions of one encoder (the index's, when searching)."""

    name: str
    preprocess: Callable[[Any], Any]
    image_size: int | None
    image: Callable[[Any], Any]
    text: Callable[[list[str]], Any] | None


@dataclass
class ServeState:
    settings: ServeSettings
    predictor: Any
    heads: list[Head]
    model: ModelInfo
    embedder: Embedder | None
    store: Any = None  # VectorStore
    image_root: Path | None = None
    vector_names: set[str] = field(default_factory=set)
    executor: ThreadPoolExecutor = field(default_factory=model_executor)
    store_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="medsig-store"))
    batchers: dict[str, MicroBatcher] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def batcher(self, name: str, fn: Callable[[Any], Any], texts: bool = False) -> MicroBatcher:
        if name not in self.batchers:
            s = self.settings
            self.batchers[name] = MicroBatcher(
                fn, collate=as_list if texts else stack_tensors, executor=self.executor,
                max_batch=s.max_batch, max_wait_ms=s.max_wait_ms, enabled=s.batching)
        return self.batchers[name]

    async def close(self) -> None:
        for b in self.batchers.values():
            await b.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.store_executor.shutdown(wait=False, cancel_futures=True)


def load_state(model: Any, store: str | Path | None, collection: str | None,
               settings: ServeSettings) -> ServeState:
    """Load the predictor once, open the index and pick the encoder that matches it."""
    if isinstance(model, (str, Path)):
        from medsig.models.predictor import load_predictor

        predictor = load_predictor(model)
    else:
        predictor = model
    info = ModelInfo(name=str(getattr(predictor, "name", "model")),
                     version=str(getattr(predictor, "version", "unknown")))
    state = ServeState(settings, predictor, heads_of(predictor.heads), info, None)
    if (store is None) != (collection is None):
        raise ConfigError("give both --store and --collection to enable search")
    if store is not None:
        from medsig.index.store import VectorStore

        vs = VectorStore(store, str(collection))
        if not vs.exists():
            raise ConfigError(f"no collection '{collection}' in {store}: run `medsig embed` "
                              "first")
        meta = vs.metadata()
        state.store = vs
        state.vector_names = set(vs.vector_sizes())
        state.embedder = _index_embedder(predictor, meta.get("model"), settings.device)
        state.image_root = _image_root(settings.image_root, meta, predictor)
    else:
        state.embedder = _own_embedder(predictor)
        if settings.image_root is not None:
            state.image_root = Path(settings.image_root).resolve()
    return state


def _encoder_embedder(enc: Any) -> Embedder:
    text = enc.embed_texts if getattr(enc, "tokenizer", None) is not None else None
    return Embedder(str(enc.name), enc.preprocess, getattr(enc, "image_size", None),
                    enc.embed_images, text)


def _own_embedder(predictor: Any) -> Embedder:
    """The model's own encoder, or its `embed` for image-only models."""
    enc = getattr(predictor, "encoder", None)
    if enc is not None and hasattr(enc, "embed_images"):
        return _encoder_embedder(enc)
    return Embedder(str(getattr(predictor, "name", "model")), predictor.preprocess,
                    getattr(predictor.preprocess, "size", None), predictor.embed, None)


def _index_embedder(predictor: Any, index_model: str | None, device: str | None) -> Embedder:
    """The encoder that built the index: the predictor's own one when it is the same model."""
    enc = getattr(predictor, "encoder", None)
    if enc is not None and hasattr(enc, "embed_images") and (
            index_model is None or same_model(str(enc.name), index_model)):
        return _encoder_embedder(enc)
    if not index_model:
        raise ConfigError("the collection does not record the model that indexed it")
    from medsig.models.encoder import Encoder

    return _encoder_embedder(Encoder.load(index_model, device=device))


def same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _image_root(explicit: Path | None, meta: dict[str, Any], predictor: Any) -> Path | None:
    """Where the indexed images live: explicit, the collection metadata, or the model's spec."""
    if explicit is not None:
        return Path(explicit).resolve()
    root = meta.get("image_root")
    if root and Path(root).is_dir():
        return Path(root).resolve()
    artifact, folder = getattr(predictor, "artifact", None), getattr(predictor, "folder", None)
    if artifact is None or folder is None or artifact.spec.name != meta.get("spec"):
        return None
    path = artifact.spec_path(folder)
    if path is not None:
        from medsig.spec import DatasetSpec

        try:
            return DatasetSpec.load(path).image_root_path.resolve()
        except Exception:  # a moved or edited spec: thumbnails off, search still works
            return None
    return None


_ABSOLUTE = re.compile(r"^(/|[A-Za-z]:[\\/]|\\\\|file://|~/)")


def scrub_paths(value: Any, root: Path | None) -> Any:
    """Replace absolute file-system paths in a payload by root-relative paths or base names."""
    if isinstance(value, dict):
        return {k: scrub_paths(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_paths(v, root) for v in value]
    if isinstance(value, str) and _ABSOLUTE.match(value):
        raw = value[7:] if value.startswith("file://") else value
        if root is not None:
            try:
                return str(Path(raw).resolve().relative_to(root))
            except (ValueError, OSError):
                pass
        return re.split(r"[\\/]", raw.rstrip("/\\"))[-1]
    return value


def resolve_image(root: Path, rel: Any) -> Path | None:
    """The file `rel` inside `root`, or None (absolute, escaping the root, or absent)."""
    if not isinstance(rel, str) or not rel or _ABSOLUTE.match(rel) or "\x00" in rel:
        return None
    try:
        path = (root / rel).resolve()
    except (OSError, RuntimeError):
        return None
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path
