"""index.html in a real headless Chromium: it renders, and every embedded figure decodes."""

from __future__ import annotations

import html
import json
import re
import subprocess
from pathlib import Path

import pytest

from duplus.report.build import run_report

from .conftest import make_config, write_results

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason="needs /usr/bin/chromium (Debian package 'chromium', not installed here) to render index.html",
)

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1280,2400"]

# Appended to a copy of the page: after every image has loaded (or failed), record what decoded.
PROBE = """<script>
window.addEventListener("load", function () {
  var found = Array.prototype.map.call(document.images, function (img) {
    return [img.getAttribute("src"), img.naturalWidth, img.naturalHeight];
  });
  var out = document.createElement("pre");
  out.id = "img-probe";
  out.textContent = JSON.stringify(found);
  document.body.appendChild(out);
});
</script>
"""


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args]
    try:
        return subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120,
                              check=False)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"chromium did not finish in 120 s: {' '.join(command)} ({error})")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    run_report(make_config(root), write_results(root / "results"), root / "report")
    return root / "report"


def test_screenshot_of_the_page_is_not_blank(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "page.png"
    done = _chromium(tmp_path / "profile", f"--screenshot={shot}", (report / "index.html").as_uri())
    assert shot.is_file(), f"no screenshot; chromium said: {done.stderr[-2000:]}"
    assert shot.stat().st_size > 20_000
    with Image.open(shot) as image:
        assert image.size[0] >= 800 and image.size[1] >= 600
        # Text, tables and figures give many colours; a blank or error page gives a handful.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50


def test_every_image_decodes_in_the_browser(report, tmp_path):
    page = report / "_probe.html"
    page.write_text((report / "index.html").read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
                    encoding="utf-8")
    done = _chromium(tmp_path / "profile", "--virtual-time-budget=15000", "--dump-dom", page.as_uri())
    match = re.search(r'<pre id="img-probe">(.*?)</pre>', done.stdout, re.S)
    assert match, f"probe did not run; chromium said: {done.stderr[-2000:]}"
    images = json.loads(html.unescape(match.group(1)))
    assert len(images) == 7
    assert [src for src, width, height in images if width <= 0 or height <= 0] == []
