"""The Review page in a real browser: `streamlit run` plus headless Chromium.

AppTest clicks buttons by calling their callbacks; only a browser shows that a
keyboard shortcut reaches the button. The server runs on a free loopback port
against this test's own copy of the trained database.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from db.engine import get_engine, session_scope
from db.models import LabelEvent, Photo
from tests.dashboard.conftest import APP

CHROMIUM = shutil.which("chromium")
# Flags that let Debian's Chromium run headless in a container, and keep it
# off the network apart from the app under test.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-proxy-server",
]
STARTUP_SECONDS = 45
WAIT_MS = 30_000
CLASSES = ["hot_dog", "not_hot_dog"]
# The caption under each photo: "#<id> · <status> · version <n>".
CARD_CAPTION = re.compile(r"^#(\d+) · (\w+) · version (\d+)$")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (apt-get install chromium; .ci/run does it)",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _healthy(url: str) -> bool:
    # No proxy from the environment: the request must stay on loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@dataclass(frozen=True)
class Server:
    url: str
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture
def server(trained):
    """`streamlit run` on a free loopback port; stopped when the test ends."""
    port = free_port()
    running = Server(url=f"http://127.0.0.1:{port}", log=trained / "streamlit.log")
    command = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", "127.0.0.1",
        "--server.port", str(port),
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    with open(running.log, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=APP.parents[1],
            env=os.environ.copy(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not _healthy(f"{running.url}/_stcore/health"):
            if process.poll() is not None:
                pytest.fail(
                    f"streamlit exited with {process.returncode}:\n{running.log_tail()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"streamlit not healthy after {STARTUP_SECONDS} s:\n"
                    f"{running.log_tail()}"
                )
            time.sleep(0.25)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def get_photo(photo_id: int) -> Photo:
    with session_scope(get_engine()) as session:
        return session.get(Photo, photo_id)


def wait_for_version(photo_id: int, version: int, seconds: float = 20) -> Photo:
    """The photo once its version reaches `version`, or as it is after `seconds`."""
    deadline = time.monotonic() + seconds
    while (photo := get_photo(photo_id)).version < version:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return photo


def relabel_shown_photo_by_key(page, expect) -> tuple[Photo, str]:
    """Switch to one-photo mode and press the digit of the other class.

    Returns the photo as it was shown and the class its key asked for.
    """
    page.goto("/review")
    expect(page.get_by_text(CARD_CAPTION)).to_have_count(12, timeout=WAIT_MS)

    page.get_by_text("One photo at a time").click()
    expect(page.get_by_text(CARD_CAPTION)).to_have_count(1, timeout=WAIT_MS)
    expect(page.get_by_text("Photo 1 of 12")).to_be_visible(timeout=WAIT_MS)
    caption = page.get_by_text(CARD_CAPTION).inner_text().strip()
    photo_id, version = (int(n) for n in CARD_CAPTION.match(caption).group(1, 3))
    shown = get_photo(photo_id)
    assert shown.version == version
    other = next(name for name in CLASSES if name != shown.label)

    # A key pressed while a control has focus goes to that control, not to
    # the page's shortcuts.
    page.evaluate("document.activeElement.blur()")
    page.keyboard.press(str(CLASSES.index(other) + 1))
    # The page moves on to the next photo once the change is saved.
    expect(page.get_by_text("Photo 2 of 12")).to_be_visible(timeout=WAIT_MS)
    return shown, other


def test_keyboard_relabel_in_one_photo_mode(server, trained):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(
                base_url=server.url, viewport={"width": 1400, "height": 1000}
            )
            page.set_default_timeout(WAIT_MS)
            try:
                shown, other = relabel_shown_photo_by_key(page, expect)
            except Exception:
                page.screenshot(path=str(trained / "failed.png"))
                raise
        finally:
            browser.close()

    after = wait_for_version(shown.id, shown.version + 1)
    assert after.version == shown.version + 1, server.log_tail()
    assert (after.label, after.status) == (other, "relabelled")
    with session_scope(get_engine()) as session:
        events = session.scalars(
            select(LabelEvent).where(LabelEvent.photo_id == shown.id)
        ).all()
    assert [(e.old_label, e.new_label, e.source) for e in events] == [
        (shown.label, other, "review")
    ]
