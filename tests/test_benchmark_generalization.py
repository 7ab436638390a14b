"""benchmarks/generalization.py's table and verdict helpers on made-up numbers (no training here)."""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("generalization.py")


def test_mean_std_is_the_sample_std(bench: ModuleType) -> None:
    values = [0.91, 0.95, 0.97, 0.90]
    m, s = bench.mean_std(values)
    assert m == pytest.approx(np.mean(values)) and s == pytest.approx(np.std(values, ddof=1))
    assert bench.mean_std([0.5]) == (0.5, 0.0)
    assert all(math.isnan(x) for x in bench.mean_std([]))


def test_clearly_different_uses_two_standard_errors(bench: ModuleType) -> None:
    a, b = [1.0, 1.2, 1.1], [1.5, 1.7, 1.6]  # se of the difference = sqrt(2 * 0.01 / 3) = 0.0816; gap 0.5
    assert bench.clearly_different(a, b)
    assert not bench.clearly_different(a, [1.2, 1.0, 1.15])  # gap 0.0167 < 2 se
    se = math.sqrt(2 * 0.01 / 3)
    near = [x + 2 * se * 0.99 for x in a]
    assert not bench.clearly_different(a, near) and bench.clearly_different(a, [x + 2 * se * 1.01 for x in a])
    assert not bench.clearly_different([1.0], [2.0])  # no spread to judge by
    same = 0.9823008849557522  # equal values, whose means differ by rounding only: not a difference
    assert bench.statistics.fmean([same] * 5) != bench.statistics.fmean([same] * 3)
    assert not bench.clearly_different([same] * 5, [same] * 3)
    assert bench.clearly_different([0.5, 0.5], [0.6, 0.6])


def rows(bench: ModuleType) -> list:
    Row = bench.Row
    return [
        Row("a", "baseline", "accuracy", True, [0.90, 0.91, 0.92], [0.05, 0.06, 0.07], [0.30, 0.31, 0.32]),
        Row("a", "label smoothing 0.1", "accuracy", True, [0.95, 0.96, 0.97], [0.02, 0.03, 0.04], [0.2, 0.2, 0.2]),
        Row("a", "L2 1e-3", "accuracy", True, [0.80, 0.81, 0.82], [0.05, 0.05, 0.05], [0.4, 0.4, 0.4]),
        Row("a", bench.ensemble_name("varied"), "accuracy", True, [0.93, 0.94], [0.01, 0.01], [0.20, 0.21]),
        Row("a", bench.best_name("varied"), "accuracy", True, [0.92, 0.95], [0.02, 0.02], [0.25, 0.26]),
        Row("b", "baseline", "accuracy", True, [0.50, 0.60], [0.10, 0.10], [1.0, 1.1]),
        Row("b", "label smoothing 0.1", "accuracy", True, [0.55, 0.56], [0.20, 0.30], [1.0, 1.0]),
        Row("b", bench.ensemble_name("varied"), "accuracy", True, [0.70], [0.05], [0.9]),
        Row("b", bench.best_name("varied"), "accuracy", True, [0.65], [0.05], [0.8]),
        Row("b", bench.ensemble_name("seeds"), "accuracy", True, [0.60], [0.05], [0.9]),
        Row("b", bench.best_name("seeds"), "accuracy", True, [0.65], [0.05], [0.8]),
        Row("lm", "baseline", "val bits/byte", False, [3.0, 3.1, 3.2], [0.01, 0.01, 0.01], [2.0, 2.1, 2.2]),
        Row("lm", "label smoothing 0.1", "val bits/byte", False, [2.0, 2.1, 2.2], [0.02, 0.02, 0.02], [1.4, 1.5, 1.5]),
    ]


def test_verdicts_follow_the_numbers(bench: ModuleType) -> None:
    r = rows(bench)
    text = bench.ensemble_verdict(r, "varied")
    # a: 0.935 vs 0.935 is not higher; b: 0.70 vs 0.65 is, from one ensemble only
    assert text.startswith("varied ensemble vs its best member")
    assert "higher on b (0.6500 -> 0.7000, n = 1); not higher on a (0.9350 -> 0.9350, within noise)" in text
    assert text.endswith("NOT met")
    r[3].values = [0.95, 0.96]
    assert bench.ensemble_verdict(r, "varied").endswith(": met")
    seeds = bench.ensemble_verdict(r, "seeds")  # only b has seed ensembles, and there it lost
    assert "higher on no task; not higher on b (0.6500 -> 0.6000, n = 1)" in seeds and seeds.endswith("NOT met")
    # NLL: lower is better; a's ensemble 0.205 < 0.255, b's 0.9 > 0.8
    nll = bench.ensemble_nll_line(r, "varied")
    assert "lower on a (0.2550 -> 0.2050, clear); not lower on b (0.8000 -> 0.9000, n = 1)" in nll
    assert "no task" in bench.smoothing_verdict(r, "label smoothing 0.05")  # no such rows: neither list
    text = bench.smoothing_verdict(r)
    assert "lower on a (0.0600 -> 0.0300, clear)" in text and "not lower on b (0.1000 -> 0.2500, clear)" in text
    assert "lm (0.0100 -> 0.0200, clear)" in text and text.endswith(": met")
    r[1].eces = [0.03, 0.06, 0.08]  # 0.0567 < 0.06, but by far less than 2 standard errors
    assert "lower on a (0.0600 -> 0.0567, within noise)" in bench.smoothing_verdict(r)
    r[1].eces = [0.09, 0.09, 0.09]
    assert bench.smoothing_verdict(r).endswith("NOT met")


