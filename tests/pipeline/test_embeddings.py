import numpy as np
import pytest
from sqlalchemy import select

import pipeline.embeddings
from db.engine import session_scope
from db.models import POOL, Photo
from pipeline.embeddings import imagenet_crops, imagenet_views
from pipeline.ingest import ingest_folder

SIZE = 64


def _pool(session) -> list[Photo]:
    query = select(Photo).where(Photo.split == POOL).order_by(Photo.id)
    return list(session.scalars(query))


def test_a_photos_crops_do_not_depend_on_its_company_and_are_cached(
    engine, small_set, monkeypatch
):
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        photos = _pool(session)
        some = imagenet_crops(photos[:3], SIZE, 3)
        assert some.shape == (3, 3, 1280)
        # Embedded later, in another order and with other photos, the same
        # photo gets the same crops.
        rest = imagenet_crops(photos[::-1], SIZE, 3)
        assert np.allclose(rest[::-1][:3], some, atol=1e-5)
        # The crops differ from each other and from the centre view.
        assert not np.allclose(some[:, 0], some[:, 1], atol=1e-3)
        centre = imagenet_views(photos[:3], SIZE)
        assert not np.allclose(centre[:, 0], some[:, 0], atol=1e-3)

        # Everything is cached now: asking again embeds nothing.
        def refuse(*args):
            raise AssertionError("embedded a photo that was cached")

        monkeypatch.setattr(pipeline.embeddings, "_embed_crops", refuse)
        assert np.array_equal(imagenet_crops(photos[:3], SIZE, 3), some)
        # Another number of crops is another cache.
        with pytest.raises(AssertionError, match="was cached"):
            imagenet_crops(photos[:3], SIZE, 2)
