"""A sweep's report (``fedsim.analysis``): per-seed statistics and the OOD curve computed by hand
from rows, the selection protocol (validation only; the test-domain pick on OOD validation; the
oracle apart), paired differences by hand from the metrics files, conditions, and diverged
cells never chosen."""
import json
import math

import pytest

from fedsim.analysis import analyse, format_report, mean_std, ood_curve, per_seed, read_rows


def write_cell(path, rows):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def rows_of(method, per_seed, rounds=(10, 20)):
    """Evaluation rows of ``method``: per seed, (val, test, ood) at the last round; earlier
    rounds at half those values."""
    out = []
    for seed, (val, test, ood) in per_seed.items():
        for r in rounds:
            scale = 1.0 if r == rounds[-1] else 0.5
            out.append({"method": method, "seed": seed, "round": r, "mask_density": 0.5,
                        "val_acc": val * scale, "test_acc": test * scale, "ood_acc": ood * scale,
                        "color_reliance": 0.3})
    return out


def test_selection_looks_at_validation_only_and_pairs_by_seed(tmp_path):
    # fedgma: lr 1 is best on validation, lr 2 best on OOD test; fedavg: lr 2 best on validation
    cells = {
        (("server_lr", 1.0),): {"fedavg": {0: (.70, .80, .20), 1: (.72, .81, .30)}},
        (("server_lr", 2.0),): {"fedavg": {0: (.80, .85, .40), 1: (.78, .86, .44)}},
        (("server_lr", 1.0), ("gma_tau", 0.4)): {"fedgma": {0: (.90, .70, .10), 1: (.88, .72, .16)}},
        (("server_lr", 2.0), ("gma_tau", 0.4)): {"fedgma": {0: (.60, .90, .90), 1: (.62, .91, .80)}},
    }
    folders = []
    for i, (values, methods) in enumerate(cells.items()):
        rows = [row for m, seeds in methods.items() for row in rows_of(m, seeds)]
        write_cell(tmp_path / str(i), rows)
        folders.append((values, tmp_path / str(i), {}))
    report = analyse(folders, {"server_lr": (1.0, 2.0), "gma_tau": (0.4,)})
    picks = {s["method"]: s for s in report["selection"]}
    assert picks["fedavg"]["values"] == {"server_lr": 2.0}
    assert picks["fedgma"]["values"] == {"server_lr": 1.0, "gma_tau": 0.4}  # not the OOD-best
    assert picks["fedgma"]["oracle"]["values"] == {"server_lr": 2.0, "gma_tau": 0.4}
    assert picks["fedgma"]["oracle"]["ood_acc"]["mean"] == pytest.approx(0.85)
    # last10: the mean of the evaluations in the last 10 rounds (round 20 only: 11..20)
    assert picks["fedgma"]["last10"]["val_acc"]["mean"] == pytest.approx(0.89)
    # paired OOD difference at each one's choice, by hand: (0.10 − 0.40, 0.16 − 0.44)
    diff = picks["fedgma"]["paired_vs_baseline"]["ood_acc"]
    assert diff == mean_std([0.10 - 0.40, 0.16 - 0.44])
    assert report["baseline"] == "fedavg" and any("2 seed(s)" in w for w in report["warnings"])
    # per cell: paired against the baseline at the same server_lr
    cell = next(c for c in report["cells"] if c["values"] == {"server_lr": 2.0, "gma_tau": 0.4})
    assert cell["paired_vs_baseline"]["ood_acc"] == mean_std([0.90 - 0.40, 0.80 - 0.44])


def test_test_domain_selection_uses_the_ood_validation_set_only(tmp_path):
    """Three cells, each best on one criterion: ID validation, OOD validation, OOD test; the
    test-domain pick is the OOD-validation one, with its own OOD test accuracy."""
    folders = []
    for i, (lr, val, ood_val, ood) in enumerate([(1.0, .9, .2, .3), (2.0, .5, .8, .4),
                                                 (3.0, .4, .1, .9)]):
        rows = [{**row, "ood_val_acc": ood_val * (1.0 if row["round"] == 20 else 0.5)}
                for row in rows_of("fedavg", {0: (val, .8, ood), 1: (val, .8, ood)})]
        write_cell(tmp_path / str(i), rows)
        folders.append(((("server_lr", lr),), tmp_path / str(i), {}))
    report = analyse(folders, {"server_lr": (1.0, 2.0, 3.0)})
    (pick,) = report["selection"]
    assert pick["values"] == {"server_lr": 1.0}
    assert pick["test_domain"]["values"] == {"server_lr": 2.0}
    assert pick["test_domain"]["ood_acc"]["mean"] == pytest.approx(0.4)
    assert pick["oracle"]["values"] == {"server_lr": 3.0}
    text = format_report(report)
    assert "| 40.0 ± 0.0 | server_lr=2.0 | 90.0 ± 0.0 | server_lr=3.0 |" in text


def test_without_an_ood_validation_set_there_is_no_test_domain_pick(tmp_path):
    write_cell(tmp_path / "0", rows_of("fedavg", {0: (.9, .8, .3)}))
    report = analyse([((("server_lr", 1.0),), tmp_path / "0", {})], {"server_lr": (1.0,)})
    assert report["selection"][0]["test_domain"] is None
    assert "| n/a | n/a |" in format_report(report)