def test_table_marks_clear_changes_in_the_right_direction(bench: ModuleType) -> None:
    table = bench.format_table(rows(bench)).splitlines()
    line = {tuple(cell.strip() for cell in row.split("|")[1:3]): row for row in table[2:]}
    assert "+0.0500 (better)" in line[("a", "label smoothing 0.1")]
    assert "-0.1000 (worse)" in line[("a", "L2 1e-3")]
    assert "(better)" in line[("lm", "label smoothing 0.1")]  # lower bits/byte is better
    assert "better" not in line[("b", "label smoothing 0.1")] and "worse" not in line[("b", "label smoothing 0.1")]
    cells = [c.strip() for c in line[("a", "baseline")].split("|")[1:-1]]
    assert cells[3:8] == ["0.9100 ± 0.0100", "", "0.3100 ± 0.0100", "0.0600 ± 0.0100", "3"]
    summary = bench.effects_summary(rows(bench))
    assert summary[0] == (
        "a against the baseline: accuracy clearly better: label smoothing 0.1, ensemble of 5 varied (soft vote); "
        "worse: L2 1e-3 | NLL clearly better: label smoothing 0.1, ensemble of 5 varied (soft vote); worse: L2 1e-3"
        " | ECE clearly better: label smoothing 0.1, ensemble of 5 varied (soft vote); worse: none"
    )
    assert summary[2].startswith("lm against the baseline: val bits/byte clearly better: label smoothing 0.1;")


def test_passages_become_one_tsv_field(bench: ModuleType) -> None:
    text = "To be, or not to be:\n  that is the question\n\nWhether"
    assert bench.one_line(text) == "To be, or not to be: / that is the question / Whether"


def test_best_member_is_chosen_on_validation_not_test(bench: ModuleType) -> None:
    probs, labels = np.eye(2)[[0, 1]], np.array([0, 1])

    def member(test_acc: float, val_acc: float, val_loss: float):
        return bench.Outcome(probs, labels, test_acc, 0.0, 0.1, 100, val_acc, val_loss)

    members = [member(0.99, 0.90, 0.3), member(0.95, 0.93, 0.4), member(0.97, 0.93, 0.2)]
    assert bench.best_member(members) is members[2]  # best val accuracy, then the lower val loss


def test_score_matches_sklearn(bench: ModuleType) -> None:
    from sklearn.metrics import accuracy_score, log_loss

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=50)
    labels = rng.integers(0, 4, size=50)
    out = bench.score(probs, labels)
    assert out.accuracy == pytest.approx(accuracy_score(labels, probs.argmax(1)))
    assert out.nll == pytest.approx(log_loss(labels, probs, labels=range(4)))


def test_plan_builds_each_recipes_members_once(bench: ModuleType, tmp_path: Path) -> None:
    split = bench.Split(tmp_path, np.zeros((2, 3)), ["0", "1"])
    jobs = bench.plan(["digits", "digits-wide"], {"digits": split}, None, repeats=2, quick=False)
    digits = {(j.technique, j.seed): j.sets for j in jobs if j.spec.name == "digits"}
    ensembles = bench.CLASSIFIERS["digits"].ensembles
    seeds = range(1, 1 + bench.ENSEMBLE_SIZE * ensembles)
    assert all(digits[("baseline", s)] == () for s in seeds)  # the seed ensembles' members are baseline runs
    assert all(digits[("bagged member", s)] == ("train.bootstrap=true",) for s in seeds)
    for k in range(ensembles):  # member i of ensemble k: the i-th varied architecture, seed member_seeds(k)[i]
        for i, s in enumerate(bench.member_seeds(k)):
            assert digits[(f"varied member {i + 1}", s)] == tuple(bench.VARIED_MEMBERS["mlp"][i])
    assert digits[("label smoothing 0.05", 2)] == ("train.label_smoothing=0.05",)
    assert len(digits) == len(jobs) - 3 * 2  # digits-wide: baseline and two smoothing values, 2 seeds each
    wide = [j for j in jobs if j.spec.name == "digits-wide"]
    assert {j.technique for j in wide} == {"baseline", *bench.SMOOTHING} and all(j.split is split for j in wide)
    for sets in digits.values():  # every override is a valid config on top of the baseline
        bench.resolve_config("mlp", None, [*bench.MLP_BASE, *sets])
    for sets in bench.VARIED_MEMBERS["encoder"]:
        bench.resolve_config("encoder", None, [*bench.ENCODER_BASE, *sets], task="classify")
