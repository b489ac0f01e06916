"""The page at ``GET /`` of the Serve app, driven by headless Chromium over real HTTP on 127.0.0.1.

A tiny real bundle trained on Fashion-MNIST (bench.serve.write_demo_bundle) is served; the browser uploads a real
Fashion-MNIST test image and picks one of the test images the bundle ships, and the label the page shows must be
the one the JSON routes answer for the same bytes. A screenshot of the page is written next to the run's report
(``<run>/report/serve_page.png``; ``TRANSFUSE_SCREENSHOT_DIR`` puts it elsewhere) for a person to look at.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow is imported)

httpx = pytest.importorskip("httpx")
MODEL = "fashion"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fashion_dir) -> Path:
    from bench.serve import write_demo_bundle

    run = tmp_path_factory.mktemp("runs") / "fashion"
    write_demo_bundle(str(run / "bundle"), dataset="fashion", members=1, epochs=2, version="1")
    return run


@pytest.fixture(scope="module")
def page_server(ray_cluster, run_dir):
    from ray import serve

    from bench.serve import free_port
    from serve.app import AppArgs, build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs(bundle=str(run_dir / "bundle"), name=MODEL, num_cpus=0.25, min_replicas=1,
                                max_replicas=1)), name="page", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _local_browser():
    """Headless Chromium through chromedriver (Debian's packages chromium and chromium-driver)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip("chromium / chromedriver absent: apt-get install chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1300,900"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.fixture(scope="module")
def page_browser(request):
    """The suite's shared ``browser`` fixture where conftest has one, else a headless Chromium of our own."""
    try:
        yield request.getfixturevalue("browser")
        return
    except pytest.FixtureLookupError:
        pass
    driver = _local_browser()
    try:
        yield driver
    finally:
        driver.quit()


def _wait_done(driver, timeout_s: float = 120.0) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout_s).until(
        lambda d: d.find_element("tag name", "body").get_attribute("data-state") in ("done", "error"))
    err = driver.find_element("id", "error").text
    assert driver.find_element("tag name", "body").get_attribute("data-state") == "done", err


def test_page_upload_and_shipped_example_match_the_json_routes(page_server, page_browser, run_dir, fashion_dir,
                                                               tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    from bench.serve import fashion_uint8
    from transfuse.inference.bundle_writer import png_bytes

    images, _, names = fashion_uint8("test", 20)
    i = 7  # a real test image (not among the training slice the demo model saw)
    png = tmp_path / f"fashion-test-{i}.png"
    png.write_bytes(png_bytes(images[i]))
    d = page_browser
    d.get(page_server + "/")
    WebDriverWait(d, 60).until(lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1")
    assert d.find_element("id", "model").text == MODEL
    assert d.find_element("id", "error").text == ""

    # upload through the file input (what a drop or the file chooser hands the page)
    file_input = d.find_element("id", "file")
    d.execute_script("arguments[0].hidden = false;", file_input)
    file_input.send_keys(str(png))
    _wait_done(d)
    shown = d.find_element("id", "label").text
    with png.open("rb") as f:
        r = httpx.post(f"{page_server}/v1/models/{MODEL}/images", files=[("files", (png.name, f, "image/png"))])
    assert r.status_code == 200, r.text
    want = r.json()["predictions"][0]
    assert shown == want["label"] and shown in names
    bars = d.find_elements("css selector", "#bars .bar")
    assert len(bars) == 5 and bars[0].get_attribute("data-label") == want["label"]
    top = sorted(want["probabilities"], reverse=True)[0]
    assert bars[0].find_element("css selector", ".p").text == f"{100 * top:.1f}%"
    assert "latency" in d.find_element("id", "latency").text and "ms" in d.find_element("id", "latency").text

    # the screenshot a person looks at: next to the run's report
    out = Path(os.environ.get("TRANSFUSE_SCREENSHOT_DIR") or run_dir / "report")
    out.mkdir(parents=True, exist_ok=True)
    shot = out / "serve_page.png"
    assert d.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot of the page: {shot}")

    # a test image the bundle ships, picked on the page: the same label as :predict on its bytes
    buttons = d.find_elements("css selector", "#examples button.example")
    assert len(buttons) >= 2
    d.execute_script("document.body.dataset.state = 'busy';")
    buttons[1].click()
    _wait_done(d)
    ex = httpx.get(f"{page_server}/v1/models/{MODEL}/examples").json()["examples"][1]
    r = httpx.post(f"{page_server}/v1/models/{MODEL}:predict", json={"instances": [{"b64": ex["b64"]}]})
    assert d.find_element("id", "label").text == r.json()["predictions"][0]["label"]

    # a file that is not an image: the page shows the server's error, and nothing else breaks
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not an image")
    file_input.send_keys(str(bad))
    WebDriverWait(d, 60).until(lambda d: d.find_element("tag name", "body").get_attribute("data-state") == "error")
    assert "not an image" in d.find_element("id", "error").text
