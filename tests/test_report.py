"""`lorakit report` on a tiny run: every section, the token view's loss marks, several runs compared, judge
confusion matrices, the output rules; and the page rendered in headless Chromium without errors.

The Chromium test skips when `chromium` is not installed (Debian: `apt-get install chromium`; `.ci/run`
installs it and sets LORAKIT_REQUIRE_CHROMIUM=1, which turns the skip into a failure).
"""

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorakit.cli.app import app

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
SECTIONS = ["runs", "curves", "data", "tokens", "evals", "samples"]
runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def work(tiny_model, tmp_path_factory):
    """prepare -> train -> eval --generate --compare-base on the support sample, and a judge eval."""
    root = tmp_path_factory.mktemp("report")
    data, run = root / "data", root / "run"
    prepared = invoke("prepare", SAMPLE / "support.jsonl", "--out", data)
    assert f"see the data: lorakit report {data}" in prepared.stderr
    trained = invoke("train", "--model", tiny_model, "--data", data, "--adapter-path", run, "--iters", 6,
                     "--steps-per-eval", 3, "--steps-per-report", 2, "--val-batches", 2, "--learning-rate", "1e-3")
    assert f"see the run: lorakit report {run}" in trained.stderr
    evaluated = invoke("eval", "--model", tiny_model, "--adapter-path", run, "--data", data, "--compare-base",
                       "--generate", "--limit", 3, "--max-tokens", 6)
    assert f"see it: lorakit report {run}" in evaluated.stderr
    invoke("prepare", SAMPLE / "judge.jsonl", "--out", root / "judge_data", "--quiet")
    invoke("eval", "--model", tiny_model, "--data", root / "judge_data", "--judge", "--limit", 3, "--max-tokens", 4,
           "--out", root / "judge_eval", "--quiet")
    return root


def report(work, *paths, out="report.html", extra=()):
    target = work / out
    result = invoke("report", *paths, "--out", target, "--overwrite", *extra)
    return target.read_text(encoding="utf-8"), result


def section_ids(page: str) -> list[str]:
    return re.findall(r'<section id="([a-z]+)" data-section', page)


def test_a_run_shows_every_section(work):
    page, result = report(work, work / "run")
    assert section_ids(page) == SECTIONS
    assert f'data-sections="{",".join(SECTIONS)}"' in page
    assert result.stdout.startswith(f"wrote {work / 'report.html'} (runs, curves, data, tokens, evals, samples)")
    assert "file://" in result.stdout
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing to fetch
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    # the curves: loss with the best step, learning rate; the eval table: base, adapter and the change
    assert "best " in page and "learning rate" in page
    assert "<th>base</th>" in page.replace(' class="num"', "") and "loss.perplexity" in page


def test_json_is_one_object(work):
    result = invoke("report", work / "run", "--out", work / "j.html", "--overwrite", "--json")
    printed = json.loads(result.stdout)
    assert printed["sections"] == SECTIONS and printed["runs"] == [str(work / "run")]
    assert printed["data"] == [str(work / "data")] and printed["evals"] == [str(work / "run" / "eval-test")]


def test_token_view_marks_only_the_reply(work):
    page, _ = report(work, work / "run", extra=("--examples", 2))
    view = page[page.index('<section id="tokens"'):page.index('<section id="evals"')]
    blocks = re.findall(r'<div class="tokens">(.*?)</div>', view, re.DOTALL)
    assert len(blocks) == 2
    first = json.loads((work / "data" / "train.jsonl").read_text().splitlines()[0])
    user, reply = (m["content"] for m in first["messages"])
    spans = re.findall(r'<span class="([a-z ]*)" title="[0-9 ]+">(.*?)</span>', blocks[0], re.DOTALL)
    loss = "".join(html.unescape(t) for cls, t in spans if "loss" in cls).replace("\u21b5", "")
    context = "".join(html.unescape(t) for cls, t in spans if "loss" not in cls).replace("\u21b5", "")
    assert reply in loss and "<|im_end|>" in loss  # the reply and its end-of-turn token carry loss
    assert user in context and "user" in context and reply not in context  # the prompt does not
    assert "carry loss" in view


