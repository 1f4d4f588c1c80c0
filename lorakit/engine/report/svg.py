"""Small SVG charts without a plotting library: line charts (loss, learning rate) and histograms.

`loss.svg` in every training run and the curves of `lorakit report` are drawn here. Every chart has "nice"
ticks (1, 2 or 5 times a power of ten) on both axes, a light grid, axis labels, a short title and a legend
above the plot; text is placed (and the margins sized) so that nothing leaves the view box. Text widths are
estimated (ESTIMATE per character), which errs on the wide side for a sans-serif font.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

FONT, TITLE_FONT = 11, 13
ESTIMATE = 0.62  # average character width / font size, a little wide for sans-serif
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
BEST = "#2ca02c"


@dataclass
class Series:
    """One line: (x, y) points, drawn solid or dashed, with a dot per point when `dots`."""

    label: str
    points: list[tuple[float, float]]
    color: str = COLORS[0]
    dashed: bool = False
    dots: bool = True


@dataclass
class Mark:
    """A circled point with a label (the best step)."""

    x: float
    y: float
    label: str
    color: str = BEST


@dataclass
class Frame:
    """Where the plot area sits in the view box, and the data ranges it shows."""

    width: int
    height: int
    left: float
    top: float
    right: float
    bottom: float
    x_ticks: list[float] = field(default_factory=list)
    y_ticks: list[float] = field(default_factory=list)

    def x(self, value: float) -> float:
        lo, hi = self.x_ticks[0], self.x_ticks[-1]
        return self.left + (self.right - self.left) * (value - lo) / (hi - lo)

    def y(self, value: float) -> float:
        lo, hi = self.y_ticks[0], self.y_ticks[-1]
        return self.bottom - (self.bottom - self.top) * (value - lo) / (hi - lo)


def text_width(text: str, size: float = FONT) -> float:
    return len(text) * size * ESTIMATE


def shorten(text: str, width: float, size: float = FONT) -> str:
    """`text` cut (with an ellipsis) to fit `width` pixels."""
    most = max(int(width / (size * ESTIMATE)), 4)
    return text if len(text) <= most else text[:most - 1] + "\u2026"


def nice_step(span: float, target: int) -> float:
    """The 1, 2 or 5 x 10^k step that cuts `span` into the number of intervals nearest `target`."""
    power = 10 ** math.floor(math.log10(span / max(target, 1)))
    return min((m * power for m in (1, 2, 5, 10)), key=lambda step: abs(span / step - target))


def nice_ticks(lo: float, hi: float, target: int = 5, integer: bool = False) -> list[float]:
    """Tick values covering [lo, hi] (at least two), at a nice step; whole numbers when `integer`."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1e-300):
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = nice_step(hi - lo, target)
    if integer:
        step = max(1.0, round(step))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, max(last, first + 1) + 1)]


def tick_label(value: float, ticks: Sequence[float]) -> str:
    """A tick value with as many decimals as the step needs (scientific for tiny or huge values)."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(value) or 1.0
    largest = max(abs(t) for t in ticks)
    if value == 0:
        return "0"
    if largest >= 1e6 or largest < 1e-3:
        return f"{value:.{max(0, _digits(step / 10 ** math.floor(math.log10(largest))))}e}"
    return f"{value:.{_digits(step)}f}"


def _digits(step: float) -> int:
    return max(0, -math.floor(math.log10(step) + 1e-9))


def _legend(items: list[tuple[str, str, bool]], x0: float, y0: float, width: float) -> tuple[list[str], float]:
    """Legend entries (swatch + label) laid out left to right from (x0, y0), wrapping at `width`; returns the
    SVG parts and the height used."""
    parts, x, y, row = [], x0, y0, FONT + 6
    for label, color, dashed in items:
        label = shorten(label, width - 28)
        need = 22 + text_width(label) + 14
        if x > x0 and x + need > x0 + width:
            x, y = x0, y + row
        dash = ' stroke-dasharray="5,3"' if dashed else ""
        parts.append(f'<line class="legend" x1="{x:.1f}" y1="{y - 4:.1f}" x2="{x + 18:.1f}" y2="{y - 4:.1f}" '
                     f'stroke="{color}" stroke-width="2"{dash}/>')
        parts.append(f'<text class="legend" x="{x + 22:.1f}" y="{y:.1f}">{escape(label)}</text>')
        x += need
    return parts, (y - y0 + row) if items else 0.0


def _frame(width: int, height: int, x_ticks: list[float], y_ticks: list[float],
           legend: list[tuple[str, str, bool]]) -> tuple[Frame, list[str]]:
    """The plot area, with margins wide enough for the tick labels, the axis labels, the title and the
    legend (laid out under the title); returns it with the legend's SVG parts."""
    y_label_width = max(text_width(tick_label(t, y_ticks)) for t in y_ticks)
    last_x = text_width(tick_label(x_ticks[-1], x_ticks))
    left = 12 + FONT + 8 + y_label_width + 6
    parts, legend_height = _legend(legend, left, 10 + TITLE_FONT + 8 + FONT, width - left - 8)
    top = 10 + TITLE_FONT + 8 + legend_height + 6
    frame = Frame(width, height, left=left, top=top, right=width - max(16.0, last_x / 2 + 6),
                  bottom=height - (6 + FONT + 8 + FONT + 8), x_ticks=x_ticks, y_ticks=y_ticks)
    return frame, parts


