"""Batch inference with the shared preprocessing, for PyTorch models."""

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.images import IMAGE_SIZE, preprocess_file

logger = logging.getLogger(__name__)


def batched_inputs(paths: Sequence[str | Path], size: int, batch_size: int):
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        yield torch.from_numpy(np.stack([preprocess_file(p, size) for p in chunk]))


@torch.inference_mode()
def run_model(
    model: nn.Module,
    paths: Sequence[str | Path],
    size: int = IMAGE_SIZE,
    batch_size: int = 32,
    fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    tta: bool = False,
) -> np.ndarray:
    """Apply `fn(model, batch)` (default: softmax of the logits) to every photo.

    With `tta`, the output is the mean over the photo and its mirror image.
    """
    fn = fn or (lambda m, x: torch.softmax(m(x), dim=1))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    for batch in batched_inputs(paths, size, batch_size):
        batch = batch.to(device)  # (B, 3, size, size)
        out = fn(model, batch)
        if tta:
            out = (out + fn(model, torch.flip(batch, dims=[3]))) / 2
        outputs.append(out.float().cpu().numpy())
    model.train(was_training)
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outputs)


def predict_probs(model, paths, size=IMAGE_SIZE, batch_size=32, tta=False):
    """Class probabilities, shape (len(paths), num_classes)."""
    return run_model(model, paths, size, batch_size, tta=tta)


def embed(model, paths, size=IMAGE_SIZE, batch_size=32, tta=False):
    """Pooled features before the classifier, shape (len(paths), 1280)."""

    def features(m, x):
        return m.forward_head(m.forward_features(x), pre_logits=True)

    return run_model(model, paths, size, batch_size, fn=features, tta=tta)
