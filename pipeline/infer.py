"""Batch inference with the shared preprocessing, for PyTorch models."""

import ctypes
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.images import (
    IMAGE_SIZE,
    crop_seed,
    load_rgb,
    preprocess_file,
    random_crop,
    to_array,
)

logger = logging.getLogger(__name__)

# Photos per forward pass. On CPU, larger batches are slower, not faster: their
# activations grow past what the allocator keeps for reuse, and are mapped
# afresh, page by page, on every pass. Measured at 224 px on 2 cores, with
# `keep_freed_memory`: 4 photos a pass run 94 photos a second, 8 run 64, 48
# run 30.
BATCH_SIZE = 4
GPU_BATCH_SIZE = 64
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, malloc.h


def batch_size_for(device: torch.device) -> int:
    return BATCH_SIZE if device.type == "cpu" else GPU_BATCH_SIZE


@cache
def keep_freed_memory() -> None:
    """Let glibc's allocator reuse freed blocks of up to 32 MB (once per process).

    By default it returns large freed blocks to the system at once, so each
    forward pass takes its activations as fresh pages from the kernel: on CPU
    that doubled the time of embedding a photo set, half of it in the
    kernel. Elsewhere than glibc this does nothing.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError) as error:
        logger.debug("allocator left as it is: %s", error)


def batched_inputs(paths: Sequence[str | Path], size: int, batch_size: int):
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        yield torch.from_numpy(np.stack([preprocess_file(p, size) for p in chunk]))


def crop_batches(
    paths: Sequence[str | Path],
    seeds: Sequence[int],
    size: int,
    count: int,
    batch_size: int,
):
    """Batches of `count` random crops of each photo, in order, photo by photo.

    A photo's crops are drawn from a generator seeded by its entry of `seeds`,
    so they are the same whichever photos are drawn beside it.
    """
    crops = []
    for path, seed in zip(paths, seeds, strict=True):
        image = load_rgb(path)
        rng = np.random.default_rng(seed)
        for _ in range(count):
            crops.append(to_array(random_crop(image, size, rng)))
            if len(crops) == batch_size:
                yield torch.from_numpy(np.stack(crops))
                crops = []
    if crops:
        yield torch.from_numpy(np.stack(crops))


def pooled_features(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The pooled features the classifier reads, shape (B, 1280)."""
    return model.forward_head(model.forward_features(batch), pre_logits=True)


@torch.inference_mode()
def run_batches(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    tta: bool = False,
) -> np.ndarray:
    """Apply `fn(model, batch)` (default: softmax of the logits) to each batch.

    With `tta`, the output is the mean over the batch and its mirror image.
    The model runs in eval mode and is put back in the mode it was in.
    """
    keep_freed_memory()
    fn = fn or (lambda m, x: torch.softmax(m(x), dim=1))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    for batch in batches:
        batch = batch.to(device)  # (B, 3, size, size)
        out = fn(model, batch)
        if tta:
            out = (out + fn(model, torch.flip(batch, dims=[3]))) / 2
        outputs.append(out.float().cpu().numpy())
    model.train(was_training)
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outputs)


def run_model(
    model: nn.Module,
    paths: Sequence[str | Path],
    size: int = IMAGE_SIZE,
    batch_size: int | None = None,
    fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    tta: bool = False,
) -> np.ndarray:
    """`run_batches` over the photos at `paths`, preprocessed a batch at a time.

    `batch_size` defaults to what suits the model's device.
    """
    device = next(model.parameters()).device
    batch_size = batch_size or batch_size_for(device)
    return run_batches(model, batched_inputs(paths, size, batch_size), fn, tta)


def predict_probs(
    model: nn.Module,
    paths: Sequence[str | Path],
    size: int = IMAGE_SIZE,
    batch_size: int | None = None,
    tta: bool = False,
    crops: int = 0,
    crop_seeds: Sequence[int] | None = None,
) -> np.ndarray:
    """Class probabilities, shape (len(paths), num_classes).

    With `tta`, each photo's probabilities are the mean over its centre view
    and mirror image and, when `crops` is above 0, as many random crops drawn
    with the photo's entry of `crop_seeds`: every view counts the same.
    """
    probs = run_model(model, paths, size, batch_size, tta=tta)
    if not (tta and crops and len(paths)):
        return probs
    if crop_seeds is None or len(crop_seeds) != len(paths):
        raise ValueError("crop test-time augmentation needs one crop seed per photo")
    device = next(model.parameters()).device
    batches = crop_batches(
        paths, crop_seeds, size, crops, batch_size or batch_size_for(device)
    )
    crop_probs = run_batches(model, batches).reshape(len(paths), crops, -1)
    return (2 * probs + crop_probs.sum(axis=1)) / (2 + crops)


def predict_photos(
    model: nn.Module, photos: Sequence, size: int, tta: bool, crops: int
) -> np.ndarray:
    """`predict_probs` of photo records (each with `path` and `sha256`), every
    photo's crops drawn with the seed of its content (`crop_seed`)."""
    return predict_probs(
        model,
        [p.path for p in photos],
        size,
        tta=tta,
        crops=crops,
        crop_seeds=[crop_seed(p.sha256) for p in photos],
    )


def embed(model, paths, size=IMAGE_SIZE, batch_size=None, tta=False):
    """Pooled features before the classifier, shape (len(paths), 1280)."""
    return run_model(model, paths, size, batch_size, fn=pooled_features, tta=tta)
