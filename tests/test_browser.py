"""The web page at ``/``, end to end in real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium; nothing is downloaded). Skips without them."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from beautytag.checkpoint import default_model_path
from beautytag.runtime.engine import Engine
from beautytag.search import Index
from beautytag.serve.app import create_app
from beautytag.serve.settings import ServeSettings

from .conftest import DATASETS

PHOTO = DATASETS / "fashion-products-small" / "images" / "55981.jpg"  # a lipstick
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')"
)
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "chromium or chromedriver not found (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(default_model_path())


@pytest.fixture(scope="module")
def server(engine) -> Iterator[str]:
    yield from run_server(create_app(engine, ServeSettings()))


@pytest.fixture(scope="module")
def search_server(engine, tmp_path_factory) -> Iterator[str]:
    """The service with a search index of a few catalogue photos, PHOTO among them."""
    if not PHOTO.is_file():
        pytest.skip(f"real photo not found at {PHOTO} (place ../shared/datasets beside the repo)")
    others = sorted(PHOTO.parent.glob("5598*.jpg"))[:5]
    folder = tmp_path_factory.mktemp("search") / "index"
    index = Index.create(folder, engine.model_id, engine.embedding_dim)
    pairs = list(engine.embed_items([(str(p), p) for p in {PHOTO, *others}]))
    index.add(
        [p.file for p, _ in pairs],
        [e for _, e in pairs],
        [p.to_dict()["attributes"] for p, _ in pairs],
    )
    yield from run_server(create_app(engine, ServeSettings(), index))


def run_server(app) -> Iterator[str]:
    """The service on a free loopback port, run by uvicorn in a background thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    while not srv.started:
        assert thread.is_alive() and time.perf_counter() - t0 < 30, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def browser(tmp_path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1400",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def hex_to_rgb(hex_: str) -> str:
    r, g, b = (int(hex_[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


def test_page_predicts_and_explains_a_photo(server, browser, engine, tmp_path: Path):
    if not PHOTO.is_file():
        pytest.skip(f"real photo not found at {PHOTO} (place ../shared/datasets beside the repo)")
    (expected,) = [p.to_dict() for p in engine.predict_files([PHOTO])]
    category = expected["attributes"]["category"]
    shade_hex = expected["attributes"]["shade"]["hex"]
    wait = WebDriverWait(browser, 30)

    browser.get(server)
    wait.until(lambda d: "default.pt" in d.find_element(By.ID, "info").text)
    browser.find_element(By.ID, "picker").send_keys(str(PHOTO))

    card = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#cards .card"))
    assert card.find_element(By.TAG_NAME, "h2").text == PHOTO.name
    wait.until(lambda d: card.find_elements(By.CSS_SELECTOR, ".attr"))
    attrs = {
        a.find_element(By.CSS_SELECTOR, ".name").text.lower(): a
        for a in card.find_elements(By.CSS_SELECTOR, ".attr")
    }
    assert set(attrs) == {n.replace("_", " ") for n in engine.schema.names}
    top = attrs["category"].find_element(By.CSS_SELECTOR, ".row")
    assert top.find_element(By.CSS_SELECTOR, ".label").text == category["label"]
    assert top.find_element(By.CSS_SELECTOR, ".pct").text == f"{round(category['score'] * 100)}%"
    swatch = attrs["shade"].find_element(By.CSS_SELECTOR, ".swatch")
    colour = browser.execute_script("return getComputedStyle(arguments[0]).backgroundColor", swatch)
    assert colour == hex_to_rgb(shade_hex)
    assert attrs["shade"].find_element(By.TAG_NAME, "code").text == shade_hex

    # the heatmap: pick an attribute, switch the overlay on, wait for /v1/explain's PNG
    Select(card.find_element(By.TAG_NAME, "select")).select_by_value("category")
    card.find_element(By.CSS_SELECTOR, ".controls input[type=checkbox]").click()
    note = card.find_element(By.CSS_SELECTOR, ".controls .note")
    wait.until(lambda d: note.text.startswith("showing:"))
    assert note.text == f"showing: {category['label']}"  # X-Beautytag-Label of /v1/explain
    heat = card.find_element(By.CSS_SELECTOR, "img.heat")
    wait.until(lambda d: d.execute_script("return arguments[0].complete", heat))
    assert heat.is_displayed() and heat.get_attribute("src").startswith("blob:")
    assert browser.execute_script("return arguments[0].naturalWidth", heat) == 384

    # another attribute replaces the overlay
    Select(card.find_element(By.TAG_NAME, "select")).select_by_value("shade")
    wait.until(lambda d: note.text.startswith("showing: #"))
    wait.until(lambda d: d.execute_script("return arguments[0].complete", heat))
    assert browser.execute_script("return arguments[0].naturalWidth", heat) > 0

    assert browser.save_screenshot(str(tmp_path / "page.png"))

    # a file that is not an image gets a card that says so; keyboard users reach the picker
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    browser.find_element(By.ID, "picker").send_keys(str(notes))
    first = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#cards .card h2"))
    wait.until(lambda d: first.text == "notes.txt")
    assert "skipped: not an image" in browser.find_element(By.CSS_SELECTOR, "#cards .card").text
    drop = browser.find_element(By.ID, "drop")
    assert drop.get_attribute("tabindex") == "0" and drop.get_attribute("role") == "button"
    assert card.find_element(By.TAG_NAME, "select").get_attribute("aria-label")


def test_page_shows_similar_products_and_shade_matches(search_server, browser):
    wait = WebDriverWait(browser, 30)
    browser.get(search_server)
    wait.until(lambda d: d.find_element(By.ID, "shadebox").is_displayed())
    browser.find_element(By.ID, "picker").send_keys(str(PHOTO))
    card = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#cards .card"))
    thumbs = wait.until(lambda d: card.find_elements(By.CSS_SELECTOR, ".similar .hit img"))
    assert 1 < len(thumbs) <= 6
    first = card.find_element(By.CSS_SELECTOR, ".similar .hit")
    assert first.get_attribute("title").startswith(PHOTO.name) and "100%" in first.text
    wait.until(lambda d: (thumbs[0].get_attribute("src") or "").startswith("blob:"))
    wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth", thumbs[0]) > 0)

    # a click on the shade swatch: a shade-match card, nearest first
    card.find_element(By.CSS_SELECTOR, ".swatch.pick").click()
    match = wait.until(
        lambda d: [c for c in d.find_elements(By.CSS_SELECTOR, ".card") if "Shade match" in c.text]
    )[0]
    hits = wait.until(lambda d: match.find_elements(By.CSS_SELECTOR, ".hit"))
    scores = [float(h.text.split()[-1]) for h in hits]
    assert scores == sorted(scores) and scores[0] < 1  # the photo itself: its own shade

    # the colour picker
    browser.execute_script("document.getElementById('shade').value = '#20a040'")
    browser.find_element(By.ID, "match").click()
    wait.until(lambda d: "#20a040" in d.find_element(By.CSS_SELECTOR, "#cards .card h2").text)


def test_page_says_not_a_cosmetic_when_the_gate_rejects_a_photo(browser, tmp_path: Path):
    """A tiny model whose gate sees P(cosmetic = yes) = 0.2 (below its 0.5) for any photo."""
    from beautytag.export import synthetic_photos

    from .conftest import make_tiny_model

    engine = Engine(make_tiny_model(tmp_path / "no.pt", cosmetic=0.2), backend="torch")
    [photo] = synthetic_photos(tmp_path / "photos", n=1)
    wait = WebDriverWait(browser, 30)
    for url in run_server(create_app(engine, ServeSettings())):
        browser.get(url)
        wait.until(lambda d: "no.pt" in d.find_element(By.ID, "info").text)
        browser.find_element(By.ID, "picker").send_keys(str(photo))
        card = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#cards .card"))
        wait.until(lambda d, card=card: card.find_elements(By.CSS_SELECTOR, ".attr"))
        assert card.find_element(By.CSS_SELECTOR, ".gate").text == "not a cosmetic"
        attrs = {
            a.find_element(By.CSS_SELECTOR, ".name").text.lower(): a.text
            for a in card.find_elements(By.CSS_SELECTOR, ".attr")
        }
        assert "no answer" in attrs["category"] and "no shade" in attrs["shade"]
        assert "no tags" in attrs["function"] and "no answer" not in attrs["cosmetic"]
        assert not card.find_elements(By.CSS_SELECTOR, ".swatch")
