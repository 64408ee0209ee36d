"""The evaluation's and the gate's HTML pages, opened in a real browser (headless Chromium) from an empty folder:
the plots render from the page alone and a model-written summary can never inject markup."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from blueprint.config import parse
from blueprint.eval import report
from blueprint.stages import evaluate, ppo_round
from blueprint.stages.profiles import stage_settings
from blueprint.store import storage
from tests.conftest import SMOKE_PPO

SMOKE_EVALUATE = {**stage_settings("smoke", "evaluate"), "max_examples": 8}

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None and not __import__("os").environ.get("CI"),
    reason="headless Chromium (Debian's chromium) is not installed",
)
# after load, the page states each image's decoded width: 0 means it did not render
PROBE = (
    "<script>window.addEventListener('load',()=>{document.body.setAttribute('data-widths',"
    "[...document.images].map(i=>i.naturalWidth).join(','))});</script>"
)


def rendered_widths(page: str, folder: Path) -> list[int]:
    """Load `page` alone in `folder` (nothing beside it) in headless Chromium; the widths its images decoded to."""
    path = folder / "page.html"
    path.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    found = re.search(r'data-widths="([0-9,]*)"', dom)
    assert found, dom[-2000:]
    return [int(w) for w in found.group(1).split(",") if w]


def test_markup_in_a_report_is_shown_as_text_and_a_missing_image_is_refused(tmp_path):
    page = report.html_page("# r\n\n- generated summary: '<script>alert(1)</script><img src=x>'\n", "r")
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    with pytest.raises(ValueError, match="curves.png"):
        report.html_page("![c](curves.png)\n", "r", {})


@needs_browser
def test_the_evaluation_page_renders_both_plots_from_the_page_alone(smoke_chain, tmp_path):
    root = f"file://{tmp_path}/art"
    rnd = ppo_round.run(
        parse(ppo_round.PPORoundConfig, SMOKE_PPO),
        shards=smoke_chain["shards"],
        base=smoke_chain["base"],
        adapters=smoke_chain["adapters"],
        artifact_root=root,
        progress=False,
    ).uri
    out = evaluate.run(
        parse(evaluate.EvaluateConfig, {**SMOKE_EVALUATE, "epoch": 1}),
        shards=smoke_chain["shards"],
        base=smoke_chain["base"],
        adapters=rnd,
        artifact_root=root,
        progress=False,
    ).uri
    folder = storage.local_path(out)
    md = (folder / "report.md").read_text()
    assert "![metrics across epochs](metrics.png)" in md and "(curves.png)" in md
    page = (folder / "report.html").read_text()
    assert 'src="metrics.png"' not in page and page.count('src="data:image/png;base64,') == 2
    empty = tmp_path / "alone"
    empty.mkdir()
    widths = rendered_widths(page, empty)
    assert len(widths) == 2 and all(w > 100 for w in widths), widths


@needs_browser
def test_a_page_whose_image_is_missing_shows_it_unrendered(tmp_path):
    """The probe itself can fail: an image that is not embedded decodes to width 0."""
    assert rendered_widths('<html><body><img src="nowhere.png"></body></html>', tmp_path) == [0]


def test_the_kfp_page_of_a_stage_without_its_own_is_its_markdown_report(smoke_chain, tmp_path):
    from blueprint.runtime import task

    page = tmp_path / "page.html"
    task.run_stage_task(
        "evaluate",
        {**SMOKE_EVALUATE},
        {"shards": smoke_chain["shards"], "base": smoke_chain["base"], "adapters": smoke_chain["adapters"]},
        f"file://{tmp_path}/art",
        page_path=str(page),
    )
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "BluePrint evaluation, epoch 0" in text
    # the stage's own report.html: one plot, as warmup's adapters have no round behind them
    assert text.count("data:image/png;base64,") == 1
