"""Cached photo embeddings: ImageNet features, and each run's own features.

ImageNet embeddings do not depend on any label, so a mislabelled photo cannot
pull them towards its wrong class; they are computed once per photo (keyed by
content hash) and kept on disk. A run's embeddings come from its fine-tuned
network and are kept beside its weights.

Every embedding is the mean of the photo's and its mirror image's pooled
features, L2-normalised.
"""

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from db.models import Photo, TrainingRun
from db.settings import get_settings
from pipeline.images import IMAGE_SIZE
from pipeline.infer import embed
from pipeline.model import create_model, get_device, load_weights

logger = logging.getLogger(__name__)


def normalise(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


@lru_cache(maxsize=1)
def _imagenet_model() -> nn.Module:
    return create_model(None).to(get_device()).eval()


def _load_cache(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        return {}
    with np.load(path) as cache:
        return dict(zip(cache["keys"].tolist(), cache["features"], strict=True))


def _save_cache(path: Path, cache: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial.npz")
    keys = np.array(list(cache), dtype=str)
    np.savez(partial, keys=keys, features=np.stack(list(cache.values())))
    partial.replace(path)


def _cached(path: Path, photos: list[Photo], model_fn, size: int) -> np.ndarray:
    cache = _load_cache(path)
    missing = [p for p in photos if p.sha256 not in cache]
    if missing:
        logger.info("embedding %d photos into %s", len(missing), path.name)
        features = normalise(
            embed(model_fn(), [p.path for p in missing], size, tta=True)
        )
        cache.update(zip([p.sha256 for p in missing], features, strict=True))
        _save_cache(path, cache)
    if not photos:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([cache[p.sha256] for p in photos])


def imagenet_embeddings(photos: list[Photo], size: int = IMAGE_SIZE) -> np.ndarray:
    """(N, 1280) ImageNet embeddings of `photos`, computing only the new ones."""
    path = get_settings().artifact_dir / "embeddings" / f"imagenet-{size}.npz"
    return _cached(path, photos, _imagenet_model, size)


def run_embeddings(
    run: TrainingRun, photos: list[Photo], model: nn.Module | None = None
) -> np.ndarray:
    """(N, 1280) embeddings of `photos` by run `run`'s fine-tuned network."""
    if run.artifact_path is None:
        raise ValueError(f"run {run.id} has no saved model to embed with")
    path = Path(run.artifact_path).with_name("embeddings.npz")

    def model_fn():
        if model is not None:
            return model
        return load_weights(run.artifact_path, len(run.classes)).to(get_device())

    with torch.inference_mode():
        return _cached(path, photos, model_fn, run.config.get("image_size", IMAGE_SIZE))
