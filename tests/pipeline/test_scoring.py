import numpy as np
from sqlalchemy import select

from db.engine import session_scope
from db.labels import apply_action
from db.models import POOL, Photo, Prediction, TrainingRun
from pipeline.duplicates import EXACT, find_duplicates
from pipeline.embeddings import imagenet_embeddings
from pipeline.ingest import ingest_folder
from pipeline.scoring import oof_probabilities, score_run
from tests.conftest import make_photo_set

FLIPPED = (1, 14)  # positions in the pool, one per class


def _pool(session):
    return list(
        session.scalars(select(Photo).where(Photo.split == POOL).order_by(Photo.id))
    )


def _flip(session, photos):
    for position in FLIPPED:
        photo = photos[position]
        other = "not_hot_dog" if photo.label == "hot_dog" else "hot_dog"
        apply_action(session, photo.id, "relabel", new_label=other)


def test_flipped_labels_rank_above_the_rest(engine, workspace):
    data = make_photo_set(workspace / "photos", train_per_class=12, test_per_class=0)
    with session_scope(engine) as session:
        ingest_folder(session, data)
        photos = _pool(session)
        _flip(session, photos)
        labels = np.array([p.label == "not_hot_dog" for p in photos], dtype=int)
        probs = oof_probabilities(
            imagenet_embeddings(photos), labels, np.ones(len(photos), bool), 2, folds=5
        )
    scores = 1 - probs[np.arange(len(photos)), labels]
    top = set(np.argsort(-scores)[: len(FLIPPED)].tolist())
    assert top == set(FLIPPED)


def test_a_relabel_changes_the_ranking(engine, workspace):
    data = make_photo_set(workspace / "photos", train_per_class=12, test_per_class=0)
    with session_scope(engine) as session:
        ingest_folder(session, data)
        photos = _pool(session)
        _flip(session, photos)
        run = TrainingRun(
            config={"folds": 5, "seed": 0},
            classes=["hot_dog", "not_hot_dog"],
            status="done",
        )
        session.add(run)
        session.flush()
        score_run(session, run, thorough=False)

        def ranking():
            rows = session.scalars(
                select(Prediction)
                .where(Prediction.run_id == run.id)
                .order_by(Prediction.score.desc())
            )
            return [(row.photo_id, round(row.score, 4)) for row in rows]

        before = ranking()
        worst = before[0][0]
        assert worst in {photos[i].id for i in FLIPPED}
        # The reviewer puts the worst photo's label right; it sinks.
        photo = session.get(Photo, worst)
        apply_action(session, worst, "relabel", new_label=photo.original_label)
        score_run(session, run, thorough=False)
        after = ranking()
        assert [pid for pid, _ in after].index(worst) > len(FLIPPED)
        assert dict(after)[worst] < 0.5 < dict(before)[worst]


def test_a_copy_in_the_holdout_is_a_cross_split_duplicate(engine, small_set):
    source = sorted((small_set / "train" / "not_hot_dog").glob("*.jpg"))[2]
    copy = small_set / "test" / "not_hot_dog" / "same as pool.jpg"
    copy.write_bytes(source.read_bytes())
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        pairs = find_duplicates(session)
    exact = [p for p in pairs if p.kind == EXACT]
    assert len(exact) == 1
    assert exact[0].cross_split and exact[0].second_path == str(copy)
    assert exact[0].first_path.endswith(source.name)
    assert not [p for p in pairs if p.kind != EXACT and p.cross_split]
