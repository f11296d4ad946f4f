from pathlib import Path

import pytest
from sqlalchemy import select

from db.engine import get_engine, session_scope
from db.models import CONFIRMED, EXCLUDED, UNREVIEWED, LabelEvent, Photo
from tests.conftest import resized_copy
from tests.dashboard.conftest import open_page

NEAR_LEAK = "**Near copies** · pool and holdout · difference hash 0 bits apart"
EXACT_LEAK = "**Exact copies** · pool and holdout · identical bytes (SHA-256)"


@pytest.fixture
def copies(small_set) -> Path:
    """small_set plus two pool hot dogs copied into the holdout: the first one
    at half size (a near copy), the second byte for byte (skipped at import)."""
    pool = sorted((small_set / "train" / "hot_dog").glob("*.jpg"))
    resized_copy(pool[0], small_set / "test" / "hot_dog" / "smaller.jpg")
    (small_set / "test" / "hot_dog" / "same.jpg").write_bytes(pool[1].read_bytes())
    return small_set


def pool_hot_dog(root: Path, position: int) -> Path:
    return sorted((root / "train" / "hot_dog").glob("*.jpg"))[position]


def photo(path: Path) -> Photo:
    with session_scope(get_engine()) as session:
        return session.scalars(select(Photo).where(Photo.path == str(path))).one()


def events() -> list[tuple[int, str, str]]:
    with session_scope(get_engine()) as session:
        rows = session.scalars(select(LabelEvent).order_by(LabelEvent.id))
        return [(e.photo_id, e.new_status, e.source) for e in rows]


def cards(app) -> dict[str, list[str]]:
    """Each pair's card: its heading → every markdown and caption text in it."""

    def texts(block) -> list[str]:
        found = []
        for child in block.children.values():
            if child.type in ("markdown", "caption"):
                found.append(child.value)
            elif hasattr(child, "children"):
                found.extend(texts(child))
        return found

    shown = {}
    for block in app.main.children.values():
        inside = texts(block) if hasattr(block, "children") else []
        if inside and inside[0].startswith(("**Exact copies**", "**Near copies**")):
            shown[inside[0]] = inside
    return shown


def test_an_exact_copy_in_the_holdout_is_shown_side_by_side(copies):
    app = open_page("duplicates")

    assert not app.exception
    original = photo(pool_hot_dog(copies, 1))
    card = cards(app)[EXACT_LEAK]
    assert "**pool** · hot_dog · unreviewed" in card
    assert f"{original.path}  \n#{original.id} · 512×512 px · version 1" in card
    assert "**holdout** folder · hot_dog" in card
    copy = copies / "test" / "hot_dog" / "same.jpg"
    assert f"{copy}  \nskipped at import: same bytes as the other file" in card
    assert any(text.startswith("Only one copy was imported") for text in card)
    # A picture per copy, in both cards: the exact pair and the near one.
    assert len(app.image) == 4
    # Nothing to decide on the exact pair: the near pair's pool copy is the
    # only one with an Exclude button.
    pool_copy = photo(pool_hot_dog(copies, 0))
    near_copy = photo(copies / "test" / "hot_dog" / "smaller.jpg")
    excludes = [b.key for b in app.button if b.key.startswith("duplicates-exclude")]
    pair = f"{pool_copy.id}-{near_copy.id}"
    assert excludes == [f"duplicates-exclude-{pair}-{pool_copy.id}"]


def test_exclude_the_pool_copy_of_a_holdout_photo(copies):
    app = open_page("duplicates")
    pool_copy = photo(pool_hot_dog(copies, 0))
    near_copy = photo(copies / "test" / "hot_dog" / "smaller.jpg")
    card = cards(app)[NEAR_LEAK]
    assert "**pool** · hot_dog · unreviewed" in card
    assert "**holdout** · hot_dog · frozen" in card
    assert (app.metric[2].label, app.metric[2].value) == ("To decide", "1")
    assert app.warning[0].value.startswith("1 pool photo has a copy in the holdout.")

    pair = f"{pool_copy.id}-{near_copy.id}"
    app.button(key=f"duplicates-exclude-{pair}-{pool_copy.id}").click().run()

    assert not app.exception
    assert app.success[0].value == f"Photo #{pool_copy.id} is excluded now."
    assert photo(pool_hot_dog(copies, 0)).status == EXCLUDED
    assert photo(copies / "test" / "hot_dog" / "smaller.jpg").status == UNREVIEWED
    assert events() == [(pool_copy.id, EXCLUDED, "duplicates")]
    card = cards(app)[NEAR_LEAK]
    assert "**pool** · hot_dog · excluded" in card
    assert "Decided: a copy is excluded and no longer trains." in card
    assert app.metric[2].value == "0"
    assert not app.warning
    assert app.button(key=f"duplicates-restore-{pair}-{pool_copy.id}")

    app.toggle(key="duplicates_undecided").set_value(True).run()
    assert not cards(app)
    assert app.info[0].value == "No duplicate pairs to decide."


def test_keep_both_confirms_the_pool_copies(small_set):
    pool = sorted((small_set / "train" / "not_hot_dog").glob("*.jpg"))
    resized_copy(pool[0], small_set / "train" / "not_hot_dog" / "smaller.jpg")
    app = open_page("duplicates")
    first = photo(pool[0])
    second = photo(small_set / "train" / "not_hot_dog" / "smaller.jpg")
    key = f"duplicates-keep-{first.id}-{second.id}"

    app.button(key=key).click().run()

    assert not app.exception
    assert app.success[0].value == (
        f"Kept both: confirmed the label of #{first.id} and #{second.id}."
    )
    assert photo(pool[0]).status == CONFIRMED
    assert events() == [
        (first.id, CONFIRMED, "duplicates"),
        (second.id, CONFIRMED, "duplicates"),
    ]
    assert app.button(key=key).disabled


def test_embeddings_are_compared_only_when_asked(copies, workspace):
    cache = workspace / "artifacts" / "embeddings"
    app = open_page("duplicates")
    assert not app.exception
    assert not cache.exists()
    assert not any("cosine" in heading for heading in cards(app))

    app.toggle(key="duplicates_embeddings").set_value(True).run()

    assert not app.exception
    assert list(cache.glob("imagenet-*.npz"))
    near = [h for h in cards(app) if h.startswith("**Near copies** · pool and holdout")]
    assert len(near) == 1
    assert near[0].startswith(NEAR_LEAK + "; ImageNet embeddings 0.9")
    assert near[0].endswith(" cosine")


def test_a_photo_gone_since_import_is_named_when_embedding(copies):
    app = open_page("duplicates")
    gone = pool_hot_dog(copies, 3)
    gone.unlink()

    app.toggle(key="duplicates_embeddings").set_value(True).run()

    assert not app.exception
    [error] = app.error
    assert error.value.startswith("Looking for duplicates failed: ")
    assert str(gone) in error.value
    assert "Turn the embedding comparison off" in error.value
