"""The run's summary and its tables: final metrics per method and seed, the paired differences
line, the method table and the GMA-twin table, each checked cell by cell against hand values."""
import json

import pytest

from fedsim.report import format_gma_table, format_paired, format_table, summarize, write_results


def row(method, seed, round_, test, ood):
    return {"method": method, "seed": seed, "round": round_, "test_acc": test, "ood_acc": ood,
            "floats_up": 10, "floats_down": 10, "comm_vs_fedavg": 1.0}


ROWS = [row("fedavg", 0, 1, 0.1, 0.1), row("fedavg", 0, 2, 0.80, 0.30),
        row("fedavg", 1, 2, 0.70, 0.50), row("fedgma", 0, 2, 0.75, 0.20),
        row("fedgma", 1, 2, 0.72, 0.10), row("fedgma", 1, 1, 0.0, 0.9)]


def test_summary_reads_each_seeds_last_round():
    summary = summarize(ROWS)
    assert summary["fedavg"]["test_acc"]["per_seed"] == {0: 0.80, 1: 0.70}
    assert summary["fedgma"]["ood_acc"]["mean"] == pytest.approx(0.15)
    assert summary["fedgma"]["ood_acc"]["std"] == pytest.approx(0.0707107, rel=1e-5)


def test_paired_line_by_hand():
    line = format_paired(summarize(ROWS))
    # ID: (0.75 − 0.80, 0.72 − 0.70) = (−5, +2) points: mean −1.50, std 4.95
    # OOD: (0.20 − 0.30, 0.10 − 0.50) = (−10, −40): mean −25.00, std 21.21
    assert line == ("fedgma − fedavg, paired over 2 seed(s): ID -1.50 ± 4.95, "
                    "OOD -25.00 ± 21.21 points")
    assert format_paired(summarize(ROWS[:3])) == ""  # one method: nothing to pair


def _with_comm(rows, up, vs):
    return [{**r, "floats_up": up, "floats_down": up, "comm_vs_fedavg": vs} for r in rows]


def test_table_cells_by_hand():
    rows = _with_comm(ROWS[:3], 1_500_000, 1.0) + _with_comm(ROWS[3:], 1_500_000, 1.0)
    text = format_table(summarize(rows))
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["method", "seeds"]
    # fedavg: ID (80, 70) -> 75.00 ± 7.07; OOD (30, 50) -> 40.00 ± 14.14; 3 MFloats per round
    assert lines[2].split() == ["fedavg", "2", "75.00", "±", "7.07", "40.00", "±", "14.14",
                                "3.000", "1.00×"]
    assert lines[3].split()[:8] == ["fedgma", "2", "73.50", "±", "2.12", "15.00", "±", "7.07"]
    markdown = format_table(summarize(rows), markdown=True).splitlines()
    assert markdown[1] == "|---|---|---|---|---|---|"
    assert markdown[2] == "| fedavg | 2 | 75.00 ± 7.07 | 40.00 ± 14.14 | 3.000 | 1.00× |"


def test_gma_table_puts_each_twin_beside_its_algorithm():
    rows = [row("fedprox", 0, 2, 0.60, 0.40), row("fedprox+gma", 0, 2, 0.65, 0.45),
            row("scaffold+gma", 0, 2, 0.50, 0.20)]
    lines = format_gma_table(summarize(rows)).splitlines()
    assert lines[0].startswith("| algorithm | ID % | ID % +GMA | OOD % | OOD % +GMA |")
    assert lines[2] == "| fedprox | 60.00 ± 0.00 | 65.00 ± 0.00 | 40.00 ± 0.00 | 45.00 ± 0.00 " \
                       "| 0.000 | 1.00× |"
    assert lines[3].startswith("| scaffold | n/a | 50.00 ± 0.00 | n/a | 20.00 ± 0.00 |")


def test_written_results_hold_both_tables_and_the_summary(tmp_path):
    summary = summarize(ROWS)
    write_results(tmp_path, summary, wall_seconds=1.5)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["wall_seconds"] == 1.5
    assert saved["summary"]["fedgma"]["ood_acc"]["mean"] == pytest.approx(0.15)
    text = (tmp_path / "results.md").read_text()
    assert format_table(summary, markdown=True) in text
    assert format_gma_table(summary) in text
