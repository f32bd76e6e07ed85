"""The web page at `/`, end to end in headless Chromium (Selenium with the system's
chromedriver) against a real uvicorn server of the embedded app: sign in (a wrong key,
then a right one), upload a dataset and two models through the forms, locate, pick
bricks of both models on the board (click, keyboard and drag), assemble, watch the job
finish, predict a dropped image and download the `.pt`. Also the offline API docs.

Screenshots of every view at 1280 and 390 px wide go to $LEGO_UI_SCREENSHOTS (the
README's pictures: `LEGO_UI_SCREENSHOTS=docs/ui pytest tests/service/test_svc_web.py`),
else to a temporary directory."""

from __future__ import annotations

import base64
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_helpers import add_keys, free_port, make_settings

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WIDTHS = (1280, 390)


def _need_browser() -> None:
    if Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists():
        return
    msg = "Chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(msg)  # .ci/run installs them: missing there is a failure, not a skip
    pytest.skip(msg)


class Server:
    """The embedded app under uvicorn in a thread, on a free port."""

    def __init__(self, settings) -> None:
        import uvicorn

        from app.catalog import upgrade
        from app.main import create_app

        upgrade(settings.resolved_database_url)
        self.app = create_app(settings)
        self.alice, self.bob = add_keys(self.app.state.catalog)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)

    def key(self, who: str = "alice") -> str:
        return getattr(self, who)["Authorization"].split(" ", 1)[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.app.state.catalog.dispose()


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_data) -> Iterator[Server]:
    srv = Server(make_settings(tmp_path_factory.mktemp("web"), data_dir=shared_data))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = os.environ.get("LEGO_UI_SCREENSHOTS")
    path = Path(out) if out else tmp_path_factory.mktemp("ui")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser(downloads):
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        "--force-device-scale-factor=1",
        # Offline: no host but this machine resolves, as on a network without internet.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        opts.add_argument(arg)
    opts.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


# --------------------------------------------------------------------------- helpers


def wait_for(driver, fn, timeout: float = 60.0, what: str = "condition"):
    """fn(driver) until it returns something truthy (Selenium errors count as not yet)."""
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            out = fn(driver)
            if out:
                return out
        except WebDriverException as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last error: {last}")


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def all_css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def text_of(driver, selector: str) -> str:
    return css(driver, selector).text


def heading(driver, title: str, timeout: float = 60.0) -> None:
    wait_for(driver, lambda d: text_of(d, "#view-title") == title, timeout, f"view {title!r}")


def screenshot(driver, shots: Path, name: str) -> None:
    """The whole page at each width; at 390 px nothing may stick out sideways."""
    for w in WIDTHS:
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": w, "height": 900, "deviceScaleFactor": 1, "mobile": w < 600},
        )
        time.sleep(0.2)
        wide = driver.execute_script(WIDER_JS)
        assert not wide, f"{name} at {w} px: elements wider than the screen: {wide}"
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": w, "height": min(height, 4000), "deviceScaleFactor": 1, "mobile": w < 600},
        )
        time.sleep(0.2)
        driver.save_screenshot(str(shots / f"{name}-{w}.png"))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    time.sleep(0.1)


WIDER_JS = """
const w = document.documentElement.clientWidth;
return [...document.querySelectorAll("body *")]
  .filter((e) => e.getBoundingClientRect().right > w + 0.5 && e.getClientRects().length)
  .slice(0, 5).map((e) => e.tagName + "#" + e.id + "." + e.className);
"""


def fill(driver, selector: str, value: str) -> None:
    el = css(driver, selector)
    el.clear()
    el.send_keys(value)


