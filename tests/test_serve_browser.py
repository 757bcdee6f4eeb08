"""``weakloc serve``'s page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium; nothing downloaded at run time) uploads an image, waits
for the overlay, moves the threshold slider and checks the boxes changed (and equal the server's
boxes at that threshold), switches the method, and saves a screenshot.

Skipped, saying why, only where no Chromium or chromedriver is installed (``.ci/run`` installs
them). The walk-through is :func:`walk_through`; the README's screenshot comes from it too:

    uv run python tests/test_serve_browser.py MODEL IMAGE docs/images/serve.png [METHOD STEPS IMAGES_DIR]
"""

from __future__ import annotations

import io
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver") or next((p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.exists(p)), None)
NO_BROWSER = ("no Chromium and chromedriver found (Debian: apt-get install chromium chromium-driver; .ci/run installs them)"
              if not (CHROMIUM and CHROMEDRIVER) else None)


def browser(width: int = 1280, height: int = 900):
    """Headless Chromium under Selenium, with the system browser and driver (no download)."""
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", f"--window-size={width},{height}",
                "--disable-extensions", "--no-first-run", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=ChromeService(executable_path=CHROMEDRIVER), options=options)


def _boxes(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [r.get_attribute("data-bbox") for r in driver.find_elements(By.CSS_SELECTOR, "#boxes rect.box")]


def walk_through(driver, url: str, image: Path, screenshot: Path, method: str = "gradcam", steps: int = 25,
                 timeout: float = 60) -> dict:
    """Load the page, upload ``image``, wait for its overlay, press the threshold slider's right
    arrow ``steps`` times (0.01 each), switch to ``method``, and save ``screenshot``.

    Returns:
        what was seen: ``result`` (the first result's id), ``threshold`` (before, after),
        ``boxes_before`` / ``boxes_after`` (each box's ``x,y,w,h``), ``method`` (after the
        switch), ``name`` (the shown file name).
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(driver, timeout)
    stage = (By.ID, "stage")
    driver.get(url)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#method option"))
    driver.find_element(By.ID, "file-input").send_keys(str(Path(image).resolve()))
    wait.until(ec.text_to_be_present_in_element_attribute(stage, "data-state", "ready"))
    seen = {"result": driver.find_element(*stage).get_attribute("data-result"), "boxes_before": _boxes(driver),
            "name": driver.find_element(By.ID, "result-name").text}
    slider = driver.find_element(By.ID, "threshold")
    before = slider.get_attribute("value")
    slider.click()  # a click moves the thumb to where it lands: set a known start with the keyboard
    slider.send_keys(Keys.HOME)
    for _ in range(int(round(float(before) * 100))):
        slider.send_keys(Keys.ARROW_RIGHT)
    for _ in range(steps):
        slider.send_keys(Keys.ARROW_RIGHT)
    after = slider.get_attribute("value")
    wait.until(lambda d: d.find_element(*stage).get_attribute("data-threshold") == after
               and d.find_element(*stage).get_attribute("data-state") == "ready")
    seen |= {"threshold": (before, after), "boxes_after": _boxes(driver)}
    driver.find_element(By.ID, "show-masks").click()
    Select(driver.find_element(By.ID, "method")).select_by_value(method)
    wait.until(lambda d: d.find_element(*stage).get_attribute("data-method") == method
               and d.find_element(*stage).get_attribute("data-state") == "ready")
    seen["method"] = driver.find_element(*stage).get_attribute("data-method")
    seen["mask_shown"] = driver.find_element(By.ID, "mask").is_displayed()
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(screenshot))
    return seen


@pytest.mark.skipif(NO_BROWSER is not None, reason=NO_BROWSER or "")
def test_the_page_in_a_real_browser(tmp_path):
    import httpx
    import torch
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    from weakloc.models import ModelConfig, WeaklocNet
    from weakloc.serve.app import BackgroundServer, create_app
    from weakloc.serve.service import Service

    torch.manual_seed(0)
    classes = ["<script>alert(1)</script>", "b", "c"]  # a class name that is markup must show as text
    model = WeaklocNet(ModelConfig(backbone="test_resnet", classes=classes, input_size=48, output_stride=8, drop_rate=0.0),
                       pretrained="none").eval()
    name = "<img src=x onerror=alert(2)>.png"  # and a file name
    image = tmp_path / name
    g = np.random.default_rng(4)
    Image.fromarray(g.integers(0, 256, (8, 10, 3), dtype=np.uint8)).resize((200, 160), Image.BILINEAR).save(image)
    service = Service(model, window=0.0)
    driver = browser()
    try:
        with BackgroundServer(create_app(service)) as url:
            seen = walk_through(driver, url + "/", image, tmp_path / "shots" / "serve.png", method="gradcam")
            # the page's boxes after the slider are the server's at that threshold (from the kept maps)
            api = httpx.get(f"{url}/api/results/{seen['result']}", params={"threshold": seen["threshold"][1]}).json()
            assert seen["boxes_after"] == [",".join(f"{v:g}" for v in a["bbox"]) for a in api["annotations"]]
            first = httpx.get(f"{url}/api/results/{seen['result']}").json()
            assert seen["boxes_before"] == [",".join(f"{v:g}" for v in a["bbox"]) for a in first["annotations"]]
            rows = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#classes td:first-child")]
            tabs = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "#map-tabs button")]
            injected = driver.find_elements(By.CSS_SELECTOR, "#view img[src='x'], #classes script, #map-tabs script, #result-name *")
            logs = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            with pytest.raises(NoAlertPresentException):
                driver.switch_to.alert.text  # noqa: B018 -- no script of a name ran
    finally:
        driver.quit()
        service.close()
    assert seen["threshold"] == ("0.3", "0.55")
    assert seen["boxes_before"] and seen["boxes_after"] != seen["boxes_before"]
    assert seen["method"] == "gradcam" and seen["mask_shown"]
    assert seen["name"] == name and classes[0] in rows and not injected
    assert any(t.startswith(classes[0]) for t in tabs) or any(t.startswith(c) for c in classes[1:] for t in tabs)
    assert not logs, logs  # no script error, no refused resource (the content security policy holds)
    shot = Image.open(tmp_path / "shots" / "serve.png")
    assert shot.size[0] >= 1000 and np.asarray(shot.convert("L")).std() > 10  # a real picture, not a blank page


def main(argv: list[str]) -> None:
    """Screenshot of ``MODEL`` serving ``IMAGE`` (the README's), by :func:`walk_through`: arguments
    ``MODEL IMAGE OUT [METHOD [STEPS [IMAGES_DIR]]]``."""
    from weakloc.models import load_model
    from weakloc.serve.app import BackgroundServer, create_app
    from weakloc.serve.service import Service

    model_dir, image, out = map(Path, argv[:3])
    method = argv[3] if len(argv) > 3 else "gradcam"
    steps = int(argv[4]) if len(argv) > 4 else 10
    images = argv[5] if len(argv) > 5 else None
    if NO_BROWSER:
        raise SystemExit(NO_BROWSER)
    service = Service(load_model(model_dir, "cpu"), window=0.0)
    driver = browser(1280, 960)
    try:
        with BackgroundServer(create_app(service, images=images)) as url:
            print(walk_through(driver, url + "/", image, out, method=method, steps=steps))
    finally:
        driver.quit()
        service.close()
    # keep the README's picture small
    Image.open(out).convert("RGB").save(out, optimize=True)
    print(f"wrote {out} ({io.BytesIO(out.read_bytes()).getbuffer().nbytes} bytes)")


if __name__ == "__main__":
    main(sys.argv[1:])