def test_several_runs_are_compared(work):
    other = work / "run-b"
    if not other.exists():
        shutil.copytree(work / "run", other)
    page, _ = report(work, work / "run", other, out="compare.html")
    assert "Runs compared (2)" in page
    assert "run: train" in page and "run-b: validation" in page  # overlaid curves, one legend entry each
    assert page.count('<div class="tokens">') == 3  # the same data, model and masking: one token view


def test_an_eval_written_elsewhere_joins_its_run(work):
    elsewhere = work / "elsewhere"
    if not elsewhere.exists():
        shutil.copytree(work / "run" / "eval-test", elsewhere)
    result = invoke("report", work / "run", elsewhere, "--out", work / "e.html", "--overwrite", "--json")
    assert json.loads(result.stdout)["evals"] == [str(work / "run" / "eval-test"), str(elsewhere)]
    page = (work / "e.html").read_text()
    assert f"<h3>{elsewhere}: split test" in page and "<h3>run/eval-test: split test" in page


def test_judge_eval_shows_its_metrics_and_confusion_matrices(work):
    page, _ = report(work, work / "judge_eval", out="judge.html")
    assert section_ids(page) == ["data", "tokens", "evals", "samples"]  # its data comes along
    assert "judge.consistency" in page and "judge.position_bias" in page
    assert "judge verdicts (rows: reference, columns: predicted)" in page and "verdict shares" in page
    assert "no token view" in page


@pytest.mark.parametrize("args, text", [
    (["missing"], "PATH missing: not found"),
    (["data/manifest.json", "--out", "data"], "--out data: is a directory"),
    (["data", "--out", "data/train.jsonl", "--overwrite"], "would replace a file of the PATH input data"),
    (["run", "--out", "run/adapter_config.json"], "--out run/adapter_config.json: exists; pass --overwrite"),
    (["sub"], "PATH sub: not a training run"),
])
def test_bad_paths_exit_2_naming_them(work, monkeypatch, args, text):
    monkeypatch.chdir(work)
    (work / "sub").mkdir(exist_ok=True)
    result = runner.invoke(app, ["report", *args])
    assert result.exit_code == 2 and text in result.stderr and result.stdout == ""


def test_an_existing_report_needs_overwrite(work):
    target = work / "twice.html"
    invoke("report", work / "data", "--out", target)
    refused = runner.invoke(app, ["report", str(work / "data"), "--out", str(target)])
    assert refused.exit_code == 2 and "--overwrite" in refused.stderr


# ---- in a browser ------------------------------------------------------------------------------------------------

@pytest.fixture
def browser() -> str:
    """The Chromium binary (looked up before the run is built, so a skip is quick)."""
    found = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                 None)
    if found is None:
        reason = "chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)"
        if os.environ.get("LORAKIT_REQUIRE_CHROMIUM") == "1":
            pytest.fail(reason + " (LORAKIT_REQUIRE_CHROMIUM=1)")
        pytest.skip(reason)
    return found


def test_the_page_renders_in_chromium_without_errors(browser, work, tmp_path):
    page, _ = report(work, work / "run", work / "judge_eval", out="browser.html")
    assert section_ids(page) == SECTIONS
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
                           "--v=0", "--dump-dom", (work / "browser.html").as_uri()],
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []  # the page logs nothing: any console line is an error or a warning
    errors = re.search(r'<div id="page-errors"[^>]*>.*?<ol>(.*?)</ol>', dom, re.DOTALL)
    assert errors is not None and errors.group(1).strip() == "", errors.group(1)
    assert 'data-rendered="ok"' in dom  # the page's own check: every section laid out, no error seen
    for section in SECTIONS:
        assert f'<section id="{section}" data-section="{section}">' in dom
