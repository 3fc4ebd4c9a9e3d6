"""The page at `/` in a real browser: Debian's headless chromium, driven by selenium through chromedriver, against
a real server process. Type a prompt, press Generate, watch the progress bar move and the images appear."""
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from test_serve import start_process

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)  # no driver download
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.mark.slow  # a server process and a browser start: ~20 s on 2 cores
def test_page_generates_with_a_moving_progress_bar(browser, tiny_checkpoint, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    proc, url = start_process(tiny_checkpoint)
    try:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "sampler_name")).options) > 0)
        assert browser.find_element(By.ID, "model").text.startswith("tiny [")
        assert browser.find_element(By.ID, "width").get_attribute("value") == "64"  # the model's own defaults
        browser.find_element(By.ID, "prompt").send_keys("a lighthouse at dusk")
        Select(browser.find_element(By.ID, "sampler_name")).select_by_visible_text("Euler a")
        for field, value in [("steps", "120"), ("seed", "42"), ("batch_size", "3")]:
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "generate").click()

        widths, previews, deadline = [], 0, time.time() + 120
        while not browser.find_elements(By.CSS_SELECTOR, "#gallery .card img"):
            assert time.time() < deadline, "no image appeared"
            w = browser.execute_script("return parseFloat(document.getElementById('bar').style.width) || 0")
            widths.append(w)
            previews += browser.execute_script("return !document.getElementById('preview').hidden")
            time.sleep(0.05)
        moving = sorted({w for w in widths if 0 < w < 100})
        assert len(moving) >= 2, f"the progress bar did not move: {widths[:40]}"
        assert previews > 0, "no live preview was shown"
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .card img")) == 3)
        sizes = browser.execute_script(
            "return [...document.querySelectorAll('#gallery .card img')].map(i => [i.naturalWidth, i.naturalHeight])")
        assert sizes == [[64, 64]] * 3
        captions = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#gallery .card pre")]
        assert {c.split("Seed: ")[1].split(",")[0] for c in captions} == {"42", "43", "44"}
        assert all(c.startswith("a lighthouse at dusk\nSteps: 120, Sampler: Euler a") for c in captions)
        assert browser.find_element(By.ID, "status").text.startswith("done")
        # Reuse fills the form with one image's parameters.
        browser.find_element(By.ID, "seed").clear()
        browser.find_elements(By.CSS_SELECTOR, "#gallery .reuse")[-1].click()
        assert browser.find_element(By.ID, "seed").get_attribute("value") in {"42", "43", "44"}
        assert browser.find_element(By.ID, "batch_size").get_attribute("value") == "1"
        shot = tmp_path / "serve.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        keep = Path(tempfile.gettempdir()) / "latentdiff-serve-screenshot.png"
        shutil.copyfile(shot, keep)  # outlives pytest's tmp_path rotation, for a look after a failure
    finally:
        proc.terminate()
        proc.wait(30)
