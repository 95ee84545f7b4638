"""The run's summary and its tables: final metrics per method and seed, the paired differences
line, the method table and the GMA-twin table, each checked cell by cell against hand values."""
import json

import pytest

from fedsim.config import Config
from fedsim.report import (STEP_FINDING, format_gma_table, format_paired, format_table,
                           method_label, plot_accuracy, summarize, write_results)


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


#: FedGMA at twice FedAvg's server step (the default run's kind of comparison)
LARGER_STEP = Config(model="mlp", gma_server_lr=2.0, gma_tau=0.2, adaptive_server_lr=0.05)
NOTE = f"note: the paired difference comes with a larger server step for fedgma; {STEP_FINDING}"


@pytest.mark.parametrize("method, label", [
    ("fedavg", "fedavg (sgd, server lr 1)"),
    ("fedgma", "fedgma (sgd, server lr 2, soft τ=0.2)"),
    ("scaffold+gma", "scaffold+gma (sgd, server lr 2, soft τ=0.2)"),
    ("fedadam", "fedadam (adam, server lr 0.05)"),
    ("fedadam+gma", "fedadam+gma (adam, server lr 0.05, soft τ=0.2)"),
])
def test_method_label_names_the_server_step_and_the_mask(method, label):
    assert method_label(method, LARGER_STEP) == label
    assert method_label(method, None) == method


def test_a_hard_mask_at_the_plain_step_is_labelled_so():
    config = Config(model="mlp", server_lr=0.5, gma_mask="hard", gma_tau=0.8)
    assert method_label("fedgma", config) == "fedgma (sgd, server lr 0.5, hard τ=0.8)"


def test_table_rows_carry_the_labels():
    lines = format_table(summarize(ROWS), config=LARGER_STEP).splitlines()
    assert lines[2].startswith("fedavg (sgd, server lr 1)  ")
    assert lines[3].split("  ")[:2] == ["fedgma (sgd, server lr 2, soft τ=0.2)", "2"]
    markdown = format_table(summarize(ROWS), markdown=True, config=LARGER_STEP).splitlines()
    assert markdown[3].startswith("| fedgma (sgd, server lr 2, soft τ=0.2) | 2 | 73.50 ± 2.12 |")


def test_paired_line_names_different_steps_and_says_what_an_equal_step_showed():
    lines = format_paired(summarize(ROWS), config=LARGER_STEP).splitlines()
    assert lines == ["fedgma (server lr 2) − fedavg (server lr 1), paired over 2 seed(s): "
                     "ID -1.50 ± 4.95, OOD -25.00 ± 21.21 points", NOTE]
    smaller = Config(model="mlp", gma_server_lr=0.5)
    assert format_paired(summarize(ROWS), config=smaller).splitlines()[1].startswith(
        "note: the paired difference comes with a smaller server step for fedgma; ")


def test_paired_line_at_an_equal_step_is_plain_and_has_no_note():
    equal = Config(model="mlp", gma_server_lr=1.0)
    assert format_paired(summarize(ROWS), config=equal) == format_paired(summarize(ROWS))


def test_paired_line_names_the_optimizers_when_they_differ_without_the_note():
    rows = [{**r, "method": "fedadam"} if r["method"] == "fedgma" else r for r in ROWS]
    assert format_paired(summarize(rows), config=LARGER_STEP) == (
        "fedadam (adam, server lr 0.05) − fedavg (sgd, server lr 1), paired over 2 seed(s): "
        "ID -1.50 ± 4.95, OOD -25.00 ± 21.21 points")


def test_written_results_are_labelled_and_carry_the_note(tmp_path):
    summary = summarize(ROWS)
    write_results(tmp_path, summary, config=LARGER_STEP)
    assert json.loads((tmp_path / "results.json").read_text())["config"]["gma_server_lr"] == 2.0
    text = (tmp_path / "results.md").read_text()
    assert format_table(summary, markdown=True, config=LARGER_STEP) in text
    assert format_paired(summary, config=LARGER_STEP) in text and NOTE in text


def test_plot_title_holds_each_label(tmp_path, monkeypatch):
    titles = []
    monkeypatch.setattr("fedsim.report.save_figure",
                        lambda fig, path: titles.append(fig.axes[0].get_title()))
    plot_accuracy(tmp_path, ROWS, LARGER_STEP)
    assert titles == ["fedavg (sgd, server lr 1)\nfedgma (sgd, server lr 2, soft τ=0.2)"]
