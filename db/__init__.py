"""Storage for Seefood Studio: settings, ORM models and the engine.

Nothing here imports `pipeline` or `dashboard`; they import from here.
"""

from db.engine import create_db_engine, get_engine, session_scope
from db.models import (
    Base,
    Export,
    Job,
    LabelEvent,
    Photo,
    Prediction,
    SkippedFile,
    TrainingRun,
)
from db.settings import Settings, get_settings

__all__ = [
    "Base",
    "Export",
    "Job",
    "LabelEvent",
    "Photo",
    "Prediction",
    "Settings",
    "SkippedFile",
    "TrainingRun",
    "create_db_engine",
    "get_engine",
    "get_settings",
    "session_scope",
]
