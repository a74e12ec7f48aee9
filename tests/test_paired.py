"""Paired no-harm bounds and TDR reduction bounds (calibration's rule, eval's harm marker)."""

from __future__ import annotations

import pytest
from scipy.stats import binomtest

from backpatch.evaluate import ConflictItem
from backpatch.paired import harm_bound, paired_report, tdr_reduction_bound


def _pairs(lost, gained, same_right, same_wrong=0):
    plain = [True] * lost + [False] * gained + [True] * same_right + [False] * same_wrong
    mitigated = [False] * lost + [True] * gained + [True] * same_right + [False] * same_wrong
    return plain, mitigated


def test_no_flips_means_no_loss_and_a_zero_bound():
    assert harm_bound(*_pairs(0, 0, 240)) == {"n": 240, "lost": 0, "gained": 0, "loss": 0.0, "upper": 0.0}


@pytest.mark.parametrize(("lost", "gained"), [(5, 0), (3, 3), (8, 2), (1, 6)])
def test_upper_bound_is_the_exact_mcnemar_bound(lost, gained):
    n = 240
    got = harm_bound(*_pairs(lost, gained, n - lost - gained))
    # one-sided 95% Clopper-Pearson bound on the share of lost items among the discordant ones (scipy, exact)
    share = binomtest(lost, lost + gained).proportion_ci(confidence_level=0.90, method="exact").high
    assert got["upper"] == pytest.approx(max(0.0, (lost + gained) * (2 * share - 1) / n), abs=1e-4)
    assert got["loss"] == pytest.approx((lost - gained) / n, abs=1e-4)
    assert got["upper"] >= max(0.0, got["loss"])


def test_the_bound_separates_a_small_sure_loss_from_a_large_one():
    assert harm_bound(*_pairs(4, 0, 236))["upper"] <= 0.02   # 4 of 240 lost, none gained: 1.7 points
    assert harm_bound(*_pairs(6, 0, 234))["upper"] > 0.02    # 6 of 240: 2.5 points
    assert harm_bound(*_pairs(1, 0, 23))["upper"] > 0.02     # one item of 24 is already 4 points


def test_tdr_reduction_bound():
    plain = ["text"] * 50 + ["audio"] * 50
    same = tdr_reduction_bound(plain, plain)
    assert same["reduction"] == 0.0 and same["lower"] == 0.0
    better = tdr_reduction_bound(plain, ["audio"] * 40 + ["text"] * 10 + ["audio"] * 50)
    assert better["reduction"] == pytest.approx(0.4) and 0.25 < better["lower"] < 0.4
    assert tdr_reduction_bound([], [])["lower"] is None


def test_paired_report_bounds_each_split_and_kind():
    def item(i, kind, perturbation=None):
        return ConflictItem(f"i{i}", None, "p", "seven", "three" if kind == "conflict" else
                            ("seven" if kind == "consistent" else None), kind, perturbation=perturbation)

    items = ([item(i, "audio_only") for i in range(20)] + [item(i, "consistent", "snr0") for i in range(20)]
             + [item(i, "conflict") for i in range(10)])
    plain = ["audio"] * 40 + ["text"] * 10
    mitigated = ["audio"] * 20 + ["other"] * 3 + ["audio"] * 17 + ["audio"] * 10
    report = paired_report(items, plain, mitigated)
    assert set(report["harm"]) == {"clean", "perturbed"}
    assert report["harm"]["clean"]["audio_only"]["lost"] == 0
    assert report["harm"]["perturbed"]["consistent"]["lost"] == 3
    assert report["harm_upper"] == report["harm"]["perturbed"]["consistent"]["upper"] == 0.15  # 3 of 20, none back
    assert report["tdr_reduction"] == 1.0
