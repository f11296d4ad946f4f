"""Try it: the phone app in the browser.

A photo, uploaded or taken from the pool, goes through an exported model file
run by its own runtime (ExecuTorch or onnxruntime), never through PyTorch, so
what shows here is what a phone running that file would answer.
"""

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st
from PIL import Image

from dashboard.components import export_module, format_percent, newest_first_choice
from db.engine import session_scope
from db.models import Export
from pipeline.images import BadImageError, load_rgb
from pipeline.review import list_runs, training_photos

UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp"]
RUNTIMES = {"pte": "ExecuTorch", "onnx": "onnxruntime"}
SOURCES = {"pool": "From the pool", "upload": "Upload a photo"}
POOL_KEY = "try_pool_photo"


@dataclass(frozen=True)
class TriedPhoto:
    """A photo to classify: its file name, pixels and given label (pool only)."""

    name: str
    image: Image.Image
    given_label: str | None = None


def humanise(label: str) -> str:
    """A class name in plain words: "not_hot_dog" -> "Not hot dog"."""
    words = label.replace("_", " ").strip()
    return words[:1].upper() + words[1:]


def _base_format(export: Export) -> str:
    return export.format.removesuffix("_int8")


def _is_int8(export: Export) -> bool:
    return export.format.endswith("_int8")


def _export_label(export: Export) -> str:
    """How an export is named in the choice: id, format, precision, run, accuracy."""
    accuracy = format_percent((export.checks or {}).get("accuracy_holdout"))
    precision = "int8" if _is_int8(export) else "fp32"
    return (
        f"export #{export.id} · {_base_format(export)} · {precision} · "
        f"run #{export.run_id} · holdout {accuracy}"
    )


def _pick_random(photo_ids: list[int]) -> None:
    st.session_state[POOL_KEY] = random.choice(photo_ids)


def _pool_photo(pool: list) -> TriedPhoto | None:
    """The pool photo picked by name or at random, or None before a pick.

    Only an id is picked; the file's path comes from the database.
    """
    if not pool:
        st.info("No pool photos to try: upload a photo instead.")
        return None
    by_id = {row.id: row for row in pool}
    columns = st.columns([4, 1], vertical_alignment="bottom")
    photo_id = columns[0].selectbox(
        "Pool photo",
        list(by_id),
        index=None,
        format_func=lambda i: (
            f"{Path(by_id[i].path).name} · given {humanise(by_id[i].label)}"
        ),
        placeholder="Pick a photo by file name",
        key=POOL_KEY,
    )
    columns[1].button(
        "Random pool photo",
        key="try_random",
        on_click=_pick_random,
        args=(list(by_id),),
    )
    if photo_id is None:
        return None
    row = by_id[photo_id]
    try:
        image = load_rgb(row.path)
    except BadImageError as error:
        st.error(str(error))
        return None
    return TriedPhoto(Path(row.path).name, image, row.label)


def _uploaded_photo() -> TriedPhoto | None:
    """The uploaded photo, or None; an unreadable file is named."""
    upload = st.file_uploader("Photo file", type=UPLOAD_TYPES, key="try_upload")
    if upload is None:
        return None
    # Decoded from a file so the same rules apply as everywhere else
    # (EXIF orientation, RGB conversion, decompression-bomb limit).
    with tempfile.NamedTemporaryFile(suffix=Path(upload.name).suffix) as handle:
        handle.write(upload.getvalue())
        handle.flush()
        try:
            image = load_rgb(handle.name)
        except BadImageError as error:
            # The message names the temporary file; name the upload instead.
            st.error(f"{upload.name}: {str(error).split(': ', 1)[-1]}")
            return None
    return TriedPhoto(upload.name, image)


def _show_answer(
    exporting, export: Export, classes: list[str], photo: TriedPhoto
) -> str | None:
    """Run the exported file on `photo` and show its answer; return the label."""
    model = Path(export.path)
    if not model.is_file():
        st.error(
            f"The model file {model} of export #{export.id} is missing; "
            "export the run again on the Export page."
        )
        return None
    try:
        with st.spinner(f"Running {model.name}…"):
            label, confidence, probs = exporting.predict_with_export(
                export, photo.image
            )
    except (ValueError, OSError, RuntimeError) as error:
        st.error(f"{model.name} could not classify {photo.name}: {error}")
        return None

    base = _base_format(export)
    columns = st.columns([1, 2])
    columns[0].image(photo.image, caption=photo.name, width="stretch")
    with columns[1]:
        st.header(f"{humanise(label)}, {format_percent(confidence)} sure", anchor=False)
        st.caption(
            f"Computed by the exported file {model.name} "
            f"({base}{', int8' if _is_int8(export) else ''}, run by "
            f"{RUNTIMES.get(base, 'its runtime')}), not by PyTorch."
        )
        if len(probs) == len(classes):
            st.dataframe(
                pd.DataFrame(
                    {
                        "class": [humanise(name) for name in classes],
                        "probability": [float(p) for p in probs],
                    }
                ),
                hide_index=True,
                column_config={
                    "probability": st.column_config.ProgressColumn(
                        "probability", format="percent", min_value=0.0, max_value=1.0
                    )
                },
            )
    return label


def try_it_page() -> None:
    st.title("Try it")
    exporting = export_module("Trying exports")

    with session_scope() as session:
        exports = list(exporting.list_exports(session))
        classes_by_run = {run.id: list(run.classes) for run in list_runs(session)}
        pool = training_photos(session)
    if not exports:
        st.info("No exports yet: make one on the Export page, then try it here.")
        st.page_link(
            "views/export.py", label="Go to Export", icon=":material/deployed_code:"
        )
        st.stop()

    export = newest_first_choice("Export", exports, _export_label, key="try_export")
    source = st.radio(
        "Photo",
        list(SOURCES),
        format_func=SOURCES.get,
        horizontal=True,
        key="try_source",
    )
    photo = _uploaded_photo() if source == "upload" else _pool_photo(pool)
    if photo is None:
        return
    label = _show_answer(
        exporting, export, classes_by_run.get(export.run_id, []), photo
    )
    if label is None or photo.given_label is None:
        return
    given = humanise(photo.given_label)
    if label == photo.given_label:
        st.success(f"Given label: {given}. The export agrees.")
    else:
        st.warning(f"Given label: {given}. The export says {humanise(label)} instead.")


try_it_page()
