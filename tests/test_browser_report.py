"""The report as a person sees it, in headless Chromium (the session's ``browser`` fixture): every plot loaded, the
verdict table as the stage files say, the verdict on the first screen (1300 x 900), screenshots beside the report.
The run folder is tests/_report_helpers.py's (real formats, no Ray); the pipeline test opens a real run's report
the same way (tests/test_pipeline.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

import _report_helpers as H
from conftest import SCREEN, smoke_config
from transfuse import storage
from transfuse.report import REPORT_DIR, write_report


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[object, str]:
    cfg = smoke_config(tmp_path_factory.mktemp("runs"), "browser")
    H.write_full_run(cfg, H.digits())
    return cfg, write_report(cfg)


def test_report_page_in_chromium(browser, report):
    cfg, index = report
    shots = H.check_report_page(browser, index, cfg)
    with Image.open(shots["first_screen"]) as im:
        assert im.size == SCREEN
    with Image.open(shots["full_page"]) as im:
        assert im.size[0] == SCREEN[0] and im.size[1] > SCREEN[1]  # the details and appendix below the verdict
    print(f"screenshots: {shots}")


def test_verdict_below_the_first_screen_is_caught(browser, report, tmp_path):
    """The first-screen check can fail: the same page with the verdict pushed below 900 px is refused."""
    shutil.copytree(storage.run_dir(report[0]), tmp_path / "browser")
    cfg = smoke_config(tmp_path, "browser")
    index = Path(REPORT_DIR.dir(cfg)) / "index.html"
    index.write_text(index.read_text().replace('<h2 id="verdict">',
                                               '<div style="height:1000px"></div><h2 id="verdict">'))
    with pytest.raises(AssertionError, match="#verdict"):
        H.check_report_page(browser, str(index), cfg)
