"""The SVG charts (loss.svg and the report's curves): nice ticks and labels on both axes, a grid, a short title,
and every piece of text inside the view box; loss.svg is redrawn when a run is interrupted and resumed."""

import itertools
import json
import math
import re
import xml.etree.ElementTree as ET

import pytest

from lorakit.engine.report.charts import loss_chart
from lorakit.engine.report.svg import FONT, TITLE_FONT, Series, histogram, line_chart, nice_ticks, text_width

SVG = "{http://www.w3.org/2000/svg}"
MODEL = "/home/someone/.cache/lorakit/models/SmolLM2-135M-Instruct.Q4_1.gguf"
TRAIN = [(s, 3.8 - 0.01 * s) for s in range(10, 150, 10)]
VAL = [(0, 3.9), (50, 3.4), (100, 2.9), (145, 2.65)]


def parse(svg: str):
    root = ET.fromstring(svg)
    _, _, width, height = map(float, root.get("viewBox").split())
    return root, width, height


def texts(root, cls=None):
    return [t for t in root.iter(f"{SVG}text") if cls is None or cls in (t.get("class") or "").split()]


def assert_inside(root, width, height):
    """Every text's estimated box (by its anchor; the rotated y label by its length) lies in the view box."""
    for t in texts(root):
        size = float(t.get("font-size") or FONT)
        w, x, y = text_width("".join(t.itertext()), size), float(t.get("x")), float(t.get("y"))
        if "rotate" in (t.get("transform") or ""):  # vertical: the text runs along y around its centre
            assert x - size >= 0 and y - w / 2 >= 0 and y + w / 2 <= height, t.text
            continue
        left = {"start": x, "middle": x - w / 2, "end": x - w}[t.get("text-anchor") or "start"]
        assert left >= 0 and left + w <= width, f"{t.text!r} spans {left:.0f}..{left + w:.0f} of {width}"
        assert y - size >= 0 and y <= height, f"{t.text!r} at y={y} of {height}"


@pytest.mark.parametrize("lo, hi, integer", [(0, 145, True), (2.65, 3.9, False), (1e-4, 1e-4, False),
                                           (0, 3, True), (-0.3, 7.2, False), (0.00012, 0.00098, False)])
def test_nice_ticks_cover_the_range_at_a_round_step(lo, hi, integer):
    ticks = nice_ticks(lo, hi, 5, integer=integer)
    steps = {round(b - a, 15) for a, b in itertools.pairwise(ticks)}
    assert len(steps) == 1 and 3 <= len(ticks) <= 11
    step = steps.pop()
    mantissa = step / 10 ** math.floor(math.log10(step) + 1e-9)
    assert round(mantissa, 6) in (1, 2, 5) and (step >= 1 or not integer)
    assert ticks[0] <= lo and ticks[-1] >= hi and ticks[1] > lo - 1e-12 and ticks[-2] < hi + 1e-12 or lo == hi


def test_loss_chart_has_ticks_grid_labels_and_a_short_title():
    root, width, height = parse(loss_chart(TRAIN, VAL, 145, MODEL))
    x_ticks, y_ticks = texts(root, "x"), texts(root, "y")
    assert len([t for t in x_ticks if "tick" in t.get("class")]) >= 4
    assert len([t for t in y_ticks if "tick" in t.get("class")]) >= 4
    assert [t.text for t in texts(root, "label")] == ["step", "loss"]
    assert len([line for line in root.iter(f"{SVG}line") if line.get("class") == "grid"]) >= 8
    (title,) = texts(root, "title")
    assert title.text == "loss: SmolLM2-135M-Instruct.Q4_1"  # not the whole path
    assert [t.text for t in texts(root, "legend")] == ["train", "validation"]
    assert_inside(root, width, height)


def test_best_label_at_the_right_edge_stays_inside():
    root, width, height = parse(loss_chart(TRAIN, VAL, 145, MODEL))
    (label,) = texts(root, "best")
    assert label.text == "best 2.650 @ step 145" and label.get("text-anchor") == "end"
    assert_inside(root, width, height)


@pytest.mark.parametrize("points", [
    [(1, 5.0)],  # one point
    [(0, 2.0), (10, 2.0)],  # a flat line
    [(0, 1e-4), (500, 2e-5)],  # learning rates
    [(0, 1234567.0), (100, 9876543.0)],  # large values
])
def test_odd_ranges_keep_ticks_and_text_inside(points):
    root, width, height = parse(line_chart([Series("s", points)], title="t", x_label="step", y_label="value"))
    assert len(texts(root, "tick")) >= 4
    assert_inside(root, width, height)


def test_many_series_wrap_the_legend_inside():
    series = [Series(f"run-with-a-long-name-{i}: validation", [(0, 3.0 + i), (10, 2.0 + i)]) for i in range(6)]
    root, width, height = parse(line_chart(series, title="loss", x_label="step", y_label="loss", width=480))
    legend_rows = {t.get("y") for t in texts(root, "legend")}
    assert len(legend_rows) > 1
    plot_top = min(float(line.get("y1")) for line in root.iter(f"{SVG}line") if line.get("class") == "axis")
    assert max(float(y) for y in legend_rows) < plot_top - TITLE_FONT / 2
    assert_inside(root, width, height)


def test_histogram_axes_and_bars():
    root, width, height = parse(histogram({"train": [250, 260, 300, 330, 480], "valid": [300, 310]},
                                          title="characters per example", x_label="characters"))
    bars = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "bar"]
    assert len(bars) >= 4 and len(texts(root, "tick")) >= 6
    assert_inside(root, width, height)


def test_empty_chart_says_so():
    root, _, _ = parse(line_chart([], title="loss", x_label="step", y_label="loss"))
    assert any("no data" in (t.text or "") for t in texts(root))


# ---- loss.svg during a run --------------------------------------------------------------------------------------

def _train_points(svg: str) -> list[int]:
    return sorted(int(m) for m in re.findall(r"<title>train: [^<]* at (\d+)</title>", svg))


def test_loss_svg_is_redrawn_on_interrupt_and_resume(tiny_model, tmp_path):
    from lorakit.engine import train
    from lorakit.engine.reporter import RecordingReporter
    from lorakit.errors import Interrupted
    from lorakit.settings import TrainSettings

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": f"Question {i}?", "completion": ["Yes.", "No."][i % 2]} for i in range(8)]
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ad"
    settings = {"model": str(tiny_model), "data": data, "adapter_path": out, "batch_size": 4, "iters": 8,
                "quiet": True, "learning_rate": 1e-3, "steps_per_report": 4, "steps_per_eval": 100,
                "save_every": 100}

    class InterruptAt(RecordingReporter):
        done = 0

        def advance(self, n=1, **fields):
            self.done += n if fields else 0  # the train bar's steps (tokenising advances without fields)
            if self.done == 5:
                raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        train.run(TrainSettings(**settings), InterruptAt())
    assert _train_points((out / "loss.svg").read_text()) == [4, 5]  # to the step it stopped at, not step 4
    train.run(TrainSettings(**{**settings, "resume": True}), RecordingReporter())
    svg = (out / "loss.svg").read_text()
    assert _train_points(svg) == [4, 5, 8] and "best" in svg