def _axes(f: Frame, x_label: str, y_label: str) -> list[str]:
    """Grid lines, axis lines, tick labels and axis labels."""
    parts = []
    for t in f.x_ticks:
        x = f.x(t)
        parts.append(f'<line class="grid" x1="{x:.1f}" y1="{f.top:.1f}" x2="{x:.1f}" y2="{f.bottom:.1f}" '
                     'stroke="#e5e5e5"/>')
        parts.append(f'<text class="tick x" x="{x:.1f}" y="{f.bottom + 6 + FONT:.1f}" text-anchor="middle">'
                     f'{tick_label(t, f.x_ticks)}</text>')
    for t in f.y_ticks:
        y = f.y(t)
        parts.append(f'<line class="grid" x1="{f.left:.1f}" y1="{y:.1f}" x2="{f.right:.1f}" y2="{y:.1f}" '
                     'stroke="#e5e5e5"/>')
        parts.append(f'<text class="tick y" x="{f.left - 6:.1f}" y="{y + FONT * 0.35:.1f}" text-anchor="end">'
                     f'{tick_label(t, f.y_ticks)}</text>')
    parts += [
        (f'<line class="axis" x1="{f.left:.1f}" y1="{f.bottom:.1f}" x2="{f.right:.1f}" y2="{f.bottom:.1f}" '
         'stroke="#333"/>'),
        (f'<line class="axis" x1="{f.left:.1f}" y1="{f.top:.1f}" x2="{f.left:.1f}" y2="{f.bottom:.1f}" '
         'stroke="#333"/>'),
        (f'<text class="label x" x="{(f.left + f.right) / 2:.1f}" y="{f.height - 6:.1f}" text-anchor="middle">'
         f'{escape(shorten(x_label, f.right - f.left))}</text>'),
    ]
    cy = (f.top + f.bottom) / 2
    parts.append(f'<text class="label y" x="{12 + FONT:.1f}" y="{cy:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 {12 + FONT:.1f} {cy:.1f})">'
                 f'{escape(shorten(y_label, f.bottom - f.top))}</text>')
    return parts


def _series(f: Frame, s: Series) -> list[str]:
    pts = [(f.x(x), f.y(y)) for x, y in s.points]
    dash = ' stroke-dasharray="5,3"' if s.dashed else ""
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
    line = f'<polyline class="series" fill="none" stroke="{s.color}" stroke-width="1.6"{dash} points="{coords}"/>'
    parts = [line] if len(pts) > 1 else []
    if s.dots or len(pts) == 1:
        for (x, y), (vx, vy) in zip(pts, s.points):
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.2" fill="{s.color}"><title>'
                         f'{escape(s.label)}: {vy:.4g} at {vx:g}</title></circle>')
    return parts


