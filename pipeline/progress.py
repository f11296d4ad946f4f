"""A small interface between long-running work and whoever watches it."""

from collections.abc import Callable


class Progress:
    """Called as `progress(fraction, message)`; returns True once cancelled.

    `on_update` receives each report and returns True when the work should
    stop; a job worker uses it to write the job row and read its cancel flag.
    """

    def __init__(self, on_update: Callable[[float, str], bool] | None = None):
        self.on_update = on_update
        self.cancelled = False
        self.fraction = 0.0
        self.message = ""

    def __call__(self, fraction: float, message: str) -> bool:
        self.fraction = min(max(fraction, 0.0), 1.0)
        self.message = message
        if self.on_update is not None and self.on_update(self.fraction, message):
            self.cancelled = True
        return self.cancelled


null_progress = Progress()