def select(driver, selector: str, visible_text: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(css(driver, selector)).select_by_visible_text(visible_text)


def model_card(driver, name: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'article.model[aria-label="model {name}"]')


def loaded_images(driver, selector: str) -> list:
    """The images under `selector` that have loaded (and decoded to a picture)."""
    js = "return arguments[0].complete && arguments[0].naturalWidth > 0"
    return [i for i in all_css(driver, selector) if driver.execute_script(js, i)]


def locate_state(driver, name: str) -> str:
    """none, locating or located: what the model's card shows."""
    status = model_card(driver, name).find_element("css selector", ".locate-status")
    return status.get_attribute("data-state")


def upload_model(driver, name: str, weights: Path, classes: str) -> None:
    fill(driver, "#mu-name", name)
    select(driver, "#mu-arch", "lenet")
    css(driver, "#mu-weights").send_keys(str(weights))
    fill(driver, "#mu-classes", classes)
    css(driver, "#model-upload button[type=submit]").click()
    wait_for(driver, lambda d: model_card(d, name), what=f"model {name} in the catalog")


DROP_JS = """
const [sel, b64, name] = arguments;
const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const dt = new DataTransfer();
dt.items.add(new File([bytes], name, {type: "image/png"}));
const target = document.querySelector(sel);
const init = {dataTransfer: dt, bubbles: true, cancelable: true};
target.dispatchEvent(new DragEvent("dragover", init));
target.dispatchEvent(new DragEvent("drop", init));
"""

DRAG_BRICK_JS = """
const [brick, board] = arguments;
const dt = new DataTransfer();
brick.dispatchEvent(new DragEvent("dragstart", {dataTransfer: dt, bubbles: true}));
board.dispatchEvent(new DragEvent("dragover", {dataTransfer: dt, bubbles: true, cancelable: true}));
board.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
"""


# --------------------------------------------------------------------------- tests


def test_web_journey(
    server, browser, trained_lenets, mnist_small, digits, downloads, shots, tmp_path
):
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.get(server.url + "/")
    heading(d, "Sign in")
    assert css(d, "label[for=api-key]").text == "API key"

    # A wrong key: a clear message, still on the sign-in view, nothing stored.
    fill(d, "#api-key", "lego_not-a-real-key")
    css(d, "#api-key").send_keys(Keys.ENTER)
    wait_for(d, lambda d: "not accepted" in text_of(d, "#signin-error"), what="wrong-key message")
    assert "unknown or revoked" in text_of(d, "#signin-error")
    assert d.execute_script("return sessionStorage.length + localStorage.length") == 0
    assert not css(d, "#nav").is_displayed()  # nothing to navigate to before signing in
    screenshot(d, shots, "signin")

    # The right key: the catalog, and the key is in storage, not in the URL.
    fill(d, "#api-key", server.key())
    css(d, "#signin-form button[type=submit]").click()
    heading(d, "Catalog")
    assert css(d, "#nav").is_displayed()
    assert server.key() not in d.current_url
    assert d.execute_script("return sessionStorage.getItem('lego.apiKey')") == server.key()
    assert "No models yet" in text_of(d, "main")

    # A dataset through the form.
    archive = tmp_path / "mnist-small.tar.gz"
    archive.write_bytes(mnist_small)
    fill(d, "#du-name", "mnist-small")
    css(d, "#du-archive").send_keys(str(archive))
    css(d, "#dataset-upload button[type=submit]").click()
    wait_for(d, lambda d: all_css(d, "#datasets tbody tr"), what="dataset row")
    row = text_of(d, "#datasets tbody tr")
    assert "mnist-small" in row and "200" in row

    # A wrong upload shows the API's message.
    fill(d, "#mu-name", "broken")
    bad = tmp_path / "not-a-model.pt"
    bad.write_bytes(b"not a model")
    css(d, "#mu-weights").send_keys(str(bad))
    fill(d, "#mu-classes", "0, 1, 2, 3, 4")
    css(d, "#model-upload button[type=submit]").click()
    wait_for(d, lambda d: "Upload failed" in text_of(d, "#model-upload-error"), what="error")
    assert "not-a-model.pt" in text_of(d, "#model-upload-error")

    # Two models through the form; both start unlocated.
    upload_model(d, "digits-low", trained_lenets.low, "0, 1, 2, 3, 4")
    upload_model(d, "digits-high", trained_lenets.high, "5, 6, 7, 8, 9")
    for name in ("digits-low", "digits-high"):
        card = model_card(d, name)
        assert "not located" in card.text
        assert [b.text.split("\n")[0] for b in card.find_elements("css selector", ".brick")] == (
            ["0", "1", "2", "3", "4"] if name == "digits-low" else ["5", "6", "7", "8", "9"]
        )

    # Locate both with their buttons; the bricks then show each class's share.
    for name in ("digits-low", "digits-high"):
        model_card(d, name).find_element("css selector", ".locate-form button").click()
        wait_for(
            d, lambda d, n=name: locate_state(d, n) in ("locating", "located"), what="locating"
        )
    for name in ("digits-low", "digits-high"):
        wait_for(d, lambda d, n=name: locate_state(d, n) == "located", timeout=180, what="located")
    card = model_card(d, "digits-low")
    assert "located on dataset mnist-small" in card.text
    # The check of the located components (lego_core.fidelity) is shown with them.
    note = card.find_element("css selector", ".check-note").text
    assert re.match(r"Checked on \d+ class sets: components score \d\.\d\d", note), note
    brick = card.find_element("css selector", ".brick")
    share = [s.text for s in brick.find_elements("css selector", ".share")]
    assert re.fullmatch(r"params \d+(\.\d)?%", share[0]), share
    assert re.fullmatch(r"FLOPs \d+(\.\d)?%", share[1]), share
    assert "component keeps" in brick.get_attribute("aria-label")
    # The model's decision routes, fetched with the key when its section is opened.
    card.find_element("css selector", "details.routes summary").click()
    img = wait_for(d, lambda d: loaded_images(d, "article.model details.routes img"), what="routes")
    assert img[0].get_attribute("alt") == "Decision routes of digits-low: 0, 1, 2, 3, 4"
    screenshot(d, shots, "catalog")

    # The board: 0 by click, 3 by keyboard (Space), 7 by drag and drop, 9 by click.
    css(d, 'nav a[href="#/assemble"]').click()
    heading(d, "Assemble")

    def brick_button(model_id: int, cls: str):
        return css(d, f'button.brick[data-model="{model_id}"][data-class="{cls}"]')

    brick_button(1, "0").click()
    brick_button(1, "3").send_keys(Keys.SPACE)
    d.execute_script(DRAG_BRICK_JS, brick_button(2, "7"), css(d, "#board"))
    brick_button(2, "9").click()
    # Classes of one model stay together, in the order picked.
    order = [li.get_attribute("data-key") for li in all_css(d, "#board li")]
    assert order == ["1:0", "1:3", "2:7", "2:9"]
    assert brick_button(1, "0").get_attribute("aria-pressed") == "true"
    assert "4 from 2 models: 0, 3, 7, 9" in text_of(d, "#est-classes")
    assert text_of(d, "#est-params") not in ("", "–")
    # Reorder by keyboard: 9 before 7.
    css(d, '[data-move="up"][data-key="2:9"]').send_keys(Keys.ENTER)
    order = [li.get_attribute("data-key") for li in all_css(d, "#board li")]
    assert order == ["1:0", "1:3", "2:9", "2:7"]
    # Take one off and put it back.
    brick_button(2, "7").click()
    assert len(all_css(d, "#board li")) == 3
    brick_button(2, "7").click()
    fill(d, "#as-name", "digits-0397")
    select(d, "#as-form", "branches")
    screenshot(d, shots, "assemble")
    css(d, "#assemble-submit").click()

    # The job runs: the page polls until it has succeeded, then shows the model.
    heading(d, "digits-0397")
    wait_for(d, lambda d: "succeeded" in text_of(d, "#job-status"), timeout=240, what="job end")
    wait_for(d, lambda d: all_css(d, "#lineage tbody tr"), what="lineage")
    rows = [
        [td.text for td in r.find_elements("css selector", "td")]
        for r in all_css(d, "#lineage tbody tr")
    ]
    assert [r[1] for r in rows] == ["0", "3", "9", "7"]
    assert [r[2] for r in rows] == ["digits-low (#1)"] * 2 + ["digits-high (#2)"] * 2
    assert [r[3] for r in rows] == ["0 (index 0)", "3 (index 3)", "9 (index 4)", "7 (index 2)"]
    accuracy = float(text_of(d, "#m-accuracy").rstrip("%"))
    assert 50 < accuracy <= 100
    assert "points" in text_of(d, "#m-base")
    assert int(text_of(d, "#m-params").split("(")[1].rstrip(")")) > 0

    # The routes pictures, fetched with the key and shown as images.
    figs = wait_for(d, lambda d: loaded_images(d, ".routes figure img"), what="routes pictures")
    assert len(figs) == 2
    alt = figs[0].get_attribute("alt")
    assert alt == "Decision routes of digits-low: 0, 3", alt

    # Try it: drop a 3; the top class is 3.
    b64 = base64.b64encode(digits["3"]).decode()
    d.execute_script(DROP_JS, "#drop-zone", b64, "three.png")
    wait_for(d, lambda d: all_css(d, "#top-class"), what="prediction")
    assert text_of(d, "#top-class").startswith("Top class: 3 ("), text_of(d, "#top-class")
    probs = [li.text for li in all_css(d, "#predictions li")]
    assert len(probs) == 4 and probs[0].startswith("3")
    screenshot(d, shots, "assembly")

    # Download: a .pt that loads with plain PyTorch and names its classes.
    css(d, "#download").click()
    pts = wait_for(
        d,
        lambda _d: [p for p in downloads.iterdir() if p.suffix == ".pt"],
        what="downloaded .pt",
    )
    assert pts[0].name == "assembly-1-digits-0397.pt"
    import json

    import torch

    extra = {"lego.json": ""}
    with open(pts[0], "rb") as f:
        torch.export.load(f, extra_files=extra)
    assert json.loads(extra["lego.json"])["class_names"] == ["0", "3", "9", "7"]

    # The assemblies list, then sign out: back to the sign-in view, key gone.
    css(d, 'nav a[href="#/assemblies"]').click()
    heading(d, "Assemblies")
    assert "digits-0397" in text_of(d, "#assemblies") and "succeeded" in text_of(d, "#assemblies")
    css(d, "#signout").click()
    heading(d, "Sign in")
    assert d.execute_script("return sessionStorage.length + localStorage.length") == 0


def test_docs_work_offline_with_bearer_auth(server, browser):
    d = browser
    d.get(server.url + "/docs")
    wait_for(d, lambda d: all_css(d, ".swagger-ui .info .title"), what="Swagger UI")
    assert "Model LEGO" in text_of(d, ".swagger-ui .info .title")
    css(d, "button.authorize").click()
    wait_for(d, lambda d: all_css(d, ".auth-container input"), what="Authorize dialog")
    assert "bearerAuth" in text_of(d, ".auth-container")
    css(d, ".auth-container input").send_keys(server.key())
    css(d, ".auth-btn-wrapper button.authorize").click()
    css(d, ".auth-btn-wrapper button.btn-done").click()
    # "Try it out" on GET /api/v1/models sends the key: 200 and the owner's (empty) list.
    op = "#operations-models-list_models_api_v1_models_get"
    css(d, f"{op} .opblock-summary").click()
    wait_for(d, lambda d: all_css(d, f"{op} .try-out__btn"), what="Try it out")
    css(d, f"{op} .try-out__btn").click()
    css(d, f"{op} button.execute").click()
    status = wait_for(
        d,
        lambda d: all_css(d, f"{op} .live-responses-table tbody .response-col_status"),
        what="reply",
    )
    assert status[0].text.strip() == "200"
    assert "bearer" in text_of(d, f"{op} .curl-command").lower()
    resources = d.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name)"
    )
    assert resources and all(r.startswith(server.url) for r in resources), resources

    d.get(server.url + "/redoc")
    wait_for(d, lambda d: "Register Model" in d.find_element("tag name", "body").text, what="ReDoc")
    body = d.find_element("tag name", "body").text
    assert "bearerAuth" in body and "Authorization" in body  # its security section
