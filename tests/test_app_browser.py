"""The web app's page in a real headless Chromium, driven through selenium with the system's chromedriver.

It types a prompt and presses Generate, reads the PNGs and scores the page shows, uploads an image, paints a
mask on the canvas with the mouse and runs an edit, sets a bad setting and reads the error on the page, and
checks in Chrome's network log that the page asked nothing of any host but the server. Skipped, with the
reason, only when selenium, Chromium or chromedriver is missing (`.ci/run` installs them where it can).
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from dalle_mini_impl.bench.app import find_browser
from sample.app import App, load_models
from tests.bundle_factory import make_tiny_bundle
from tests.test_app import SIZE, make_search_folder, running

pytestmark = pytest.mark.usefixtures("one_thread")

# the tiny model answers in milliseconds: note whether the progress indicator was shown at all
SEE_PROGRESS = """
window.sawProgress = false;
const progress = document.getElementById("progress");
new MutationObserver(() => { if (!progress.hidden) window.sawProgress = true; })
  .observe(progress, {attributes: true, attributeFilter: ["hidden"]});
"""


def need_browser() -> None:
    """Skip, saying why, where selenium or a Chromium with its driver is missing."""
    pytest.importorskip("selenium", reason="selenium is not installed: pip install -e '.[dev]'")
    if find_browser() is None:
        pytest.skip("no Chromium and chromedriver on PATH: apt-get install chromium chromium-driver")


@pytest.fixture(scope="module")
def driver():
    need_browser()
    from dalle_mini_impl.bench.app import start_browser

    browser = start_browser(width=1200, height=900, network_log=True)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    bundle = make_tiny_bundle(root / "bundle")
    app = App(load_models([str(bundle)], device="cpu"), [make_search_folder(root / "pictures")], root / "indexes")
    with running(app) as address:
        yield address


@pytest.fixture
def page(driver, url):
    """The page, freshly loaded and ready (its models and settings filled in)."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    return driver


def by_id(driver, name):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def wait_done(driver, timeout: float = 120) -> None:
    """Until the page's buttons are enabled again: its request answered."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: by_id(d, "generate").is_enabled())


def shown_images(driver, where: str) -> list[tuple[Image.Image, str]]:
    """The result images under #where, decoded from their data URLs, with the score text beside each."""
    from selenium.webdriver.common.by import By

    out = []
    for card in by_id(driver, where).find_elements(By.CSS_SELECTOR, ".card"):
        src = card.find_element(By.TAG_NAME, "img").get_attribute("src")
        header, _, payload = src.partition(",")
        assert header == "data:image/png;base64"
        data = base64.b64decode(payload)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"  # a PNG, as the download link gives it
        image = Image.open(io.BytesIO(data))
        image.load()
        out.append((image, card.find_element(By.CSS_SELECTOR, ".score").text))
    return out


def set_field(driver, name: str, value: str) -> None:
    """Type value into the field of that id, or into the sampling setting of that name."""
    from selenium.webdriver.common.by import By

    fields = driver.find_elements(By.ID, name) or driver.find_elements(By.CSS_SELECTOR, f"[data-setting={name}]")
    field = fields[0]
    field.clear()
    field.send_keys(value)


def test_browser_generate_shows_pngs_of_the_models_size_with_scores(page, tmp_path):
    from selenium.webdriver.common.by import By

    set_field(page, "prompts", "a red circle\na blue square")
    settings = page.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('[data-setting]')]"
        ".map((input) => [input.dataset.setting, input.value]))"
    )
    assert settings["num_images"] == "2" and settings["candidates"] == "4"  # the tiny bundle's defaults
    page.execute_script(SEE_PROGRESS)
    by_id(page, "generate").click()
    wait_done(page)
    assert page.execute_script("return window.sawProgress")  # shown while sampling ran
    assert not by_id(page, "progress").is_displayed()  # and gone once it is done
    assert not by_id(page, "error").is_displayed()
    titles = [h.text for h in by_id(page, "results").find_elements(By.CSS_SELECTOR, ".group h3")]
    assert titles == ["a red circle", "a blue square"]  # one group per prompt, in order
    images = shown_images(page, "results")
    assert len(images) == 4
    for rank, (image, score) in zip([1, 2, 1, 2], images):
        assert image.size == (SIZE, SIZE)
        assert score.startswith(f"#{rank} ") and -1 <= float(score.split()[1]) <= 1
    links = by_id(page, "results").find_elements(By.CSS_SELECTOR, "a[download]")
    assert [a.get_attribute("download") for a in links[:2]] == ["a-red-circle_s0_r1.png", "a-red-circle_s0_r2.png"]
    assert links[2].get_attribute("download") == "a-blue-square_s1_r1.png"  # prompt i uses seed + i
    page.save_screenshot(str(tmp_path / "app.png"))
    assert Image.open(tmp_path / "app.png").size[0] > 0


