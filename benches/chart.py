#!/usr/bin/env python3
"""Draw benches/compare.sh results as an SVG horizontal bar chart.

Usage: python3 benches/chart.py RESULTS_JSON OUTPUT_SVG

One bar per measurement: increments per second, which is ops/s for every
unary run and counts each increment of a batch or pipeline (so Tally's
batch-of-100 calls compare with Redis's pipeline of 100). The axis is
logarithmic: the figures span from about a thousand (fsynced single-row
updates) to millions (pipelines), and a linear axis would flatten the small
ones to nothing. Each bar carries its exact value. Standard library only.
"""

import json
import math
import sys
from xml.sax.saxutils import escape

COLORS = {"tally": "#1b9e77", "ceiling": "#a6d8c8", "redis": "#d95f02", "postgres": "#386cb0"}
NAMES = {"tally": "Tally", "ceiling": "Ceiling", "redis": "Redis", "postgres": "PostgreSQL"}

PLOT_W = 440  # the bars' axis
VALUE_W = 250  # room right of the longest bar for its value
CHAR_W = 7.0  # rough width of one 12 px character, to size the label column
ROW_H = 26
BAR_H = 18
TOP = 78
FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"


def short(value):
    """1000 -> 1k, 1000000 -> 1M: decade tick labels."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:g}{suffix}"
    return f"{value:g}"


def bar_value(m):
    return m.get("increments_per_sec") or m.get("ops_per_sec")


def value_text(m):
    value = bar_value(m)
    text = f"{value:,.0f}/s"
    calls = m.get("ops_per_sec")
    if m["system"] == "tally" and calls and abs(calls - value) > 0.5:
        text = f"{value:,.0f} incr/s ({calls:,.0f} calls/s)"
    return text


def render(results):
    # Grouped by system (Tally first, then its in-memory ceiling), in run
    # order within a system.
    order = {"tally": 0, "ceiling": 1, "redis": 2, "postgres": 3}
    rows = sorted(
        (m for m in results["measurements"] if bar_value(m)),
        key=lambda m: order.get(m["system"], len(order)),
    )
    if not rows:
        raise SystemExit("chart.py: no measurement with a value")
    values = [bar_value(m) for m in rows]
    lo = 10 ** math.floor(math.log10(min(values)))
    hi = 10 ** math.ceil(math.log10(max(values)))
    if hi <= lo:
        hi = lo * 10
    label_w = 24 + CHAR_W * max(len(m["label"]) for m in rows)
    width = round(label_w + PLOT_W + VALUE_W)
    height = TOP + len(rows) * ROW_H + 60

    def x(value):
        return label_w + PLOT_W * (math.log10(value) - math.log10(lo)) / (
            math.log10(hi) - math.log10(lo)
        )

    machine = results.get("machine", {})
    settings = results.get("settings", {})
    title = "Increments per second: Tally vs Redis vs PostgreSQL (log scale)"
    rev = machine.get("git_rev", "?")[:10] + (" dirty" if machine.get("git_dirty") else "")
    subtitle = (
        f"{settings.get('clients', '?')} clients, {settings.get('duration_s', '?')} s each; "
        f"{machine.get('nproc', '?')} CPUs, {machine.get('cpu_model', '?')}; "
        f"{machine.get('date', '?')[:10]}; git {rev}"
    )

    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' {FONT} font-size='12'>",
        f"<rect width='{width}' height='{height}' fill='white'/>",
        f"<text x='16' y='26' font-size='16' font-weight='bold'>{escape(title)}</text>",
        f"<text x='16' y='46' fill='#555'>{escape(subtitle)}</text>",
    ]

    # Decade grid lines and their labels, above and below the bars.
    bottom = TOP + len(rows) * ROW_H
    decade = lo
    while decade <= hi * 1.0001:
        gx = x(decade)
        out.append(
            f"<line x1='{gx:.1f}' y1='{TOP - 6}' x2='{gx:.1f}' y2='{bottom}' "
            "stroke='#ddd' stroke-width='1'/>"
        )
        out.append(
            f"<text x='{gx:.1f}' y='{TOP - 10}' text-anchor='middle' fill='#777' "
            f"font-size='11'>{short(decade)}</text>"
        )
        decade *= 10

    for i, m in enumerate(rows):
        y = TOP + i * ROW_H
        mid = y + ROW_H / 2
        value = bar_value(m)
        color = COLORS.get(m["system"], "#888")
        out.append(
            f"<text x='{label_w - 8}' y='{mid + 4:.1f}' text-anchor='end'>"
            f"{escape(m['label'])}</text>"
        )
        out.append(
            f"<rect x='{label_w}' y='{mid - BAR_H / 2:.1f}' "
            f"width='{max(1.0, x(value) - label_w):.1f}' height='{BAR_H}' fill='{color}'>"
            f"<title>{escape(m['label'])}: {escape(value_text(m))}</title></rect>"
        )
        out.append(
            f"<text x='{x(value) + 6:.1f}' y='{mid + 4:.1f}' fill='#222'>"
            f"{escape(value_text(m))}</text>"
        )

    out.append(
        f"<line x1='{label_w}' y1='{TOP - 6}' x2='{label_w}' y2='{bottom}' stroke='#444'/>"
    )

    # Legend: only the systems that were measured.
    lx = label_w
    ly = bottom + 30
    for system in ("tally", "ceiling", "redis", "postgres"):
        if any(m["system"] == system for m in rows):
            out.append(
                f"<rect x='{lx}' y='{ly - 10}' width='12' height='12' fill='{COLORS[system]}'/>"
            )
            out.append(f"<text x='{lx + 18}' y='{ly}'>{NAMES[system]}</text>")
            lx += 100
    out.append(
        f"<text x='{width - 16}' y='{ly}' text-anchor='end' fill='#777' font-size='11'>"
        "batch/pipeline rows count each increment</text>"
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv):
    if len(argv) != 3:
        raise SystemExit("usage: chart.py RESULTS_JSON OUTPUT_SVG")
    with open(argv[1]) as f:
        results = json.load(f)
    svg = render(results)
    with open(argv[2], "w") as f:
        f.write(svg)


if __name__ == "__main__":
    main(sys.argv)
