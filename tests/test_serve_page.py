"""dg-serve's page in a real headless browser (Debian's chromium, driven by selenium through chromedriver): a chat
turn streams its answer while the canvas is redrawn at every step; the second turn comes from the prefix cache.

Skipped where chromium and chromedriver are not installed, unless DG_REQUIRE_BROWSER=1 (set by .ci/run, which
installs them), so that CI cannot pass without running it."""

import os
import shutil

import pytest

from conftest import serving
from dg_runtime import DiffusionGemma

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# Headless, and nothing that reaches for the network: this machine's network is closed.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
         "--window-size=1280,800"]


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("DG_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium and chromedriver are needed: apt-get install chromium chromium-driver")
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_streams_the_answer_and_redraws_the_canvas(browser, demo_artifact):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model = DiffusionGemma(demo_artifact)
    prompt = "shout: " + "abcdefghij" * 4  # two canvases

    def ask(text: str) -> str:
        browser.find_element(By.ID, "prompt").send_keys(text)
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 60).until(
            lambda d: d.find_element(By.ID, "answer").get_attribute("data-done") == "true")
        return browser.find_element(By.ID, "answer").text

    with serving(model) as base:
        browser.get(base)
        WebDriverWait(browser, 10).until(lambda d: "onnxruntime" in d.find_element(By.ID, "model").text)
        answer = ask(prompt)
        done = model.generate([model.text.chat_ids([{"role": "user", "content": prompt}])], seed=0)
        assert answer == model.text.decode(model.reply(done.tokens[0]))
        canvas = browser.find_element(By.ID, "canvas")
        assert int(canvas.get_attribute("data-updates")) == sum(done.stats.steps_per_block)
        cells = canvas.find_elements(By.CLASS_NAME, "cell")
        assert len(cells) == model.canvas_length and canvas.find_elements(By.CLASS_NAME, "accepted")
        assert f"block {len(done.stats.steps_per_block)}, step" in browser.find_element(By.ID, "where").text
        stats = browser.find_element(By.ID, "stats").text
        assert "2 block(s)" in stats and "tokens/forward" in stats and "0 prompt tokens from the prefix cache" in stats

        assert ask("greet: alice") == "hello alice, nice to meet you"
        assert "0 prompt tokens from the prefix cache" not in browser.find_element(By.ID, "stats").text
        if os.environ.get("DG_SCREENSHOT"):
            browser.save_screenshot(os.environ["DG_SCREENSHOT"])
