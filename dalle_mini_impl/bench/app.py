"""How soon the web app's page shows its first image after Generate is pressed, in a real browser.

    python -m dalle_mini_impl.bench.app                                   # 5 timed presses, one JSON object
    python -m dalle_mini_impl.bench.app --screenshot docs/images/app.png  # and the screenshot the README shows
    python -m dalle_mini_impl.bench.app --model emoji --repeats 10

Starts `python -m sample.app` (the shipped bundles, plus --model when it names another) on a free port, opens
its page in headless Chromium through selenium (the system's chromium and chromedriver, found on PATH; `pip
install selenium`, part of the dev extra), generates once to warm up, then --repeats times presses Generate with
the page's default prompt and the model's default settings, and times from the press to the first result image
decoded on the page, by the page's own clock (listeners the benchmark adds; the app has no timing code). The
target: within 3 s on a CPU once the model is loaded. Prints one JSON object on stdout: seconds per
press, their median, what was sampled, the browser and the machine. With --screenshot it then generates a few
prompts and saves the window as a PNG.

`find_browser` and `start_browser` serve the browser test (tests/test_app_browser.py) too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from ..errors import UserError, run_cli

TARGET_S = 3.0
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
DRIVERS = ("chromedriver",)
DRIVER_FALLBACKS = ("/usr/lib/chromium/chromedriver", "/usr/lib/chromium-browser/chromedriver")
SCREENSHOT_PROMPTS = ("a red circle", "a blue square on the left", "a green triangle at the top")

# Run in the page before a press: stamp the press (a capturing listener runs before the button's own) and the
# moment the first result image under #results has been decoded.
WATCH = """
window.benchPressed = null; window.benchFirstImage = null;
const results = document.getElementById("results");
document.addEventListener("click", () => { window.benchPressed = performance.now(); }, {capture: true, once: true});
new MutationObserver((records, observer) => {
  const img = results.querySelector("img");
  if (!img) return;
  observer.disconnect();
  img.decode().then(() => { window.benchFirstImage = performance.now(); });
}).observe(results, {childList: true, subtree: true});
"""


def find_browser() -> tuple[str, str] | None:
    """(Chromium's binary, its chromedriver) on this machine, or None when either is missing."""
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    driver = next((found for name in DRIVERS if (found := shutil.which(name))), None)
    driver = driver or next((p for p in DRIVER_FALLBACKS if os.access(p, os.X_OK)), None)
    return (browser, driver) if browser and driver else None


def start_browser(width: int = 1280, height: int = 900, network_log: bool = False):
    """Headless Chromium driven by selenium through the system's chromedriver (never one downloaded); with
    network_log, Chrome's performance log (Network.* events) is recorded for `driver.get_log("performance")`."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise UserError("selenium is not installed; run pip install selenium (or pip install -e '.[dev]')") from None
    found = find_browser()
    if found is None:
        raise UserError(
            "no Chromium and chromedriver were found on PATH; install them (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in (
        "--headless=new",
        f"--window-size={width},{height}",
        "--disable-gpu",
        "--disable-dev-shm-usage",  # containers have a small /dev/shm
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",  # no update checks or other calls home
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
    ):
        options.add_argument(arg)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    if network_log:
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=found[1]), options=options)


def start_app(models: list[str]) -> tuple[subprocess.Popen, str]:
    """`python -m sample.app` on a free port: (the process, the address it printed)."""
    cmd = [sys.executable, "-m", "sample.app", "--port", "0", *(x for m in models for x in ("--model", m))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()  # the first line, once the models are loaded
    if not url.startswith("http://"):
        proc.kill()
        raise UserError(f"python -m sample.app did not start (exit {proc.wait()}); its error is above")
    return proc, url


def wait_ready(driver, url: str, timeout: float = 60) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))


def press_generate(driver, timeout: float = 300) -> float:
    """Press Generate, wait until the page is done; seconds from the press to the first image decoded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script(WATCH)
    driver.find_element(By.ID, "generate").click()
    wait = WebDriverWait(driver, timeout, poll_frequency=0.02)
    wait.until(lambda d: d.execute_script("return window.benchFirstImage !== null"))
    wait.until(lambda d: d.find_element(By.ID, "generate").is_enabled())  # every prompt done
    error = driver.find_element(By.ID, "error")
    if error.is_displayed():
        raise UserError(f"the page showed an error: {error.text}")
    return driver.execute_script("return (window.benchFirstImage - window.benchPressed) / 1000")


def select_model(driver, name: str) -> dict:
    """Pick the model called `name` in the page's list; its entry of /api/info."""
    index = driver.execute_script("return info.models.findIndex((m) => m.name === arguments[0])", name)
    if index < 0:
        raise UserError(f"the app offers no model '{name}'; pass --model with a shipped name or a bundle folder")
    driver.execute_script(
        "const s = document.getElementById('model'); s.value = arguments[0]; s.dispatchEvent(new Event('change'));",
        str(index),
    )
    return driver.execute_script("return info.models[arguments[0]]", index)


def set_prompts(driver, prompts) -> None:
    driver.execute_script("document.getElementById('prompts').value = arguments[0]", "\n".join(prompts))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dalle_mini_impl.bench.app",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", default="shapes", help="the model picked on the page: shapes (default), emoji or a folder"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed presses of Generate after one warm-up (default 5)")
    p.add_argument("--screenshot", default=None, metavar="PNG", help="then save the page with a few prompts' results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.repeats < 1:
        raise UserError(f"--repeats is {args.repeats}; time at least 1 press")
    from dalle_mini_impl.pipeline.bundle import bundle_path

    # a shipped bundle's folder is offered on the page by the bundle's name (the app loads each bundle once)
    shipped = {bundle_path(name).resolve(): name for name in ("shapes", "emoji")}
    args.model = shipped.get(bundle_path(args.model).resolve(), args.model)
    extra = [] if args.model in ("shapes", "emoji") else [args.model]
    driver = start_browser(width=1200, height=820)  # a missing browser is said before the models load
    proc, url = None, None
    try:
        proc, url = start_app(extra)
        wait_ready(driver, url)
        model = select_model(driver, args.model)
        prompt = driver.execute_script("return document.getElementById('prompts').value")
        print(f"warm-up at {url} ...", file=sys.stderr)
        press_generate(driver)
        times = []
        for i in range(args.repeats):
            times.append(round(press_generate(driver), 3))
            print(f"press {i + 1}: {times[-1]:.3f} s", file=sys.stderr)
        if args.screenshot:  # a window tall enough for every prompt's row of images
            driver.set_window_size(1200, 1100)
            set_prompts(driver, SCREENSHOT_PROMPTS)
            press_generate(driver)
            Path(args.screenshot).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.screenshot))
        browser = f"{driver.capabilities.get('browserName')} {driver.capabilities.get('browserVersion')}"
    finally:
        driver.quit()
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    median = statistics.median(times)
    result = {
        "first_image_s": times,
        "median_s": round(median, 3),
        "target_s": TARGET_S,
        "met": median <= TARGET_S,
        "model": args.model,
        "prompt": prompt,
        "settings": model["defaults"],
        "browser": browser,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if args.screenshot:
        result["screenshot"] = str(args.screenshot)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
