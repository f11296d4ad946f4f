"""Grad-CAM maps and their overlays (pipeline/heatmap.py), on tiny inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.heatmap import HEAT_ALPHA, MARGIN_DIMMING, colourize, grad_cam, overlay
from pipeline.images import load_rgb, preprocess
from pipeline.model import create_model
from tests.conftest import real_photos


@pytest.fixture(scope="module")
def fresh_head_model():
    # ImageNet weights: a randomly initialised body drives activations into
    # denormal floats at small sizes, which makes every pass seconds slow.
    torch.manual_seed(0)
    return create_model(num_classes=3).eval()


def test_colours_run_from_blue_to_red():
    colours = colourize(np.array([[0.0, 0.5, 1.0]]))
    assert colours.shape == (1, 3, 3)
    assert colours[0].tolist() == [[0, 0, 255], [0, 255, 0], [255, 0, 0]]


@pytest.mark.parametrize("size", [(60, 40), (40, 60), (50, 50)])
def test_overlay_keeps_the_size_and_dims_only_the_cropped_margins(size):
    grey = Image.new("RGB", size, (100, 100, 100))
    cam = np.zeros((8, 8), np.float32)
    cam[:4, :4] = 1.0  # hot in the top-left quarter of what the model saw

    painted = np.asarray(overlay(grey, cam), np.float32)

    assert painted.shape == (size[1], size[0], 3)
    side = min(size)
    left, top = (size[0] - side) // 2, (size[1] - side) // 2
    dimmed = round(100 * MARGIN_DIMMING)
    if left:
        assert (painted[:, :left] == dimmed).all()
    if top:
        assert (painted[:top] == dimmed).all()
    hot = painted[top + 2, left + 2]
    cold = painted[top + side - 2, left + side - 2]
    assert hot.tolist() == pytest.approx(
        [(1 - HEAT_ALPHA) * 100 + HEAT_ALPHA * 255, *[(1 - HEAT_ALPHA) * 100] * 2],
        abs=1,
    )
    assert cold.tolist() == pytest.approx(
        [*[(1 - HEAT_ALPHA) * 100] * 2, (1 - HEAT_ALPHA) * 100 + HEAT_ALPHA * 255],
        abs=1,
    )


def test_grad_cam_explains_the_predicted_class_unless_told(fresh_head_model):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    with torch.no_grad():
        logits = fresh_head_model(torch.from_numpy(preprocess(image, 64))[None])
    probs = torch.softmax(logits, dim=1)[0]

    predicted = grad_cam(fresh_head_model, image, size=64)

    assert predicted.class_index == int(probs.argmax())
    assert predicted.probability == pytest.approx(float(probs.max()), rel=1e-5)
    assert predicted.cam.shape == (64, 64) and predicted.cam.dtype == np.float32
    assert predicted.cam.min() >= 0.0 and predicted.cam.max() <= 1.0
    other = (predicted.class_index + 1) % 3
    assert (
        grad_cam(fresh_head_model, image, size=64, class_index=other).class_index
        == other
    )
    # The shared model's weights are left without gradients.
    assert all(p.grad is None for p in fresh_head_model.parameters())


def test_grad_cam_matches_a_hook_on_bn2_with_a_full_backward(fresh_head_model):
    model = fresh_head_model
    [path] = real_photos("train", "hot_dog", 1)
    image = load_rgb(path)
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["features"] = output

    handle = model.bn2.register_forward_hook(keep)
    try:
        logits = model(torch.from_numpy(preprocess(image, 128))[None])
        predicted = int(logits.argmax())
        logits[0, predicted].backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    features = captured["features"]  # (1, 1280, 4, 4)
    weights = features.grad.mean(dim=(2, 3), keepdim=True)
    expected = torch.relu((weights * features).sum(dim=1, keepdim=True)).detach()
    expected = F.interpolate(expected, size=(128, 128), mode="bilinear")[0, 0]
    assert expected.max() > expected.min()
    expected = (expected - expected.min()) / (expected.max() - expected.min())

    result = grad_cam(model, image, size=128)

    assert result.class_index == predicted
    np.testing.assert_allclose(result.cam, expected.numpy(), atol=1e-5)