def test_browser_paints_a_mask_and_edits_the_uploaded_image(page, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    source = np.zeros((SIZE, SIZE, 3), np.uint8)
    source[:, : SIZE // 2] = (220, 30, 30)
    source[:, SIZE // 2 :] = (30, 30, 220)
    Image.fromarray(source).save(tmp_path / "source.png")
    assert by_id(page, "method").is_displayed() and by_id(page, "sampling").is_displayed()
    by_id(page, "tabs").find_element("css selector", "[data-tab=edit]").click()
    # an edit samples with the transformer whatever the method: its select is not shown beside the edit
    assert not by_id(page, "method").is_displayed() and by_id(page, "sampling").is_displayed()
    by_id(page, "edit-file").send_keys(str(tmp_path / "source.png"))
    canvas = by_id(page, "mask")
    WebDriverWait(page, 10).until(lambda d: canvas.size["width"] > 100)
    w, h = canvas.size["width"], canvas.size["height"]
    by_id(page, "brush").send_keys("\ue010")  # End: the widest brush
    # paint a stroke down the right quarter with the mouse (offsets are from the canvas's center)
    drag = ActionChains(page).move_to_element_with_offset(canvas, w // 4, -h // 2 + 5).click_and_hold()
    drag.move_by_offset(0, h // 2).move_by_offset(0, h // 2 - 10).release().perform()
    set_field(page, "edit-prompt", "a green square")
    by_id(page, "edit").click()
    wait_done(page)
    assert not by_id(page, "error").is_displayed(), by_id(page, "error").text  # a mask with no paint is one
    edits = shown_images(page, "edit-results")
    assert len(edits) == 2
    for image, score in edits:
        pixels = np.asarray(image)
        assert image.size == (SIZE, SIZE) and score.startswith("#")
        assert np.array_equal(pixels[:, : SIZE // 2], source[:, : SIZE // 2])  # unpainted: kept exactly
    assert any(not np.array_equal(np.asarray(image)[:, SIZE // 2 :], source[:, SIZE // 2 :]) for image, _ in edits)
    tabs = by_id(page, "tabs")
    tabs.find_element("css selector", "[data-tab=labels]").click()  # labels and search sample nothing
    assert not by_id(page, "sampling").is_displayed()
    tabs.find_element("css selector", "[data-tab=generate]").click()
    assert by_id(page, "method").is_displayed() and by_id(page, "sampling").is_displayed()


def test_browser_shows_a_bad_settings_error_and_carries_on(page):
    set_field(page, "temperature", "0")
    set_field(page, "prompts", "a red circle")
    by_id(page, "generate").click()
    wait_done(page)
    error = by_id(page, "error")
    assert error.is_displayed() and "temperature" in error.text and "above 0" in error.text
    assert "Traceback" not in error.text and "\n" not in error.text
    set_field(page, "temperature", "-1")
    by_id(page, "generate").click()
    wait_done(page)
    assert "-1" in by_id(page, "error").text
    set_field(page, "temperature", "1")
    by_id(page, "generate").click()
    wait_done(page)
    assert not by_id(page, "error").is_displayed() and len(shown_images(page, "results")) == 2
    assert not by_id(page, "results").find_elements("css selector", ".warning")


def test_browser_shows_the_servers_warning_beside_repeated_images(page):
    set_field(page, "top_k", "1")  # greedy: one image however often it samples
    set_field(page, "prompts", "a red circle")
    by_id(page, "generate").click()
    wait_done(page)
    (note,) = by_id(page, "results").find_elements("css selector", ".group .warning")
    assert note.is_displayed() and "gave only 1 distinct image" in note.text
    assert not by_id(page, "error").is_displayed() and len(shown_images(page, "results")) == 2


def test_browser_run_keeps_the_model_and_settings_it_started_with(page):
    """Picking another model mid-run once sampled the later prompts with it (and its defaults, written over the
    fields): a run now reads them once, and they are locked until it ends."""
    page.execute_script("""
        window.lockedAtCall = [];
        const fetched = window.fetch;
        window.fetch = (...args) => {
          window.lockedAtCall.push(document.getElementById("model").disabled
                                   && document.querySelector("[data-setting=temperature]").disabled);
          document.querySelector("[data-setting=temperature]").value = "0";  // refused, if it were read again
          return fetched(...args);
        };""")
    set_field(page, "prompts", "a red circle\na blue square")
    by_id(page, "generate").click()
    wait_done(page)
    assert not by_id(page, "error").is_displayed() and len(shown_images(page, "results")) == 4
    assert page.execute_script("return window.lockedAtCall") == [True, True]
    assert by_id(page, "model").is_enabled() and page.execute_script(
        "return !document.querySelector('[data-setting=temperature]').disabled"
    )


def test_browser_names_downloads_as_the_command_line_does(page):
    """A prompt of no ASCII letters was saved as image_sSEED_rRANK.png (two such prompts, one name), accents were
    cut (café -> caf), and a seed typed with a space gave every prompt the same seed."""
    import hashlib

    set_field(page, "prompts", "café crème\n🍕🍔")
    set_field(page, "seed", " 5")
    by_id(page, "generate").click()
    wait_done(page)
    names = [a.get_attribute("download") for a in by_id(page, "results").find_elements("css selector", "a[download]")]
    pizza = "prompt-" + hashlib.sha1("🍕🍔".encode()).hexdigest()[:8]
    assert names == ["cafe-creme_s5_r1.png", "cafe-creme_s5_r2.png", f"{pizza}_s6_r1.png", f"{pizza}_s6_r2.png"]
    assert [i.get_attribute("alt") for i in by_id(page, "results").find_elements("css selector", "img")][2] == (
        "🍕🍔, rank 1"
    )


def test_browser_keyboard_enter_runs_and_the_focus_comes_back(page):
    from selenium.webdriver.common.keys import Keys

    by_id(page, "generate").send_keys(Keys.ENTER)  # the focused button, pressed by keyboard
    wait_done(page)
    assert page.execute_script("return document.activeElement.id") == "generate"  # not lost to <body>
    page.execute_script("showTab('labels')")
    by_id(page, "labels-text").send_keys(Keys.ENTER)  # no image: the server's sentence, shown
    wait_done(page)
    assert by_id(page, "error").is_displayed() and page.execute_script("return document.activeElement.id") == (
        "labels-text"
    )
    named = page.execute_script(
        "return ['prompts', 'edit-prompt', 'labels-text', 'query'].map((id) => document.getElementById(id).ariaLabel)"
    )
    assert all(named), named
    page.execute_script("showTab('edit')")  # Enter in a panel's field runs its button
    by_id(page, "edit-prompt").send_keys(Keys.ENTER)
    wait_done(page)
    assert "there is no image to edit" in by_id(page, "error").text
    page.execute_script("showTab('search')")
    set_field(page, "query", "a red square")
    by_id(page, "query").send_keys(Keys.ENTER)
    wait_done(page)
    assert by_id(page, "found").find_elements("css selector", ".card")
    selected = page.execute_script("return [...document.querySelectorAll('#tabs button')].map((b) => b.ariaSelected)")
    assert selected == ["false", "false", "false", "true"]  # the search tab, as shown
    page.execute_script("showTab('generate')")
    set_field(page, "prompts", "a blue square")
    by_id(page, "prompts").send_keys(Keys.CONTROL, Keys.ENTER)
    wait_done(page)
    assert [h.text for h in by_id(page, "results").find_elements("css selector", ".group h3")] == ["a blue square"]


def test_browser_page_fits_a_phone_screen(page):
    page.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 360, "height": 740, "deviceScaleFactor": 1, "mobile": True}
    )
    try:
        set_field(page, "prompts", "a red circle")
        by_id(page, "generate").click()
        wait_done(page)
        assert len(shown_images(page, "results")) == 2
        wide = page.execute_script(
            "return [...document.querySelectorAll('*')].filter((e) => e.getBoundingClientRect().right > 360)"
            ".map((e) => `${e.tagName}#${e.id}.${e.className} ${e.getBoundingClientRect().right}`)"
        )
        assert page.execute_script("return document.documentElement.scrollWidth") <= 360, wide
    finally:
        page.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_browser_stop_ends_a_long_run_and_the_next_one_runs(page):
    """There was no way to stop a run: a prompt of thousands of candidates held the model for everyone."""
    from selenium.webdriver.support.ui import WebDriverWait

    set_field(page, "prompts", "a red circle\na blue square")
    set_field(page, "candidates", "10000")
    set_field(page, "num_images", "1")
    by_id(page, "generate").click()
    WebDriverWait(page, 30, poll_frequency=0.02).until(lambda d: by_id(d, "stop").is_displayed())
    by_id(page, "stop").click()
    wait_done(page)
    error = by_id(page, "error")
    assert error.is_displayed() and error.text == "stopped; what was finished before is kept"
    assert not by_id(page, "progress").is_displayed()
    set_field(page, "candidates", "4")
    set_field(page, "prompts", "a red circle")
    by_id(page, "generate").click()
    wait_done(page)
    assert not by_id(page, "error").is_displayed() and len(shown_images(page, "results")) == 1


def test_browser_page_asks_nothing_of_any_host_but_the_server(page, url):
    set_field(page, "prompts", "a red circle")
    by_id(page, "generate").click()
    wait_done(page)
    requested = [
        message["params"]["request"]["url"]
        for entry in page.get_log("performance")
        if (message := json.loads(entry["message"])["message"])["method"] == "Network.requestWillBeSent"
    ]
    assert any(u.startswith(url + "api/generate") for u in requested)  # the log does see the page's requests
    elsewhere = [u for u in requested if not u.startswith((url, "data:", "blob:"))]
    assert not elsewhere, f"the page asked other hosts: {elsewhere}"


def test_the_app_benchmark_times_a_shipped_bundle_given_as_its_folder(capsys):
    """Once "the app offers no model 'dalle_mini_impl/assets/shapes'": the app loads each bundle once, by its
    shipped name, so the benchmark looked for the folder's name on the page and found none."""
    need_browser()
    from dalle_mini_impl.bench import app as bench_app
    from dalle_mini_impl.pipeline.bundle import bundle_path

    assert bench_app.main(["--model", str(bundle_path("shapes")), "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == "shapes" and len(result["first_image_s"]) == 1
