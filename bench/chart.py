"""The benchmark's results as a chart: `python -m bench.chart bench/results/bench-X.json` writes bench-X.svg.

One panel per measure (requests/s, p50 and p99 latency) and load point (concurrency); in each, one pair of
bars per endpoint: the baseline beside albert-serve, each with its value written on it. Hand-written SVG, so
that it needs nothing beyond the standard library and opens in any browser.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from xml.sax.saxutils import escape

SERVERS = {"baseline": "#9aa3b2", "albert-serve": "#2f5bd3"}
MEASURES = [
    ("rps", "requests/s", "higher is better"),
    ("p50_ms", "p50 latency, ms", "lower is better"),
    ("p99_ms", "p99 latency, ms", "lower is better"),
]
BAR, GAP, GROUP_GAP = 26, 4, 22  # px: bar width, between a pair's bars, between endpoints
PANEL_H, PLOT_H, LEFT, TOP = 250, 160, 56, 86


def nice_step(top: float, ticks: int = 4) -> float:
    """A round tick step (1, 2 or 5 times a power of ten) giving about `ticks` steps up to `top`."""
    if top <= 0:
        return 1.0
    raw = top / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _text(x: float, y: float, text: str, *, size: int = 11, anchor: str = "middle", **attrs: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{extra}>{escape(text)}</text>'


def _panel(
    x0: float, y0: float, rows: list[dict], endpoints: list[str], servers: list[str], measure
) -> list[str]:
    key, title, hint = measure
    values = {(r["endpoint"], r["server"]): float(r[key]) for r in rows}
    step = nice_step(max(values.values(), default=0.0))
    ticks = max(1, math.ceil(max(values.values(), default=0.0) / step))
    top = step * ticks
    width = len(endpoints) * (len(servers) * (BAR + GAP) - GAP + GROUP_GAP) + GROUP_GAP
    base = y0 + PLOT_H
    out = [
        _text(x0, y0 - 26, title, size=13, anchor="start", font_weight="600"),
        _text(x0 + width, y0 - 26, hint, size=10, anchor="end", fill="#5b6475"),
    ]
    for i in range(ticks + 1):
        y = base - PLOT_H * i / ticks
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + width}" y2="{y:.1f}" stroke="#e3e6eb"/>')
        out.append(_text(x0 - 6, y + 4, f"{step * i:g}", size=10, anchor="end", fill="#5b6475"))
    x = x0 + GROUP_GAP
    for endpoint in endpoints:
        group_w = len(servers) * (BAR + GAP) - GAP
        for j, server in enumerate(servers):
            value = values.get((endpoint, server))
            bx = x + j * (BAR + GAP)
            if value is None:
                out.append(_text(bx + BAR / 2, base - 4, "–", size=10, fill="#5b6475"))
                continue
            h = PLOT_H * value / top if top else 0
            out.append(
                f'<rect x="{bx:.1f}" y="{base - h:.1f}" width="{BAR}" height="{h:.1f}" fill="{SERVERS[server]}">'
                f"<title>{escape(f'{server} {endpoint}: {fmt(value)} {title}')}</title></rect>"
            )
            out.append(_text(bx + BAR / 2, base - h - 4, fmt(value), size=9))
        out.append(_text(x + group_w / 2, base + 16, endpoint, size=11))
        x += group_w + GROUP_GAP
    out.append(f'<line x1="{x0}" y1="{base}" x2="{x0 + width}" y2="{base}" stroke="#1d2330"/>')
    return out


def render(report: dict) -> str:
    """The SVG document for a report as `bench.run` writes it (its `rows`)."""
    rows = report["rows"]
    if not rows:
        raise ValueError("the report has no rows to chart")
    endpoints = list(dict.fromkeys(r["endpoint"] for r in rows))
    concurrencies = sorted({r["concurrency"] for r in rows})
    servers = [s for s in SERVERS if any(r["server"] == s for r in rows)]
    panel_w = len(endpoints) * (len(servers) * (BAR + GAP) - GAP + GROUP_GAP) + GROUP_GAP
    col_w = LEFT + panel_w + 24
    width = max(col_w * len(concurrencies) + 16, 520)
    height = TOP + PANEL_H * len(MEASURES) + 8
    machine = report.get("machine", {})
    subtitle = ", ".join(
        str(part)
        for part in (
            machine.get("processor"),
            f"{machine['cpus']} CPUs" if machine.get("cpus") else None,
            f"albert-serve start-up {report['startup_s']:.0f} s"
            if report.get("startup_s") is not None
            else None,
        )
        if part
    )
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif" '
        f'fill="#1d2330">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        _text(16, 26, "albert-serve benchmark", size=16, anchor="start", font_weight="700"),
        _text(16, 44, subtitle, size=11, anchor="start", fill="#5b6475"),
    ]
    lx = 16
    for server in servers:
        out.append(f'<rect x="{lx}" y="54" width="12" height="12" fill="{SERVERS[server]}"/>')
        out.append(_text(lx + 18, 64, server, size=11, anchor="start"))
        lx += 30 + 7 * len(server)
    for c_index, concurrency in enumerate(concurrencies):
        x0 = c_index * col_w + LEFT
        out.append(_text(x0 + panel_w / 2, TOP - 4, f"concurrency {concurrency}", size=12, font_weight="600"))
        at = [r for r in rows if r["concurrency"] == concurrency]
        for m_index, measure in enumerate(MEASURES):
            out.extend(_panel(x0, TOP + 40 + m_index * PANEL_H, at, endpoints, servers, measure))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_chart(json_path: Path | str, out: Path | str | None = None) -> Path:
    """Reads a results file and writes its chart (by default beside it, as .svg); returns the chart's path."""
    json_path = Path(json_path)
    target = Path(out) if out is not None else json_path.with_suffix(".svg")
    target.write_text(render(json.loads(json_path.read_text())))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", type=Path, help="a JSON file written by `python -m bench.run`")
    parser.add_argument("-o", "--output", type=Path, help="where to write the SVG (default: beside the JSON)")
    args = parser.parse_args(argv)
    print(write_chart(args.results, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
