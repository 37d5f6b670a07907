"""Line charts as SVG markup, rendered on the server: no script, no CDN, every label escaped."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

__all__ = ["Point", "Series", "line_chart"]

_PAD_LEFT, _PAD_RIGHT, _PAD_TOP, _PAD_BOTTOM = 56, 16, 28, 36


@dataclass(frozen=True)
class Point:
    """One value; ``label`` is shown on hover (and beside the point with ``show_labels``)."""

    x: float
    y: float
    label: str = ""


@dataclass(frozen=True)
class Series:
    """A named line; ``css`` is its class in the stylesheet (``s0``..``s3``)."""

    name: str
    points: tuple[Point, ...]
    css: str = "s0"


def _fmt(value: float) -> str:
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.2e}"
    return f"{value:.4g}"


def _ticks(low: float, high: float, count: int = 5, *, whole: bool = False) -> list[float]:
    if high <= low:
        return [low]
    if whole:  # rounds and charges are counted: label whole numbers only
        whole_step = max(1, math.ceil((high - low) / (count - 1)))
        return [float(x) for x in range(math.ceil(low), math.floor(high) + 1, whole_step)]
    step = (high - low) / (count - 1)
    return [low + i * step for i in range(count)]


def _range(values: Sequence[float], *, zero: bool) -> tuple[float, float]:
    low, high = min(values), max(values)
    if zero:
        low = min(low, 0.0)
    if high - low < 1e-12:
        pad = abs(high) * 0.1 or 1.0
        return low - (0 if zero and low == 0 else pad), high + pad
    return low, high + (high - low) * 0.05


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    limit: tuple[str, float] | None = None,
    show_labels: bool = False,
    empty: str = "nothing yet",
    width: int = 640,
    height: int = 240,
) -> Markup:
    """An SVG line chart of ``series``; ``limit`` draws a labelled horizontal line (a budget).

    Non-finite values are left out. The ``svg`` element carries ``data-points``: how many
    points it plots (tests and scrapers read it).
    """
    drawn = [
        Series(
            s.name, tuple(p for p in s.points if math.isfinite(p.x) and math.isfinite(p.y)), s.css
        )
        for s in series
    ]
    points = [p for s in drawn for p in s.points]
    out = [
        f'<svg class="chart" role="img" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'data-points="{len(points)}">',
        f"<title>{escape(title)}</title>",
        f'<text class="chart-title" x="{_PAD_LEFT}" y="16">{escape(title)}</text>',
    ]
    if not points:
        out.append(
            f'<text class="empty" x="{width / 2}" y="{height / 2}" text-anchor="middle">'
            f"{escape(empty)}</text></svg>"
        )
        return Markup("".join(out))
    ys = [p.y for p in points] + ([limit[1]] if limit is not None else [])
    x_low, x_high = _range([p.x for p in points], zero=False)
    y_low, y_high = _range(ys, zero=True)
    plot_w = width - _PAD_LEFT - _PAD_RIGHT
    plot_h = height - _PAD_TOP - _PAD_BOTTOM

    def sx(x: float) -> float:
        return _PAD_LEFT + (x - x_low) / (x_high - x_low) * plot_w

    def sy(y: float) -> float:
        return _PAD_TOP + plot_h - (y - y_low) / (y_high - y_low) * plot_h

    bottom = _PAD_TOP + plot_h
    out.append(
        f'<line class="axis" x1="{_PAD_LEFT}" y1="{bottom}" x2="{width - _PAD_RIGHT}" '
        f'y2="{bottom}"/><line class="axis" x1="{_PAD_LEFT}" y1="{_PAD_TOP}" '
        f'x2="{_PAD_LEFT}" y2="{bottom}"/>'
    )
    for y in _ticks(y_low, y_high):
        out.append(
            f'<line class="grid" x1="{_PAD_LEFT}" y1="{sy(y):.1f}" x2="{width - _PAD_RIGHT}" '
            f'y2="{sy(y):.1f}"/><text class="tick" x="{_PAD_LEFT - 4}" y="{sy(y) + 4:.1f}" '
            f'text-anchor="end">{_fmt(y)}</text>'
        )
    whole = all(float(p.x).is_integer() for p in points)
    for x in _ticks(x_low, x_high, whole=whole):
        out.append(
            f'<text class="tick" x="{sx(x):.1f}" y="{bottom + 14}" text-anchor="middle">'
            f"{_fmt(x)}</text>"
        )
    out.append(
        f'<text class="axis-label" x="{_PAD_LEFT + plot_w / 2}" y="{height - 4}" '
        f'text-anchor="middle">{escape(x_label)}</text>'
        f'<text class="axis-label" x="12" y="{_PAD_TOP + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {_PAD_TOP + plot_h / 2})">{escape(y_label)}</text>'
    )
    if limit is not None:
        name, value = limit
        out.append(
            f'<line class="limit" x1="{_PAD_LEFT}" y1="{sy(value):.1f}" '
            f'x2="{width - _PAD_RIGHT}" y2="{sy(value):.1f}"/><text class="limit-label" '
            f'x="{width - _PAD_RIGHT}" y="{sy(value) - 4:.1f}" text-anchor="end">'
            f"{escape(name)} {_fmt(value)}</text>"
        )
    for s in drawn:
        if not s.points:
            continue
        path = " ".join(f"{sx(p.x):.1f},{sy(p.y):.1f}" for p in s.points)
        css = escape(s.css)
        out.append(
            f'<polyline class="line {css}" points="{path}"><title>{escape(s.name)}</title></polyline>'
        )
        for p in s.points:
            text = p.label or f"{s.name}: {_fmt(p.y)}"
            out.append(
                f'<circle class="point {css}" cx="{sx(p.x):.1f}" cy="{sy(p.y):.1f}" r="3">'
                f"<title>{escape(text)}</title></circle>"
            )
            if show_labels and p.label:
                # Labels of the right half end at their point, so none runs off the chart.
                right = sx(p.x) > _PAD_LEFT + plot_w / 2
                out.append(
                    f'<text class="point-label" x="{sx(p.x) + (-4 if right else 4):.1f}" '
                    f'y="{sy(p.y) - 6:.1f}" text-anchor="{"end" if right else "start"}">'
                    f"{escape(p.label[:40])}</text>"
                )
    if len(drawn) > 1:
        for i, s in enumerate(drawn):
            out.append(
                f'<text class="legend {escape(s.css)}" x="{width - _PAD_RIGHT - 140}" '
                f'y="{_PAD_TOP + 12 + 14 * i}">{escape(s.name)}</text>'
            )
    out.append("</svg>")
    return Markup("".join(out))
