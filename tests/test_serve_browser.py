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


@pytest.mark.slow  # a server process and a browser start: ~20 s on 2 cores
def test_page_paints_a_mask_and_inpaints_keeping_the_unmasked_pixels(browser, tiny_checkpoint, tmp_path):
    """Upload a picture, paint a stroke with the brush (and erase part of it), generate: the answer is the
    picture, repainted only within the blur's reach of the painted pixels."""
    import base64
    import io

    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    upload = Image.fromarray((np.random.RandomState(7).rand(64, 64, 3) * 255).astype(np.uint8))
    upload.save(tmp_path / "upload.png")
    proc, url = start_process(tiny_checkpoint)
    try:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "sampler_name")).options) > 0)
        browser.find_element(By.CSS_SELECTOR, "#picture_panel summary").click()
        browser.find_element(By.ID, "init_file").send_keys(str(tmp_path / "upload.png"))
        wait.until(lambda d: d.execute_script("return document.getElementById('mask').width") == 64)
        assert browser.find_element(By.ID, "width").get_attribute("value") == "64"
        browser.find_element(By.ID, "prompt").send_keys("a red flower")
        for field, value in [("steps", "3"), ("seed", "11")]:
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        canvas = browser.find_element(By.ID, "mask")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
        shown = canvas.size["width"]  # the canvas is drawn at the form's width: 64 pixels of picture across it
        browser.execute_script("document.getElementById('brush').value = arguments[0]", round(shown / 64 * 8))
        ActionChains(browser).move_to_element_with_offset(canvas, -shown // 4, 0).click_and_hold() \
            .move_by_offset(shown // 2, 0).release().perform()  # picture x 16..48 at y 32, 8 pixels wide
        browser.find_element(By.ID, "erase").click()
        ActionChains(browser).move_to_element_with_offset(canvas, shown // 8, 0).click_and_hold() \
            .move_by_offset(shown // 16, 0).release().perform()  # rubs out x 40..44
        alpha = np.array(browser.execute_script(
            "const d = document.getElementById('mask').getContext('2d').getImageData(0, 0, 64, 64).data;"
            "return Array.from(d).filter((_, i) => i % 4 === 3);")).reshape(64, 64)
        painted = alpha > 128
        assert painted[32, 20] and painted[32, 30] and not painted[32, 42] and not painted[10, 32]
        assert 150 < painted.sum() < 400, painted.sum()
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .card img"))
        src = browser.find_element(By.CSS_SELECTOR, "#gallery .card img").get_attribute("src")
        out = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")).astype(int)
        src_px = np.asarray(upload).astype(int)
        near = np.zeros((64, 64), bool)  # within the blur's reach (mask blur 4: 10 pixels) of a painted pixel
        for y, x in zip(*np.nonzero(painted)):
            near[max(0, y - 10):y + 11, max(0, x - 10):x + 11] = True
        assert (~near).sum() > 1500 and np.array_equal(out[~near], src_px[~near])
        assert np.abs(out[painted] - src_px[painted]).mean() > 20
        caption = browser.find_element(By.CSS_SELECTOR, "#gallery .card pre").text
        assert "Denoising strength: 0.75" in caption and "Mask blur: 4" in caption
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow  # a server process and a browser start, two generations: ~25 s on 2 cores
def test_page_hires_fix_doubles_the_picture_and_sends_its_fields_only_when_ticked(browser, tiny_checkpoint, tmp_path):
    """Tick "Hires. fix", pick an upscaler listed by the server, upscale by 2 with 3 hires steps: the picture is
    twice the first pass's size, and the txt2img request carried enable_hr and the hires values; untick it and the
    request carries none of them; a picture to start from turns it off."""
    import json

    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from latentdiff.io.images import parse_parameters
    proc, url = start_process(tiny_checkpoint)
    try:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "sampler_name")).options) > 0)
        upscaler = Select(browser.find_element(By.ID, "hr_upscaler"))
        names = [o.get_attribute("value") for o in upscaler.options]  # latent modes, then GET /sdapi/v1/upscalers
        assert names[:2] == ["Latent", "Latent (antialiased)"] and {"Lanczos", "Nearest"} <= set(names), names
        assert upscaler.first_selected_option.get_attribute("value") == "Latent"
        assert browser.find_element(By.ID, "hr_denoising_strength").get_attribute("value") == "0.7"
        assert not browser.find_element(By.ID, "hires").is_displayed()
        browser.execute_script(  # keep every body the page posts
            "window.sent = []; const f = window.fetch; window.fetch = (path, init) => {"
            " if (init && init.body) window.sent.push([path, init.body]); return f(path, init); };")
        browser.find_element(By.ID, "enable_hr").click()
        assert browser.find_element(By.ID, "hires").is_displayed()
        browser.find_element(By.ID, "prompt").send_keys("a lighthouse at dusk")
        upscaler.select_by_visible_text("Lanczos")
        for field, value in [("steps", "2"), ("seed", "5"), ("hr_scale", "2"), ("hr_second_pass_steps", "3"),
                             ("hr_denoising_strength", "0.5")]:
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        assert browser.find_element(By.ID, "hr_size").text == "from 64x64 to 128x128"
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .card img"))
        assert browser.find_element(By.ID, "status").text.startswith("done"), browser.find_element(By.ID, "status").text
        size = browser.execute_script("const i = document.querySelector('#gallery .card img');"
                                      "return [i.naturalWidth, i.naturalHeight]")
        assert size == [128, 128]
        caption = browser.find_element(By.CSS_SELECTOR, "#gallery .card pre").text
        info = parse_parameters(caption)
        assert float(info["Hires upscale"]) == 2 and info["Hires steps"] == "3" and info["Size"] == "64x64"
        assert info["Hires upscaler"] == "Lanczos" and info["Denoising strength"] == "0.5"
        (path, body), = browser.execute_script("return window.sent")
        body = json.loads(body)
        assert path.endswith("/sdapi/v1/txt2img")
        assert {k: body[k] for k in ["enable_hr", "hr_scale", "hr_second_pass_steps", "hr_upscaler",
                                     "denoising_strength", "hr_resize_x", "hr_resize_y"]} == \
            {"enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 3, "hr_upscaler": "Lanczos",
             "denoising_strength": 0.5, "hr_resize_x": 0, "hr_resize_y": 0}
        # Unticked: a plain first pass, and no hires field in the request.
        browser.find_element(By.ID, "enable_hr").click()
        assert not browser.find_element(By.ID, "hires").is_displayed()
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .card img")) == 2)
        size = browser.execute_script("const i = document.querySelector('#gallery .card img');"
                                      "return [i.naturalWidth, i.naturalHeight]")
        assert size == [64, 64]
        body = json.loads(browser.execute_script("return window.sent")[-1][1])
        assert not {"enable_hr", "denoising_strength"} & set(body) and not any(k.startswith("hr_") for k in body)
        # Reuse on the hires picture ticks the box again with its values.
        browser.find_elements(By.CSS_SELECTOR, "#gallery .reuse")[-1].click()
        assert browser.find_element(By.ID, "enable_hr").is_selected()
        assert browser.find_element(By.ID, "hires").is_displayed()
        assert [browser.find_element(By.ID, k).get_attribute("value") for k in
                ["hr_upscaler", "hr_second_pass_steps", "hr_denoising_strength"]] == ["Lanczos", "3", "0.5"]
        assert float(browser.find_element(By.ID, "hr_scale").get_attribute("value")) == 2
        # A picture to start from (img2img) turns it off: A1111's img2img has no hires fix.
        Image.new("RGB", (64, 64), "gray").save(tmp_path / "upload.png")
        browser.find_element(By.CSS_SELECTOR, "#picture_panel summary").click()
        browser.find_element(By.ID, "init_file").send_keys(str(tmp_path / "upload.png"))
        wait.until(lambda d: not d.find_element(By.ID, "enable_hr").is_enabled())
        assert not browser.find_element(By.ID, "hires").is_displayed()
        browser.find_element(By.ID, "clear_picture").click()
        assert browser.find_element(By.ID, "enable_hr").is_enabled()
        assert browser.find_element(By.ID, "hires").is_displayed()
    finally:
        proc.terminate()
        proc.wait(30)
