"""The HTML report in a real browser: headless Chromium renders report.html to a PNG and reports its layout.

A copy of the report gets a small probe script that, once the page has loaded, writes into the DOM every
<img> whose naturalWidth is 0 (broken) and the page's scrollWidth against the window's width (overflow);
`chromium --dump-dom` returns that DOM. The screenshot is decoded and must not be blank. A page with a
broken image and one wider than the window are checked too, so the probe is known to bite.

Needs the Debian package `chromium` (.ci/run installs it); without it these tests skip, loudly.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from refdir.flows.report import write_report
from tests.test_report import RUN, build_synthetic

WIDTH, HEIGHT = 1280, 1600
PROBE = """
<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.dataset.plot || i.alt || i.src.slice(0, 40));
  const out = document.createElement("pre");
  out.id = "refdir-probe";
  out.textContent = JSON.stringify({images: imgs.length, broken: broken, inner: window.innerWidth,
                                    scroll: document.documentElement.scrollWidth});
  document.body.appendChild(out);
});
</script>
"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("SKIPPED LOUDLY: no chromium on PATH (apt-get install -y chromium); .ci/run installs it")


def _flags(tmp: Path) -> list[str]:
    return [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--no-first-run", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
            f"--user-data-dir={tmp / 'chromium-profile'}", f"--window-size={WIDTH},{HEIGHT}",
            "--virtual-time-budget=10000"]


def probe(html: str, tmp: Path) -> dict:
    page = tmp / "probe.html"
    page.write_text(html.replace("</body>", PROBE + "</body>") if "</body>" in html else html + PROBE)
    res = subprocess.run(_flags(tmp) + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180)
    m = re.search(r'<pre id="refdir-probe">(.*?)</pre>', res.stdout, re.S)
    assert m, f"chromium gave no probe result (rc {res.returncode}): {res.stderr[-2000:]}"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def screenshot(html_path: Path, tmp: Path) -> np.ndarray:
    from PIL import Image

    png = tmp / "report.png"
    res = subprocess.run(_flags(tmp) + [f"--screenshot={png}", html_path.as_uri()], capture_output=True, text=True,
                         timeout=180)
    assert png.exists(), f"no screenshot (rc {res.returncode}): {res.stderr[-2000:]}"
    img = Image.open(io.BytesIO(png.read_bytes())).convert("RGB")
    assert img.size == (WIDTH, HEIGHT)
    return np.asarray(img)


@pytest.fixture
def report_html(tmp_path) -> Path:
    store, _, _ = build_synthetic(tmp_path / "store")
    rel = write_report(store, RUN, errors={"broken": "ModelLoadError: the weights are gone"})
    out = tmp_path / "report.html"
    out.write_bytes(store.read_bytes(rel))
    return out


def test_report_renders_in_chromium_without_broken_images_or_overflow(report_html, tmp_path):
    got = probe(report_html.read_text(), tmp_path)
    assert got["images"] >= 6 and got["broken"] == [], got
    assert got["scroll"] <= got["inner"] == WIDTH, f"page is {got['scroll']} px wide in a {got['inner']} px window"
    pixels = screenshot(report_html, tmp_path)
    gray = pixels.mean(axis=2)
    assert gray.std() > 10, "the screenshot is blank"
    assert (gray < 128).mean() > 0.01, "no dark text or plot lines on the page"


def test_probe_catches_a_broken_image_and_a_wide_page(tmp_path):
    broken = '<html><body><img data-plot="bad" src="data:image/png;base64,AAAA"></body></html>'
    assert probe(broken, tmp_path)["broken"] == ["bad"]
    wide = f'<html><body><div style="width:{WIDTH * 2}px">wide</div></body></html>'
    got = probe(wide, tmp_path)
    assert got["scroll"] > got["inner"]
