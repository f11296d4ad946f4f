"""One settings object for paths and the database URL, read from the environment.

Relative paths are resolved against the project root, so the app behaves the
same whichever folder it is started from.
"""

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _resolve(value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (PROJECT_ROOT / path).resolve()


@dataclass(frozen=True)
class Settings:
    """Where photos are read from and where the app writes.

    Attributes:
        data_dir: class-folder photo set with `train/` (the labelling pool)
            and optionally `test/` (the frozen holdout).
        database_url: SQLAlchemy URL; SQLite is the supported backend.
        artifact_dir: trained models, exports and thumbnails.
    """

    data_dir: Path
    database_url: str
    artifact_dir: Path

    @classmethod
    def from_env(cls) -> "Settings":
        data_dir = _resolve(os.environ.get("DATA_DIR", "../shared/data/seefood"))
        artifact_dir = _resolve(os.environ.get("ARTIFACT_DIR", "data/artifacts"))
        url = os.environ.get("DATABASE_URL")
        if not url:
            url = f"sqlite:///{_resolve('data/studio.db')}"
        return cls(data_dir=data_dir, database_url=url, artifact_dir=artifact_dir)


def get_settings() -> Settings:
    """Settings from the environment, read on every call so tests can change it."""
    return Settings.from_env()
