"""Seefood Studio dashboard: `streamlit run dashboard/app.py`.

Sets up the page, imports the photo folder once per process, marks jobs
whose workers died, and hands over to the page the user picked.
"""

import logging
import sys
from pathlib import Path

import streamlit as st
from sqlalchemy.exc import OperationalError

# `streamlit run` puts only this file's folder on sys.path; the pages import
# the project's packages (db, pipeline, dashboard) from the folder above it.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from db.engine import get_engine, session_scope  # noqa: E402
from db.settings import get_settings  # noqa: E402
from pipeline.ingest import ingest_folder  # noqa: E402
from pipeline.jobs import reap_dead_jobs  # noqa: E402

logger = logging.getLogger("dashboard")

# Not "pages/": with a pages/ folder beside the entry point, Streamlit runs a
# process's first request in its older folder-based mode, which runs the
# requested page without this file (no sys.path, no photo import).
PAGES_DIR = Path(__file__).parent / "views"


@st.cache_resource
def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@st.cache_resource(show_spinner="Importing photos…")
def prepare_database(database_url: str, data_dir: str) -> str:
    """Create the tables and import `data_dir`; cached per database and folder.

    Importing is idempotent by content hash, so a restart only adds new files.
    """
    engine = get_engine(database_url)
    with session_scope(engine) as session:
        report = ingest_folder(session, data_dir)
    logger.info("photo folder %s: %s", data_dir, report.summary())
    return report.summary()


def main() -> None:
    st.set_page_config(page_title="Seefood Studio", page_icon="🌭", layout="wide")
    configure_logging()
    settings = get_settings()

    try:
        get_engine(settings.database_url)
    except ValueError as error:
        st.error(str(error))
        st.stop()
    try:
        prepare_database(settings.database_url, str(settings.data_dir))
    except (FileNotFoundError, ValueError) as error:
        st.error(
            f"Could not import photos from DATA_DIR={settings.data_dir}: {error}. "
            "Pages show what the database already holds."
        )
    except OperationalError as error:
        # Most often a database file made by an older version of the tables.
        st.error(
            f"The database {settings.database_url} cannot be used: {error.orig}. "
            "Point DATABASE_URL at a new file, or move this one aside."
        )
        st.stop()
    with session_scope() as session:
        reap_dead_jobs(session)

    page = st.navigation(
        [
            st.Page(
                PAGES_DIR / "overview.py",
                title="Overview",
                icon=":material/dashboard:",
                default=True,
            ),
            st.Page(
                PAGES_DIR / "review.py", title="Review", icon=":material/rate_review:"
            ),
            st.Page(PAGES_DIR / "label.py", title="Label", icon=":material/label:"),
            st.Page(
                PAGES_DIR / "duplicates.py",
                title="Duplicates",
                icon=":material/content_copy:",
            ),
            st.Page(
                PAGES_DIR / "train.py", title="Train", icon=":material/model_training:"
            ),
            st.Page(
                PAGES_DIR / "export.py", title="Export", icon=":material/deployed_code:"
            ),
            st.Page(
                PAGES_DIR / "try_it.py", title="Try it", icon=":material/photo_camera:"
            ),
            st.Page(
                PAGES_DIR / "history.py", title="History", icon=":material/history:"
            ),
        ]
    )
    page.run()


main()
