"""bench/chart.py: the SVG drawn from a small results file shaped as `bench.run` writes it."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bench import chart

SAMPLE = Path(__file__).parent / "bench_chart_sample.json"
SVG = "{http://www.w3.org/2000/svg}"
ROOT = Path(__file__).resolve().parents[1]


def bars(svg: str) -> dict[str, float]:
    """'<server> <endpoint>: <value> <measure>' -> bar height, for every bar."""
    tree = ET.fromstring(svg)
    return {
        rect.find(SVG + "title").text: float(rect.get("height"))
        for rect in tree.iter(SVG + "rect")
        if rect.find(SVG + "title") is not None
    }


def test_one_bar_per_row_and_measure_with_its_value():
    report = json.loads(SAMPLE.read_text())
    found = bars(chart.render(report))
    assert len(found) == len(report["rows"]) * len(chart.MEASURES)
    titles = list(found)
    for row in report["rows"]:
        for key, title, _ in chart.MEASURES:
            # Titles name server, endpoint and measure; one per concurrency, so count them.
            label = f"{row['server']} {row['endpoint']}: {chart.fmt(row[key])} {title}"
            assert label in titles


def test_bar_heights_are_proportional_within_a_panel():
    report = json.loads(SAMPLE.read_text())
    rows = {(r["server"], r["endpoint"], r["concurrency"]): r for r in report["rows"]}
    only_c16 = {**report, "rows": [r for r in report["rows"] if r["concurrency"] == 16]}
    found = bars(chart.render(only_c16))
    ours, base = rows["albert-serve", "qa", 16], rows["baseline", "qa", 16]
    h_ours = found[f"albert-serve qa: {chart.fmt(ours['rps'])} requests/s"]
    h_base = found[f"baseline qa: {chart.fmt(base['rps'])} requests/s"]
    assert h_base == pytest.approx(
        h_ours * base["rps"] / ours["rps"], abs=0.1
    )  # heights are written to 0.1 px
    # The tallest bar of a panel reaches at most the panel's height.
    assert max(found.values()) <= chart.PLOT_H


def test_results_without_the_baseline():
    report = json.loads(SAMPLE.read_text())
    report["rows"] = [r for r in report["rows"] if r["server"] == "albert-serve"]
    svg = chart.render(report)
    assert all(title.startswith("albert-serve ") for title in bars(svg))
    assert ">baseline<" not in svg


def test_text_is_escaped_and_empty_reports_are_refused():
    report = json.loads(SAMPLE.read_text())
    report["machine"]["processor"] = "CPU <x86> & friends"
    ET.fromstring(chart.render(report))  # still well-formed XML
    with pytest.raises(ValueError, match="no rows"):
        chart.render({**report, "rows": []})


@pytest.mark.parametrize("top", [0.3, 7, 95.3, 1183, 250_000])
def test_tick_steps_are_round(top):
    step = chart.nice_step(top)
    assert round(step / 10 ** math.floor(math.log10(step)), 9) in (1, 2, 5)
    assert 1.5 < top / step <= 4


def test_cli_writes_the_svg_beside_the_json(tmp_path):
    results = tmp_path / "bench-20990101-000000.json"
    shutil.copy(SAMPLE, results)
    done = subprocess.run(
        [sys.executable, "-m", "bench.chart", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    svg = results.with_suffix(".svg")
    assert done.stdout.strip() == str(svg)
    assert bars(svg.read_text())
    out = tmp_path / "elsewhere.svg"
    assert chart.main([str(results), "-o", str(out)]) == 0
    assert out.read_text() == svg.read_text()
