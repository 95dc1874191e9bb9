"""The weight-curve study's statistics (bench/tiny_study.py): mean ± sd over fine-tuning seeds and
paired differences, on hand-made per-example losses whose answers are worked out here."""

import importlib.util
import math
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("tiny_study", Path(__file__).resolve().parent.parent / "bench" / "tiny_study.py")
tiny_study = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(tiny_study)


def test_mean_sd_is_the_sample_standard_deviation():
    d = tiny_study.mean_sd([1.0, 2.0, 4.0])
    assert d["mean"] == pytest.approx(7 / 3)
    # Σ(x − mean)² = 16/9 + 1/9 + 25/9 = 42/9, over n − 1 = 2
    assert d["sd"] == pytest.approx(math.sqrt(42 / 18))
    assert d["n"] == 3
    assert math.isnan(tiny_study.mean_sd([5.0])["sd"])
    with pytest.raises(ValueError):
        tiny_study.mean_sd([])


def test_paired_across_seeds_pairs_examples_within_a_seed_and_spreads_over_seeds():
    # Seed 0: per-example a − b = 0.1, 0.3 (example 3 has no output tokens in b: dropped) -> 0.2, se 0.1.
    # Seed 1: a − b = −0.2, 0.0, 0.2 -> 0.0, se 0.2/√3. Seed 2 only in a: not used.
    a = {0: [1.1, 2.3, 0.5], 1: [0.8, 1.0, 1.2], 2: [9.0, 9.0, 9.0]}
    b = {0: [1.0, 2.0, None], 1: [1.0, 1.0, 1.0]}
    d = tiny_study.paired_across_seeds(a, b)
    assert set(d["per_seed"]) == {0, 1}
    s0, s1 = d["per_seed"][0], d["per_seed"][1]
    assert (s0["mean"], s0["se"], s0["n"], s0["a_lower"]) == (pytest.approx(0.2), pytest.approx(0.1), 2, 0)
    assert (s1["mean"], s1["se"], s1["n"], s1["a_lower"]) == (pytest.approx(0.0, abs=1e-12),
                                                             pytest.approx(0.2 / math.sqrt(3)), 3, 1)
    assert d["mean"] == pytest.approx(0.1)
    assert d["sd"] == pytest.approx(math.sqrt(0.02))  # (0.1² + 0.1²) / 1
    assert d["n"] == 2
    with pytest.raises(ValueError, match="no fine-tuning seed"):
        tiny_study.paired_across_seeds({0: [1.0]}, {1: [1.0]})


def test_summarise_curve_reports_the_asked_differences_and_the_table_shows_them():
    labels = ["p0", "p0.6", "p1", "wit_p0.4_r0.6", "p0.6667"]
    base = {"train": [1.0, 2.0], "heldout": [3.0, 4.0]}
    shift = {"p0": 0.0, "p0.6": -0.1, "p1": -0.12, "wit_p0.4_r0.6": -0.05, "p0.6667": -0.11}
    losses = {s: {label: {split: [v + shift[label] + 0.01 * s for v in vals] for split, vals in base.items()}
                  for label in labels} for s in (0, 1, 2)}
    points, differences = tiny_study.summarise_curve(labels, losses)
    assert points["p1"]["heldout"]["mean"] == pytest.approx(3.5 - 0.12 + 0.01)
    assert points["p1"]["heldout"]["sd"] == pytest.approx(0.01)
    assert points["p1"]["heldout"]["seeds"][2] == pytest.approx(3.5 - 0.12 + 0.02)
    assert set(differences) == {"p0.6 − p0", "p1 − p0", "wit_p0.4_r0.6 − p0", "p0.6667 − p0", "p0.6 − p1",
                                "wit_p0.4_r0.6 − p0.6667"}
    wit = differences["wit_p0.4_r0.6 − p0.6667"]["heldout"]
    assert wit["mean"] == pytest.approx(0.06) and wit["sd"] == pytest.approx(0.0, abs=1e-12)
    assert differences["p0.6 − p1"]["train"]["per_seed"][1]["mean"] == pytest.approx(0.02)

    result = {"finetune_seeds": [0, 1, 2], "differences": differences,
              "points": {label: {**points[label], "description": label} for label in labels}}
    table = tiny_study.markdown_tables(result)
    assert "| wit_p0.4_r0.6 − p0.6667 | +0.0600 ± 0.0000 | +0.0600 ± 0.0000 (0/2)" in table
    assert "| `p1`: p1 | 1.3900 ± 0.0100 | 3.3900 ± 0.0100 | −0.1200 ± 0.0000 |" in table


def test_contrasts_need_both_points_and_the_as_run_points_are_checked_before_training():
    assert tiny_study.contrasts(["p0", "plw_asrun_p0.1"]) == [("plw_asrun_p0.1", "p0")]
    assert ("plw_asrun_p0.1", "p0.1") in tiny_study.contrasts(["p0.1", "plw_asrun_p0.1"])
    tiny_study.check_points(["p0", "p1", "wit_p0.4_r0.6", "p0.6667"])
    with pytest.raises(SystemExit, match="unknown point 'p0.5'"):
        tiny_study.check_points(["p0", "p0.5"])
