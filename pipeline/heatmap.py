"""Grad-CAM heat maps: which part of a photo drove the run's prediction.

For the run's EfficientNet-Lite0, Grad-CAM weighs the channels of the last
convolutional block's output (`conv_head` -> `bn2`, which `forward_features`
returns) by the mean gradient of the predicted class's logit, sums them and
keeps the positive part. The head after `bn2` is global pooling and a linear
layer, so that gradient only needs the head: the body runs without autograd,
no hook is registered on the shared model, and concurrent callers (one thread
per dashboard session) cannot see each other's activations.

The map covers what the model saw, the centre square of the photo
(`pipeline.images.preprocess`); the overlay paints it on the full upright photo
and dims the margins the crop left out. Overlays are cached per run and photo
under ARTIFACT_DIR/heatmaps/.
"""

import logging
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from db.models import TrainingRun
from db.settings import get_settings
from pipeline.images import IMAGE_SIZE, load_rgb, preprocess
from pipeline.model import load_weights

logger = logging.getLogger(__name__)

# How strongly the heat colours cover the photo, and how dark the margins the
# model never saw become.
HEAT_ALPHA = 0.45
MARGIN_DIMMING = 0.35

# Colour stops of the heat scale, from cold (0) to hot (1): blue, cyan, green,
# yellow, red.
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array(
    [[0, 0, 255], [0, 255, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0]],
    dtype=np.float32,
)


@dataclass(frozen=True)
class GradCam:
    """A class-activation map at the model's input size, in [0, 1]."""

    cam: np.ndarray  # (size, size) float32
    class_index: int
    probability: float


@lru_cache(maxsize=2)
def _load_model(artifact_path: str, num_classes: int) -> nn.Module:
    return load_weights(artifact_path, num_classes)


def load_run_model(run: TrainingRun) -> nn.Module:
    """The run's model in eval mode, loaded once per process.

    Raises:
        FileNotFoundError: the run has no saved weights, or the file is gone.
    """
    if not run.artifact_path or not Path(run.artifact_path).is_file():
        raise FileNotFoundError(
            f"run {run.id} has no model file ({run.artifact_path}); retrain it"
        )
    return _load_model(run.artifact_path, len(run.classes))


def run_image_size(run: TrainingRun) -> int:
    return int((run.config or {}).get("image_size", IMAGE_SIZE))


def grad_cam(
    model: nn.Module, image: Image.Image, size: int, class_index: int | None = None
) -> GradCam:
    """Grad-CAM of `class_index` (default: the predicted class) for one photo.

    Args:
        model: a timm EfficientNet in eval mode.
        image: the upright RGB photo; it is preprocessed here.
        size: the run's input size.
    """
    batch = torch.from_numpy(preprocess(image, size))[None]  # (1, 3, size, size)
    with torch.no_grad():
        features = model.forward_features(batch)  # (1, C, h, w), after bn2
    features.requires_grad_(True)
    with torch.enable_grad():
        logits = model.forward_head(features)  # (1, num_classes)
        if class_index is None:
            class_index = int(logits.argmax(dim=1))
        (gradient,) = torch.autograd.grad(logits[0, class_index], features)

    weights = gradient.mean(dim=(2, 3), keepdim=True)  # (1, C, 1, 1)
    cam = torch.relu((weights * features.detach()).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(
        cam, size=(size, size), mode="bilinear", align_corners=False
    )[0, 0]  # (size, size)
    low, high = float(cam.min()), float(cam.max())
    if high - low > 1e-12:
        cam = (cam - low) / (high - low)
    else:
        cam = torch.zeros_like(cam)
    probability = float(torch.softmax(logits.detach(), dim=1)[0, class_index])
    return GradCam(cam.numpy().astype(np.float32), class_index, probability)


def colourize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as heat colours, (H, W) -> (H, W, 3) float32 RGB."""
    flat = np.clip(values, 0.0, 1.0).ravel()
    channels = [np.interp(flat, _STOPS, _COLOURS[:, c]) for c in range(3)]
    return np.stack(channels, axis=1).reshape(*values.shape, 3).astype(np.float32)


def _crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The square of the photo that `preprocess`'s centre crop keeps."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def overlay(image: Image.Image, cam: np.ndarray) -> Image.Image:
    """`cam` painted over the part of `image` the model saw; same size as `image`."""
    photo = np.asarray(image, dtype=np.float32)  # (H, W, 3)
    left, top, right, bottom = _crop_box(image.width, image.height)
    heat = Image.fromarray((cam * 255).astype(np.uint8), mode="L").resize(
        (right - left, bottom - top), Image.Resampling.BILINEAR
    )
    colours = colourize(np.asarray(heat, dtype=np.float32) / 255.0)

    blended = photo * MARGIN_DIMMING
    seen = photo[top:bottom, left:right]
    blended[top:bottom, left:right] = (1 - HEAT_ALPHA) * seen + HEAT_ALPHA * colours
    return Image.fromarray(np.clip(blended, 0, 255).round().astype(np.uint8), "RGB")


def heatmap_path(run_id: int, sha256: str) -> Path:
    return get_settings().artifact_dir / "heatmaps" / f"run-{run_id}" / f"{sha256}.jpg"


def heatmap_overlay(run: TrainingRun, path: str | Path, sha256: str) -> Path:
    """The run's Grad-CAM overlay of one photo as a JPEG, made once per run.

    Raises:
        BadImageError: the photo cannot be decoded.
        FileNotFoundError: the run's model file is missing.
    """
    target = heatmap_path(run.id, sha256)
    if target.exists():
        return target
    model = load_run_model(run)
    image = load_rgb(path)
    result = grad_cam(model, image, run_image_size(run))
    picture = overlay(image, result.cam)

    target.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name first, so a half-written file is never served.
    # The name is this thread's own, so two sessions making the same map do
    # not replace each other's half-written file.
    partial = target.with_name(f"{sha256}.{os.getpid()}-{threading.get_ident()}.part")
    picture.save(partial, "JPEG", quality=85)
    partial.replace(target)
    logger.info(
        "heat map of %s for run %s: class %s at %.2f",
        path,
        run.id,
        run.classes[result.class_index],
        result.probability,
    )
    return target
