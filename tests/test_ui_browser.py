"""``compactvl ui`` in a real browser: the page served on 127.0.0.1 (a tiny random saved model) and driven by headless
Chromium through selenium — upload an image, type a question, pick a method, press Run, wait for the answer, find the
overlay images. A screenshot goes to $COMPACTVL_TEST_ARTIFACTS (else tests/artifacts/).

Needs gradio, selenium, chromium and chromedriver: skipped without them, except under CI=true, where it fails saying
what to install."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ARTIFACTS = Path(os.environ.get("COMPACTVL_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
# Without the background-networking flags Chromium waits on calls home that a closed network never answers.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1100")


def _missing(what: str, install: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"the browser test needs {what}, which is missing on this CI machine: {install}")
    pytest.skip(f"{what} is missing ({install})")


def _tool(names: tuple[str, ...], env: str) -> str:
    for name in (os.environ.get(env), *names):
        if name and (found := shutil.which(name)):
            return found
    _missing(names[0], f"apt-get install chromium chromium-driver, or set {env}")


@pytest.fixture(scope="module")
def browser_tools():
    try:
        import gradio  # noqa: F401 - only whether it is installed
    except ModuleNotFoundError:
        _missing("gradio", "pip install 'compactvl[ui]'")
    try:
        import selenium  # noqa: F401 - the same
    except ModuleNotFoundError:
        _missing("selenium", "pip install 'compactvl[test]'")
    return (_tool(("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"), "CHROMIUM"),
            _tool(("/usr/bin/chromedriver", "chromedriver"), "CHROMEDRIVER"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page(browser_tools, tmp_path_factory):
    from compactvl.encoders.tiny import tiny_encoder  # here, after the tools check: the module loads without them
    from compactvl.model import CompactVLM  # (the same)
    from compactvl.testing import tiny_lm, tiny_tokenizer  # (the same)
    from compactvl.ui import Session, launch  # (the same; launch imports gradio)

    path = tmp_path_factory.mktemp("ui-browser") / "model"
    encs = [tiny_encoder("clip", image_size=32)]
    CompactVLM.build(lm=tiny_lm("llama"), tokenizer=tiny_tokenizer(), encoders=encs).eval().save_pretrained(path)
    port = _free_port()
    app = launch(Session(CompactVLM.from_pretrained(path), max_new_tokens=6), "tiny", port=port, block=False)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        app.close()


@pytest.fixture(scope="module")
def driver(browser_tools, tmp_path_factory):
    from selenium import webdriver  # selenium may be missing: the tools check skips (or fails under CI) first
    from selenium.webdriver.chrome.service import Service  # (the same)

    chromium, chromedriver = browser_tools
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    d = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    d.set_page_load_timeout(60)
    try:
        yield d
    finally:
        d.quit()


def test_upload_ask_run_and_see_the_overlay(page, driver, tmp_path):
    from selenium.webdriver.common.by import By  # selenium may be missing (see the driver fixture)
    from selenium.webdriver.common.keys import Keys  # (the same)
    from selenium.webdriver.support import expected_conditions as EC  # (the same)
    from selenium.webdriver.support.ui import WebDriverWait  # (the same)

    rng = np.random.default_rng(0)
    image = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    wait = WebDriverWait(driver, 120)
    driver.get(page)
    upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))
    upload.send_keys(str(image))
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#image [aria-label='photo.png']")))  # uploaded
    driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys("What is in the picture?")
    method = driver.find_element(By.CSS_SELECTOR, "#method input")
    method.click()
    method.send_keys(Keys.CONTROL, "a")
    method.send_keys("fastv")
    wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#method li[role=option][aria-label='fastv']"))).click()
    assert method.get_attribute("value") == "fastv"
    driver.find_element(By.ID, "run").click()
    wait.until(lambda d: "fastv at 25%" in d.find_element(By.ID, "status").text
               or "Error" in d.find_element(By.ID, "status").text)
    status = driver.find_element(By.ID, "status").text
    assert "fastv at 25%" in status and "visual tokens enter the LM" in status, status
    table = driver.find_element(By.ID, "table").text
    assert "as saved (uncompressed)" in table and "LLM GMACs" in table, table
    for component in ("overlay", "overlay-baseline", "layers"):
        img = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f"#{component} img")))
        assert img.get_attribute("src"), component
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / "ui_browser.png"))