def test_conditions_are_chosen_within(tmp_path):
    folders = []
    for i, (split, lr, val) in enumerate([("iid", 1.0, .9), ("iid", 2.0, .5),
                                          ("shards", 1.0, .5), ("shards", 2.0, .9)]):
        write_cell(tmp_path / str(i), rows_of("fedavg", {0: (val, .8, .3)}))
        folders.append(((("split", split), ("server_lr", lr)), tmp_path / str(i), {}))
    report = analyse(folders, {"split": ("iid", "shards"), "server_lr": (1.0, 2.0)},
                     conditions=("split",))
    chosen = {s["condition"]["split"]: s["values"]["server_lr"] for s in report["selection"]}
    assert chosen == {"iid": 1.0, "shards": 2.0}


def test_a_cell_that_diverged_on_a_seed_is_never_chosen(tmp_path):
    folders = []
    for i, (lr, val, diverged) in enumerate([(1.0, .70, False), (2.0, .90, True)]):
        rows = rows_of("fedavg", {0: (val, .8, .3), 1: (val, .8, .3)})
        rows[-1]["diverged"] = diverged
        write_cell(tmp_path / str(i), rows)
        folders.append(((("server_lr", lr),), tmp_path / str(i), {}))
    report = analyse(folders, {"server_lr": (1.0, 2.0)})
    (pick,) = report["selection"]
    assert pick["values"] == {"server_lr": 1.0}
    assert [c["diverged"] for c in report["cells"]] == [0, 1]


def test_mean_std_is_the_mean_and_the_sample_std():
    values = [0.2, 0.5, 0.9, 0.4]
    mean = sum(values) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)  # n − 1
    got = mean_std(values)
    assert got["n"] == 4
    assert got["mean"] == pytest.approx(mean) and got["std"] == pytest.approx(std)
    assert mean_std([0.3]) == {"mean": 0.3, "std": 0.0, "n": 1}
    assert mean_std([]) is None


def test_read_rows_gives_back_the_rows_written(tmp_path):
    rows = rows_of("fedavg", {0: (.7, .8, .2), 3: (.6, .5, .4)})
    write_cell(tmp_path / "run", rows)
    assert read_rows(tmp_path / "run") == rows


def test_per_seed_final_and_mean_of_the_last_ten_rounds():
    """Evaluations at rounds 5, 11, 12, 18, 21 of seed 0: the last round is 21, so the window
    of the last 10 rounds is 12..21 (11 and 5 left out); a metric never measured is None."""
    acc = {5: 0.1, 11: 0.3, 12: 0.4, 18: 0.6, 21: 0.8}
    rows = [{"seed": 0, "round": r, "val_acc": a, "mask_density": r / 100} for r, a in acc.items()]
    rows += [{"seed": 1, "round": 21, "val_acc": 0.5, "mask_density": None, "diverged": True}]
    got = per_seed(rows)
    assert list(got) == [0, 1]
    zero = got[0]
    assert zero["final"]["val_acc"] == 0.8 and zero["final"]["ood_acc"] is None
    assert zero["last10"]["val_acc"] == pytest.approx((0.4 + 0.6 + 0.8) / 3)
    assert zero["last10"]["test_acc"] is None
    assert zero["mask_density"] == pytest.approx((5 + 11 + 12 + 18 + 21) / 5 / 100)  # every row
    assert zero["diverged"] is False
    assert got[1]["mask_density"] is None and got[1]["diverged"] is True
    assert per_seed(rows, window=20)[0]["last10"]["val_acc"] == pytest.approx(
        (0.1 + 0.3 + 0.4 + 0.6 + 0.8) / 5)  # round 5 > 21 − 20


def test_ood_curve_is_the_mean_and_std_over_seeds_at_each_evaluated_round():
    rows = [{"seed": s, "round": r, "ood_acc": a} for s, r, a in
            [(0, 4, 0.2), (1, 4, 0.4), (0, 8, 0.5), (1, 8, 0.9), (2, 8, 0.7)]]
    rows.append({"seed": 0, "round": 6, "ood_acc": None})  # not evaluated: no point
    curve = ood_curve(rows)
    assert curve["round"] == [4, 8]
    assert curve["mean"] == pytest.approx([0.3, 0.7])
    assert curve["std"] == pytest.approx([math.sqrt(0.02), 0.2])  # sample std over seeds


def test_the_curve_along_a_numeric_condition_follows_each_methods_choice(tmp_path):
    from fedsim.analysis import condition_curve, write_report

    folders, i = [], 0
    # fedavg: at each fraction, lr 2 wins on validation except at 0.2; OOD set to tell them apart
    for fraction in (0.0, 0.4, 0.2):  # written out of order: the curve sorts
        for lr in (1.0, 2.0):
            val = .9 if (lr == 2.0) != (fraction == 0.2) else .5
            ood = fraction + lr / 10
            write_cell(tmp_path / str(i), rows_of("fedavg", {0: (val, .8, ood), 1: (val, .8, ood)}))
            folders.append(((("reversed_color_fraction", fraction), ("server_lr", lr)),
                            tmp_path / str(i), {}))
            i += 1
    grid = {"reversed_color_fraction": (0.0, 0.2, 0.4), "server_lr": (1.0, 2.0)}
    report = analyse(folders, grid, conditions=("reversed_color_fraction",))
    ((label, points),) = condition_curve(report, "reversed_color_fraction").items()
    assert label == "fedavg"
    assert [x for x, _, _ in points] == [0.0, 0.2, 0.4]
    assert [ood["mean"] for _, ood, _ in points] == pytest.approx([0.2, 0.3, 0.6])
    assert all(reliance["mean"] == pytest.approx(0.3) for _, _, reliance in points)
    write_report(tmp_path, report)
    assert (tmp_path / "curve_vs_reversed_color_fraction.png").stat().st_size > 0
