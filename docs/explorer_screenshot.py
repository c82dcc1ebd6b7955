"""Take the README's screenshot of an explorer page in headless chromium.

    ipg demo   # writes outputs/demo/attribution_length.html among its outputs
    python docs/explorer_screenshot.py outputs/demo/attribution_length.html docs/explorer.png

Opens the page, chooses its top traced component, shades the tokens by their contribution to the score,
and saves a PNG of the window. Needs ``playwright`` (the test extra) and Debian's ``chromium``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright


def main() -> None:
    """Parse the arguments and save the screenshot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="an explorer page (ipg explore, or the demo's attribution_*.html)")
    parser.add_argument("output", type=Path, help="the PNG to write")
    parser.add_argument("--view", choices=["activation", "contribution"], default="contribution", help="how tokens are shaded")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH: install Debian's chromium package")
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(args.page.resolve().as_uri())
        page.locator("tr.component-row:has(.dot)").first.click()  # the top traced component
        page.locator(f"#view-{args.view}").check()
        page.screenshot(path=str(args.output))
        browser.close()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
