"""Cached photo embeddings: ImageNet features, and each run's own features.

ImageNet embeddings do not depend on any label, so a mislabelled photo cannot
pull them towards its wrong class; they are computed once per photo (keyed by
content hash) and kept on disk. A run's embeddings come from its fine-tuned
network and are kept beside its weights.

The cache holds the raw pooled features of two views of each photo (as is,
and mirrored), shape (2, 1280): training fits the new head on them while the
body is frozen, and scoring uses their mean, L2-normalised. A second cache
holds random crops of each photo, shape (K, 1280), for training only. The
crops are drawn from a generator seeded by the photo's content hash, so a
photo gets the same crops whenever, and with whatever others, it is embedded.
"""

import logging
import os
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from db.models import Photo, TrainingRun
from db.settings import get_settings
from pipeline.images import IMAGE_SIZE, crop_seed
from pipeline.infer import (
    batch_size_for,
    crop_batches,
    pooled_features,
    run_batches,
    run_model,
)
from pipeline.model import create_model, get_device, load_weights

logger = logging.getLogger(__name__)


def normalise(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


@lru_cache(maxsize=1)
def _imagenet_model() -> nn.Module:
    return create_model(None).to(get_device()).eval()


# What reading a damaged or half-written cache file raises.
_UNREADABLE = (OSError, ValueError, KeyError, zipfile.BadZipFile)


def _load_cache(path: Path) -> dict[str, np.ndarray]:
    """The cache at `path`; an unreadable one counts as empty and is rebuilt."""
    if not path.exists():
        return {}
    try:
        with np.load(path) as cache:
            return dict(zip(cache["keys"].tolist(), cache["features"], strict=True))
    except _UNREADABLE as error:
        logger.warning("ignoring unreadable embedding cache %s: %s", path, error)
        return {}


def _save_cache(path: Path, cache: dict[str, np.ndarray]) -> None:
    """Write atomically under a name of this writer's own, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(
        dir=path.parent, prefix=path.stem + ".", suffix=".partial.npz"
    )
    try:
        with os.fdopen(handle, "wb") as out:
            keys = np.array(list(cache), dtype=str)
            np.savez(out, keys=keys, features=np.stack(list(cache.values())))
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def _embed_views(model: nn.Module, paths: list[str], size: int) -> np.ndarray:
    def both_views(m, x):
        views = torch.cat([x, torch.flip(x, dims=[3])])  # (2B, 3, H, W)
        pooled = pooled_features(m, views)
        return torch.stack(pooled.chunk(2), dim=1)  # (B, 2, D)

    # Each photo runs twice (as is and mirrored): half a batch of photos.
    half = max(1, batch_size_for(next(model.parameters()).device) // 2)
    return run_model(model, paths, size, batch_size=half, fn=both_views)


def _embed_crops(
    model: nn.Module, photos: list[Photo], size: int, count: int
) -> np.ndarray:
    """(B, count, D) pooled features of `count` random crops of each photo."""
    batches = crop_batches(
        [p.path for p in photos],
        [crop_seed(p.sha256) for p in photos],
        size,
        count,
        batch_size_for(next(model.parameters()).device),
    )
    pooled = run_batches(model, batches, fn=pooled_features)
    return pooled.reshape(len(photos), count, -1)


def _cached_views(
    path: Path,
    photos: list[Photo],
    model_fn,
    embed,
    n_views: int,
    chunk: int,
    progress=None,
) -> np.ndarray:
    """(N, V, D) raw features of `photos`, computing only the missing ones.

    `embed(model, photos)` computes the (B, V, D) features of a few photos.
    """
    cache = _load_cache(path)
    missing = [p for p in photos if p.sha256 not in cache]
    if missing:
        logger.info("embedding %d photos into %s", len(missing), path.name)
        model = model_fn()
        for start in range(0, len(missing), chunk):
            part = missing[start : start + chunk]
            features = embed(model, part)
            cache.update(zip([p.sha256 for p in part], features, strict=True))
            if progress is not None:
                progress(min(start + chunk, len(missing)) / len(missing))
        _save_cache(path, cache)
    if not photos:
        return np.zeros((0, n_views, 0), dtype=np.float32)
    return np.stack([cache[p.sha256] for p in photos])


def _views_of(size: int):
    def embed(model: nn.Module, photos: list[Photo]) -> np.ndarray:
        return _embed_views(model, [p.path for p in photos], size)

    return embed


def _imagenet_path(size: int) -> Path:
    return get_settings().artifact_dir / "embeddings" / f"imagenet-{size}.npz"


def imagenet_views(
    photos: list[Photo], size: int = IMAGE_SIZE, progress=None
) -> np.ndarray:
    """(N, 2, 1280) raw ImageNet features of each photo and its mirror image."""
    return _cached_views(
        _imagenet_path(size), photos, _imagenet_model, _views_of(size), 2, 64, progress
    )


def _crops_path(size: int, count: int) -> Path:
    return _imagenet_path(size).with_name(f"imagenet-{size}-crops{count}.npz")


def _cached_keys(path: Path) -> set[str]:
    """The photo hashes in the cache at `path`, without reading its features."""
    if not path.exists():
        return set()
    try:
        with np.load(path) as cache:
            return set(cache["keys"].tolist())
    except _UNREADABLE:
        return set()


def uncached_view_count(photos: list[Photo], size: int, crops: int) -> int:
    """How many views `imagenet_view_set(photos, size, crops)` would compute."""
    centre = _cached_keys(_imagenet_path(size))
    count = 2 * sum(p.sha256 not in centre for p in photos)
    if crops:
        cropped = _cached_keys(_crops_path(size, crops))
        count += crops * sum(p.sha256 not in cropped for p in photos)
    return count


def imagenet_crops(
    photos: list[Photo], size: int, count: int, progress=None
) -> np.ndarray:
    """(N, count, 1280) raw ImageNet features of random crops of each photo."""
    path = _crops_path(size, count)

    def embed(model: nn.Module, part: list[Photo]) -> np.ndarray:
        return _embed_crops(model, part, size, count)

    return _cached_views(path, photos, _imagenet_model, embed, count, 8, progress)


def imagenet_view_set(
    photos: list[Photo], size: int, crops: int, progress=None, between=None
) -> np.ndarray:
    """(N, 2 + crops, 1280) ImageNet features of each photo's centre view, its
    mirror image and `crops` random crops, from both caches.

    `progress(fraction)` follows both caches in proportion to their views;
    `between()`, when given, runs after the centre views and before any crop
    is embedded (a place to stop).
    """
    report = progress or (lambda fraction: None)
    share = 2 / (2 + crops)
    views = imagenet_views(photos, size, progress=lambda f: report(share * f))
    if not crops:
        return views
    if between is not None:
        between()
    more = imagenet_crops(
        photos, size, crops, progress=lambda f: report(share + (1 - share) * f)
    )
    return np.concatenate([views, more], axis=1)


def imagenet_embeddings(photos: list[Photo], size: int = IMAGE_SIZE) -> np.ndarray:
    """(N, 1280) unit-length ImageNet embeddings, for ranking and duplicates."""
    return normalise(imagenet_views(photos, size).mean(axis=1))


def run_embeddings(
    run: TrainingRun, photos: list[Photo], model: nn.Module | None = None
) -> np.ndarray:
    """(N, 1280) unit-length embeddings of `photos` by run `run`'s network."""
    if run.artifact_path is None:
        raise ValueError(f"run {run.id} has no saved model to embed with")
    path = Path(run.artifact_path).with_name("embeddings.npz")

    def model_fn():
        if model is not None:
            return model
        return load_weights(run.artifact_path, len(run.classes)).to(get_device())

    size = run.config.get("image_size", IMAGE_SIZE)
    views = _cached_views(path, photos, model_fn, _views_of(size), 2, 64)
    return normalise(views.mean(axis=1))
