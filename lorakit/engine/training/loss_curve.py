"""A small SVG loss curve (train and validation loss by step, best step marked), no plotting library."""

from __future__ import annotations

from html import escape
from pathlib import Path

from lorakit.io import write_text

WIDTH, HEIGHT, PAD = 640, 360, 48


def loss_curve_svg(train: list[tuple[int, float]], val: list[tuple[int, float]], best_step: int | None,
                   title: str = "loss") -> str:
    points = train + val
    if not points:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}"></svg>\n'
    x_max = max(s for s, _ in points) or 1
    y_min, y_max = min(v for _, v in points), max(v for _, v in points)
    if y_max - y_min < 1e-9:
        y_min, y_max = y_min - 0.5, y_max + 0.5

    def x(step: float) -> float:
        return PAD + (WIDTH - 2 * PAD) * step / x_max

    def y(value: float) -> float:
        return HEIGHT - PAD - (HEIGHT - 2 * PAD) * (value - y_min) / (y_max - y_min)

    def line(series: list[tuple[int, float]], color: str) -> str:
        if not series:
            return ""
        coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in series)
        dots = "".join(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2" fill="{color}"/>' for s, v in series)
        return f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>{dots}'

    parts = [
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
         'font-family="sans-serif" font-size="11">'),
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>',
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" stroke="black"/>',
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="black"/>',
        f'<text x="{PAD - 4}" y="{y(y_max) + 4:.1f}" text-anchor="end">{y_max:.3g}</text>',
        f'<text x="{PAD - 4}" y="{y(y_min) + 4:.1f}" text-anchor="end">{y_min:.3g}</text>',
        f'<text x="{PAD}" y="{HEIGHT - PAD + 16}" text-anchor="middle">0</text>',
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - PAD + 16}" text-anchor="middle">{x_max}</text>',
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 10}" text-anchor="middle">step</text>',
        line(train, "#1f77b4"),
        line(val, "#d62728"),
        (f'<text x="{WIDTH - PAD}" y="{PAD - 8}" text-anchor="end"><tspan fill="#1f77b4">train</tspan>  '
         '<tspan fill="#d62728">validation</tspan></text>'),
    ]
    best = [(s, v) for s, v in val if s == best_step]
    if best:
        s, v = best[-1]
        parts.append(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="6" fill="none" stroke="#2ca02c" '
                     f'stroke-width="2"/><text x="{x(s):.1f}" y="{y(v) - 10:.1f}" text-anchor="middle" '
                     f'fill="#2ca02c">best {v:.3f} @ {s}</text>')
    parts.append("</svg>\n")
    return "\n".join(p for p in parts if p)


def write_loss_curve(path: Path, train: list[tuple[int, float]], val: list[tuple[int, float]],
                     best_step: int | None, title: str = "loss") -> None:
    write_text(path, loss_curve_svg(train, val, best_step, title))
