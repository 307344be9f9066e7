"""The draw-a-digit page in a real headless Chromium (Debian's, driven by Playwright) against
a real `mnistflow serve`: draw with the mouse and with touch, clear, upload, API key.

Screenshots (page.png, page-not-sure.png, page-phone.png) go to $MNISTFLOW_TEST_ARTIFACTS
when it is set (CI keeps them), else to pytest's temporary folder: never into the working tree.
"""

from __future__ import annotations

import io
import itertools
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw
from playwright.sync_api import Browser, Page, expect, sync_playwright

from conftest import MNISTFLOW, free_port, wait_until_up
from mnistflow import data
from mnistflow.config import DataConfig

pytestmark = [pytest.mark.browser, pytest.mark.server]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
API_KEY = "page-test-key"
SHOWN = re.compile(r"^(\d|\?)$")  # a digit, or "?" when the model is not sure
NO_LABEL = "\N{EN DASH}"  # what the page shows before a prediction


@pytest.fixture(scope="module")
def tracking_uri(registered) -> str:
    """The session's store (conftest), with a small trained model as mnist v1 @champion."""
    uri, _ = registered
    return uri


@pytest.fixture
def server(tracking_uri: str, spawn) -> str:
    """`mnistflow serve` with an API key, on a free port; its base URL once it is ready."""
    port = free_port()
    args = ["serve", "--port", str(port), "--tracking-uri", tracking_uri, "--api-key", API_KEY]
    proc = spawn([*MNISTFLOW, *args])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{base}/ready", proc, timeout=90)
    except RuntimeError as e:
        pytest.fail(f"mnistflow serve did not get ready: {e}")
    return base


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    kept = os.environ.get("MNISTFLOW_TEST_ARTIFACTS")
    folder = Path(kept) if kept else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"The page test drives Debian's Chromium at {CHROMIUM}, which is not installed: "
            "run `make browser` (or `apt-get install -y chromium`), or deselect these tests "
            "with -m 'not browser'.",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def pad_points(page: Page, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points given as fractions of the drawing pad -> page coordinates."""
    box = page.locator("#pad").bounding_box()
    assert box is not None
    return [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]


# A seven: the bar, then the stem down to the left.
SEVEN = [(0.25, 0.22), (0.5, 0.22), (0.75, 0.22), (0.62, 0.5), (0.5, 0.8)]


def draw_with_mouse(page: Page, points: list[tuple[float, float]]) -> None:
    (x, y), *rest = pad_points(page, points)
    page.mouse.move(x, y)
    page.mouse.down()
    for x, y in rest:
        page.mouse.move(x, y, steps=8)
        page.wait_for_timeout(60)  # a hand's pace, so predictions come while drawing


def draw_with_touch(page: Page, points: list[tuple[float, float]]) -> None:
    """A finger stroke, as Chromium receives it from a touch screen."""
    cdp = page.context.new_cdp_session(page)
    coords = pad_points(page, points)
    (x, y), *_ = coords

    def touch(kind: str, *points: dict[str, float]) -> None:
        cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": list(points)})

    touch("touchStart", {"x": x, "y": y})
    for (x0, y0), (x1, y1) in itertools.pairwise(coords):
        for step in range(1, 9):
            touch("touchMove", {"x": x0 + (x1 - x0) * step / 8, "y": y0 + (y1 - y0) * step / 8})
    touch("touchEnd")


def assert_prediction_shown(page: Page) -> dict[str, str]:
    """A digit, or "?" when the answer abstains, agreeing with the bars; what was shown."""
    expect(page.locator("#label")).to_have_text(SHOWN)
    expect(page.locator("#bars li")).to_have_count(10)
    # Read in one go: a newer prediction may land between two separate reads.
    shown = page.evaluate(
        """() => ({
            label: document.getElementById("label").textContent,
            confidence: document.getElementById("confidence").textContent,
            bars: [...document.querySelectorAll("#bars li")].map((li) => li.dataset.p),
            top: [...document.querySelectorAll("#bars li.top")].map((li) => li.dataset.digit),
        })"""
    )
    probabilities = [float(p) for p in shown["bars"]]
    assert sum(probabilities) == pytest.approx(1, abs=1e-3)
    best = str(probabilities.index(max(probabilities)))
    assert shown["top"] == [best]
    if shown["label"] == "?":
        assert shown["confidence"].startswith(f"not sure this is a digit (best guess {best},")
    else:
        assert shown["label"] == best and shown["confidence"].endswith("% sure")
    return shown


def clothing_png_it_abstains_on(server: str) -> bytes:
    """A Fashion-MNIST image as a PNG upload that the served model declines (asked through
    the API first, so the page test does not depend on how sure this small model is)."""
    clothes = data.read_nondigits(DataConfig())
    assert clothes is not None
    for image in clothes[:50]:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        answer = httpx.post(
            f"{server}/predict",
            files={"file": ("clothes.png", buffer.getvalue(), "image/png")},
            headers={"X-API-Key": API_KEY},
            timeout=30,
        )
        if answer.json()["predictions"][0]["abstain"]:
            return buffer.getvalue()
    pytest.fail("the served model is sure of all of 50 clothing images")


def digit_png() -> bytes:
    image = Image.new("RGB", (120, 160), "white")
    ImageDraw.Draw(image).line([(30, 30), (95, 30), (55, 140)], fill="black", width=12)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_draw_a_digit_see_the_prediction(server: str, browser: Browser, screenshots: Path):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(server)
    expect(page.locator("#model")).to_have_text("mnist v1")

    # The server wants a key: the first stroke brings up the key field.
    draw_with_mouse(page, SEVEN[:2])
    page.mouse.up()
    expect(page.locator("#key-form")).to_be_visible()
    page.fill("#key", API_KEY)
    page.click("#key-form button")
    assert_prediction_shown(page)
    page.click("#clear")
    expect(page.locator("#label")).to_have_text(NO_LABEL)

    # The prediction shows while the stroke is still being drawn, and after it ends.
    draw_with_mouse(page, SEVEN)
    assert_prediction_shown(page)
    page.mouse.up()
    assert_prediction_shown(page)
    expect(page.locator("#status")).to_have_text("")
    page.wait_for_timeout(300)  # let the bars finish their transition for the picture
    page.screenshot(path=screenshots / "page.png", full_page=True)

    page.click("#clear")
    expect(page.locator("#label")).to_have_text(NO_LABEL)
    expect(page.locator("#bars li.top")).to_have_count(0)

    page.set_input_files(
        "#upload", files=[{"name": "seven.png", "mimeType": "image/png", "buffer": digit_png()}]
    )
    assert_prediction_shown(page)

    # Not a digit: the page says it is not sure rather than show a digit.
    clothes = clothing_png_it_abstains_on(server)
    page.set_input_files(
        "#upload", files=[{"name": "shirt.png", "mimeType": "image/png", "buffer": clothes}]
    )
    expect(page.locator("#label")).to_have_text("?")
    assert assert_prediction_shown(page)["label"] == "?"
    page.wait_for_timeout(300)
    page.screenshot(path=screenshots / "page-not-sure.png", full_page=True)
    page.close()


def test_phone_width_and_touch_drawing(server: str, browser: Browser, screenshots: Path):
    context = browser.new_context(
        viewport={"width": 375, "height": 740}, has_touch=True, is_mobile=True
    )
    context.add_init_script(f"sessionStorage.setItem('mnistflow-api-key', '{API_KEY}')")
    page = context.new_page()
    page.goto(server)
    expect(page.locator("#model")).to_have_text("mnist v1")
    # One column that fits the screen: nothing sideways to scroll, the pad above the bars.
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    pad, bars = page.locator("#pad").bounding_box(), page.locator("#bars").bounding_box()
    assert pad is not None and bars is not None
    assert pad["x"] >= 0 and pad["x"] + pad["width"] <= 375
    assert bars["y"] > pad["y"] + pad["height"]

    draw_with_touch(page, SEVEN)
    assert_prediction_shown(page)
    page.wait_for_timeout(300)
    page.screenshot(path=screenshots / "page-phone.png", full_page=True)
    context.close()
