"""The page's "Why?" toggle in a real headless Chromium (tests/test_web_page.py's browser and tab helpers):
with a model that can explain, the heatmap is drawn over each thumbnail where the thumbnail shows the part of
the photo that drove the answer, with a legend; photos answered before the toggle are asked again; an
uncertain answer can switch to the second room's map. With a model that cannot, the toggle is off and says why.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inference.preprocess import Preprocessing, crop_box
from testkit.model_home import register_tiny_model_in
from testkit.server import BentoServer, serve_model_home
from tests import test_web_page
from tests.test_service_explain import marked_photo
from tests.test_web_page import DESKTOP, WAIT_MS, PageSession, page_session

browser = test_web_page.browser  # the page tests' fixtures: one headless Chromium, the screenshot folder
screenshots = test_web_page.screenshots

THUMB = 96  # CSS pixels: the thumbnail square (6rem)


@pytest.fixture(scope="module")
def explainable_page_server(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BentoServer]:
    model = register_tiny_model_in(tmp_path_factory.mktemp("bentoml_home_web_explain"), explainable=True)
    with serve_model_home(model.home, tmp_path_factory.mktemp("logs") / "web_explain.log") as server:
        yield server


def marker_in_thumbnail(size: tuple[int, int], cell: tuple[int, int]) -> tuple[float, float]:
    """Where the centre of map cell (row, col) of a `size` photo shows in the cover-fitted square thumbnail."""
    left, top, right, bottom = crop_box(*size, Preprocessing())
    x = left + (cell[1] + 0.5) / 7 * (right - left)
    y = top + (cell[0] + 0.5) / 7 * (bottom - top)
    scale = max(THUMB / size[0], THUMB / size[1])
    return x * scale + (THUMB - size[0] * scale) / 2, y * scale + (THUMB - size[1] * scale) / 2


def hottest_point(session: PageSession, name: str) -> tuple[float, float]:
    """The canvas pixel with the most opaque colour in `name`'s card, in CSS pixels of the thumbnail."""
    canvas = session.card(name).locator("canvas.heat")
    return tuple(canvas.evaluate("""(canvas) => {
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let best = 0, at = 0;
        for (let i = 3; i < data.length; i += 4) if (data[i] > best) { best = data[i]; at = (i - 3) / 4; }
        const ratio = canvas.width / canvas.clientWidth;
        return [(at % canvas.width + 0.5) / ratio, (Math.floor(at / canvas.width) + 0.5) / ratio];
    }"""))


def test_why_draws_each_map_where_the_photo_shows_it(browser: Any, explainable_page_server: BentoServer,
                                                     screenshots: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    cases = {(640, 480): (1, 5), (700, 1000): (5, 1)}
    photos = {marked_photo(size, cell, tmp_path): (size, cell) for size, cell in cases.items()}
    with page_session(browser, explainable_page_server, screenshots, DESKTOP) as web:
        web.open()
        toggle = web.page.locator("#why-toggle")
        expect(toggle).to_be_enabled()
        expect(web.page.locator("#why-legend")).to_be_hidden()
        first = next(iter(photos))
        web.page.set_input_files("#file-input", str(first))  # answered without a heatmap...
        web.wait_until_answered(1)
        expect(web.card(first.name).locator("canvas.heat")).to_have_count(0)
        toggle.check()  # ...asked again when "Why?" is switched on
        expect(web.page.locator("#why-legend")).to_be_visible()
        expect(web.card(first.name).locator("canvas.heat")).to_be_visible(timeout=WAIT_MS)
        web.page.set_input_files("#file-input", [str(path) for path in list(photos)[1:]])
        web.wait_until_answered(len(photos))
        for path, (size, cell) in photos.items():
            card = web.card(path.name)
            expect(card.locator("canvas.heat")).to_be_visible(timeout=WAIT_MS)
            expect(card.locator(".why-caption")).to_contain_text("why bedroom")
            x, y = hottest_point(web, path.name)
            expected_x, expected_y = marker_in_thumbnail(size, cell)
            assert abs(x - expected_x) < 5 and abs(y - expected_y) < 5, (path.name, (x, y), (expected_x, expected_y))
        web.shot("why_overlay")
        toggle.uncheck()
        expect(web.card(first.name).locator("canvas.heat")).to_be_hidden()
        expect(web.page.locator("#why-legend")).to_be_hidden()


def test_an_uncertain_answer_can_show_the_second_rooms_map(browser: Any, explainable_page_server: BentoServer,
                                                           screenshots: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    photo = marked_photo((640, 480), (3, 3), tmp_path)
    with page_session(browser, explainable_page_server, screenshots, DESKTOP) as web:
        web.open()
        web.page.locator("#why-toggle").check()
        web.page.locator("#threshold-input").fill("1")
        web.page.set_input_files("#file-input", str(photo))
        web.wait_until_answered(1)
        card = web.card(photo.name)
        canvas = card.locator("canvas.heat")
        expect(canvas).to_have_attribute("data-label", "bedroom", timeout=WAIT_MS)
        switch = card.locator(".why-caption button")
        second = switch.inner_text().removeprefix("Show ").replace(" ", "_")
        switch.click()
        expect(canvas).to_have_attribute("data-label", second)
        expect(card.locator(".why-caption")).to_contain_text("why " + second.replace("_", " "))


def test_a_model_that_cannot_explain_leaves_the_toggle_off(browser: Any, server: BentoServer,
                                                           screenshots: Path) -> None:
    from playwright.sync_api import expect

    with page_session(browser, server, screenshots, DESKTOP) as web:
        web.open()
        expect(web.page.locator("#why-toggle")).to_be_disabled()
        expect(web.page.locator("#why-hint")).to_contain_text("cannot show why")
