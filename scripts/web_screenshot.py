"""Take docs/web-page.png: the service's page in headless Chromium after three photos drawn
here (a lipstick, a nail polish, a blush compact: no dataset photo, which may not be
redistributed) were predicted, with one heatmap on. Needs Debian's chromium and
chromium-driver (as tests/test_browser.py). Usage:

    python scripts/web_screenshot.py [--model default] [--out docs/web-page.png]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]


def drawn_photos(folder: Path) -> list[Path]:
    """Three product photos drawn with PIL on soft backgrounds."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []

    def canvas(bg: tuple[int, int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        img = Image.new("RGB", (480, 480), bg)
        return img, ImageDraw.Draw(img)

    img, d = canvas((238, 232, 228))  # a lipstick: case, bullet
    d.rounded_rectangle((190, 250, 290, 440), 10, fill=(40, 38, 42))
    d.rectangle((200, 200, 280, 255), fill=(200, 170, 90))
    d.polygon([(205, 200), (275, 200), (275, 110), (205, 150)], fill=(176, 28, 58))
    out.append(("lipstick.jpg", img))
    img, d = canvas((244, 240, 236))  # a nail polish: bottle, cap
    d.rounded_rectangle((160, 230, 320, 430), 28, fill=(150, 20, 60))
    d.rectangle((215, 110, 265, 235), fill=(20, 20, 20))
    d.ellipse((185, 270, 235, 320), fill=(205, 90, 120))  # a highlight on the glass
    out.append(("nail-polish.jpg", img))
    img, d = canvas((250, 250, 250))  # a blush compact: lid, pan
    d.ellipse((90, 90, 390, 390), fill=(60, 60, 64))
    d.ellipse((130, 130, 350, 350), fill=(232, 128, 120))
    out.append(("blush.jpg", img))
    for name, image in out:
        image.filter(ImageFilter.GaussianBlur(1.2)).save(folder / name, quality=92)
    return [folder / name for name, _ in out]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="a shipped model's name or a checkpoint")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "web-page.png")
    args = p.parse_args(argv)

    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from beautytag.runtime import Engine
    from beautytag.serve import ServeSettings, create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(Engine(args.model), ServeSettings()), log_level="warning")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,1200"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    browser = webdriver.Chrome(options=options, service=service)  # nothing downloaded
    try:
        with tempfile.TemporaryDirectory() as tmp:
            photos = drawn_photos(Path(tmp))
            browser.get(f"http://127.0.0.1:{port}/")
            wait = WebDriverWait(browser, 60)
            wait.until(lambda d: "px" in d.find_element(By.ID, "info").text)
            browser.find_element(By.ID, "picker").send_keys("\n".join(map(str, photos)))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#cards .card .attr")) >= 15)
            card = browser.find_elements(By.CSS_SELECTOR, "#cards .card")[0]
            card.find_element(By.CSS_SELECTOR, ".controls input[type=checkbox]").click()
            note = card.find_element(By.CSS_SELECTOR, ".controls .note")
            wait.until(lambda d: note.text.startswith("showing:"))
            time.sleep(1)
            height = browser.execute_script("return document.body.scrollHeight")
            browser.set_window_size(1200, min(height + 40, 1400))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(args.out))
    finally:
        browser.quit()
        server.should_exit = True
    img = Image.open(args.out).convert("RGB")
    img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
