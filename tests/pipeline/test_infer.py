import numpy as np
import pytest

from pipeline.images import load_rgb, random_crop
from pipeline.infer import predict_probs
from pipeline.model import create_model
from pipeline.train import seed_everything
from tests.conftest import real_photos

SIZE = 64


def test_crop_augmentation_averages_every_view_alike(tmp_path):
    [photo] = real_photos("test", "hot_dog", 1)
    seed_everything(1)
    model = create_model(2).eval()
    seed, count = 12345, 3

    # The crops, drawn here with the same seed and scored one file each.
    rng = np.random.default_rng(seed)
    files = []
    for i in range(count):
        files.append(tmp_path / f"crop{i}.png")
        random_crop(load_rgb(photo), SIZE, rng).save(files[-1])
    crops = predict_probs(model, files, SIZE)
    centre_and_mirror = predict_probs(model, [photo], SIZE, tta=True)[0]
    expected = (2 * centre_and_mirror + crops.sum(axis=0)) / (2 + count)

    got = predict_probs(model, [photo], SIZE, tta=True, crops=count, crop_seeds=[seed])[
        0
    ]
    assert np.allclose(got, expected, atol=1e-5)
    assert not np.allclose(got, centre_and_mirror, atol=1e-4)
    # Without test-time augmentation the crops are not used.
    plain = predict_probs(model, [photo], SIZE, crops=count, crop_seeds=[seed])
    assert np.allclose(plain, predict_probs(model, [photo], SIZE))


def test_crop_augmentation_needs_a_seed_per_photo():
    photos = real_photos("test", "hot_dog", 2)
    model = create_model(2).eval()
    with pytest.raises(ValueError, match="one crop seed per photo"):
        predict_probs(model, photos, SIZE, tta=True, crops=2, crop_seeds=[1])
