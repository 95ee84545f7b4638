"""The run's summary: final metrics per method and seed, and the paired differences line."""
import pytest

from fedsim.report import format_paired, summarize


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
