"""The demo report in a real browser: headless Chromium (Playwright driving the system's
chromium) opens a report built from a small fixture (tests/report_fixture.py, no demo run),
every image and linked video must load, the verdicts and targets the page shows must be those
of metrics.json, and the grid of videos must come before the targets and the plots. A screenshot
of the page goes to demo_out/report/browser_check.png."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
from report_fixture import DURATIONS, PROMPTS, build_report

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "demo_out" / "report" / "browser_check.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

playwright = pytest.importorskip(
    "playwright.sync_api", reason="pip install playwright (pyproject's test extra)"
)
if CHROMIUM is None:
    pytest.skip("no chromium on this machine (.ci/run installs Debian's)", allow_module_level=True)

LOADED = """() => ({
  images: [...document.images].map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0})),
  links: [...document.querySelectorAll('a[href$=".mp4"]')].map(a => a.getAttribute('href')),
})"""
FETCH = """async (hrefs) => Promise.all(hrefs.map(async h => {
  const r = await fetch(h); const b = await r.arrayBuffer();
  return {href: h, ok: r.ok, bytes: b.byteLength};
}))"""
SHOWN = """() => ({
  cells: [...document.querySelectorAll('figure.cell')].map(c => ({
    video: c.dataset.video,
    verdicts: Object.fromEntries([...c.querySelectorAll('li.verdict')].map(li =>
      [li.dataset.attribute, {ok: li.dataset.ok === 'true', text: li.textContent,
                              green: getComputedStyle(li).backgroundColor}])),
  })),
  targets: Object.fromEntries([...document.querySelectorAll('td[data-target]')].map(td =>
      [td.dataset.target, td.dataset.met === 'true'])),
  top: Object.fromEntries(['videos', 'targets', 'plots', 'details'].map(id =>
      [id, document.getElementById(id).getBoundingClientRect().top])),
})"""


@pytest.fixture
def served_report(tmp_path):
    index = build_report(tmp_path)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(index.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield index, f"http://127.0.0.1:{server.server_address[1]}/index.html"
    server.shutdown()


def test_the_report_loads_and_shows_the_verdicts_of_its_metrics(served_report):
    index, url = served_report
    metrics = json.loads((index.parent / "metrics.json").read_text())
    (family,) = metrics["families"]
    recorded = {v["name"]: v["verdicts"] for v in family["videos"]}
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, wait_until="load")
            loaded = page.evaluate(LOADED)
            fetched = page.evaluate(FETCH, loaded["links"])
            shown = page.evaluate(SHOWN)
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()

    cells = len(PROMPTS) * len(DURATIONS)
    assert len(loaded["images"]) == 2 * cells + 4 + cells  # grid pairs, plots, samples table
    assert [i["src"] for i in loaded["images"] if not i["ok"]] == []
    assert len(fetched) == cells and all(f["ok"] and f["bytes"] > 0 for f in fetched), fetched

    assert {c["video"] for c in shown["cells"]} == {n for n, v in recorded.items()}
    for cell in shown["cells"]:
        want = recorded[cell["video"]]
        assert set(cell["verdicts"]) == {"colour", "shape", "direction", "motion"}
        for attribute, got in cell["verdicts"].items():
            assert got["ok"] == want[attribute]["ok"], (cell["video"], attribute)
            assert got["text"].startswith("✓" if want[attribute]["ok"] else "✗")
            seen = want[attribute]["seen"]
            assert (f"{seen:.1f} px/s" if attribute == "motion" else str(seen)) in got["text"]
        colours = {got["green"] for got in cell["verdicts"].values() if got["ok"]}
        assert len(colours) <= 1  # every met verdict in the same (green) style
    assert any(not got["ok"] for cell in shown["cells"] for got in cell["verdicts"].values())
    assert shown["targets"] == {name: t["met"] for name, t in family["targets"].items()}
    top = shown["top"]
    assert top["videos"] < top["targets"] < top["plots"] < top["details"]
    assert SCREENSHOT.stat().st_size > 10_000