def _mark(f: Frame, m: Mark) -> list[str]:
    """A circle on the point and its label inside the plot: left or right of it, above or below."""
    x, y = f.x(m.x), f.y(m.y)
    w = text_width(m.label)
    if x + 8 + w <= f.right - 2:
        tx, anchor = x + 8, "start"
    elif x - 8 - w >= f.left + 2:
        tx, anchor = x - 8, "end"
    else:
        tx, anchor = min(max(x, f.left + 2 + w / 2), f.right - 2 - w / 2), "middle"
    ty = y - 9 if y - 9 - FONT >= f.top else y + 9 + FONT
    circle = (f'<circle class="best" cx="{x:.1f}" cy="{y:.1f}" r="6" fill="none" stroke="{m.color}" '
              'stroke-width="2"/>')
    label = (f'<text class="best" x="{tx:.1f}" y="{ty:.1f}" text-anchor="{anchor}" fill="{m.color}" '
             f'font-weight="bold" stroke="white" stroke-width="3" paint-order="stroke">{escape(m.label)}</text>')
    return [circle, label]


def _open(width: int, height: int, title: str) -> list[str]:
    return [(f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="{FONT}">'),
            f'<rect width="{width}" height="{height}" fill="white"/>',
            (f'<text class="title" x="{width / 2:.1f}" y="{10 + TITLE_FONT}" text-anchor="middle" '
             f'font-size="{TITLE_FONT}" font-weight="bold">{escape(shorten(title, width - 20, TITLE_FONT))}</text>')]


def line_chart(series: Sequence[Series], *, title: str, x_label: str, y_label: str, marks: Sequence[Mark] = (),
               width: int = 640, height: int = 360, integer_x: bool = True) -> str:
    """An SVG line chart of `series` (x from 0), with `marks` circled and labelled."""
    drawn = [s for s in series if s.points]
    if not drawn:
        empty = (f'<text class="empty" x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#777">'
                 "no data yet</text>")
        return "\n".join([*_open(width, height, title), empty, "</svg>"]) + "\n"
    xs = [x for s in drawn for x, _ in s.points]
    ys = [y for s in drawn for _, y in s.points]
    x_ticks = nice_ticks(min(0.0, min(xs)), max(xs) or 1.0, 6, integer=integer_x)
    y_ticks = nice_ticks(min(ys), max(ys), 5)
    f, legend = _frame(width, height, x_ticks, y_ticks, [(s.label, s.color, s.dashed) for s in drawn])
    parts = [*_open(width, height, title), *_axes(f, x_label, y_label), *legend]
    for s in drawn:
        parts += _series(f, s)
    for m in marks:
        parts += _mark(f, m)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def histogram(groups: dict[str, list[float]], *, title: str, x_label: str, y_label: str = "examples",
              width: int = 640, height: int = 300, bins: int = 20) -> str:
    """Stacked histogram of the values of each group (one color each), on nice bin edges."""
    values = [v for vs in groups.values() for v in vs]
    if not values:
        return line_chart([], title=title, x_label=x_label, y_label=y_label, width=width, height=height)
    edges = nice_ticks(min(values), max(values), bins)
    counts = {name: [0] * (len(edges) - 1) for name in groups}
    for name, vs in groups.items():
        for v in vs:
            i = min(int((v - edges[0]) / (edges[1] - edges[0])), len(edges) - 2)
            counts[name][i] += 1
    totals = [sum(c[i] for c in counts.values()) for i in range(len(edges) - 1)]
    y_ticks = nice_ticks(0, max(totals), 4, integer=True)
    items = [(name, COLORS[i % len(COLORS)], False) for i, name in enumerate(groups)]
    # tick labels at a coarser step than the bins
    f, legend = _frame(width, height, nice_ticks(edges[0], edges[-1], 6), y_ticks, items)
    parts = [*_open(width, height, title), *_axes(f, x_label, y_label), *legend]
    for i in range(len(edges) - 1):
        base = 0
        for (name, color, _), c in zip(items, (counts[n][i] for n in groups)):
            if c:
                x0, x1 = f.x(edges[i]), f.x(edges[i + 1])
                parts.append(f'<rect class="bar" x="{x0 + 0.5:.1f}" y="{f.y(base + c):.1f}" '
                             f'width="{max(x1 - x0 - 1, 0.5):.1f}" height="{f.y(base) - f.y(base + c):.1f}" '
                             f'fill="{color}" fill-opacity="0.8"><title>{escape(name)}: {c} in '
                             f'[{edges[i]:g}, {edges[i + 1]:g})</title></rect>')
            base += c
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
