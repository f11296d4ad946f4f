import pandas as pd

from db.settings import get_settings
from tests.dashboard.conftest import open_page


def test_overview_button_writes_the_cleaned_set_and_offers_the_manifest(small_set):
    app = open_page()
    app.button(key="overview_export_data").click().run()

    assert not app.exception and not app.error
    (folder,) = (get_settings().artifact_dir / "datasets").iterdir()
    assert app.success[0].value.startswith(f"Wrote the cleaned set to {folder}: 20")
    manifest = pd.read_csv(folder / "manifest.csv")
    assert len(manifest) == 20
    assert len(list((folder / "train").rglob("*.jpg"))) == 12
    assert len(list((folder / "test").rglob("*.jpg"))) == 8
    assert app.get("download_button")
