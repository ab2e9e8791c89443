"""The fronts' report (`bench/safety_front.py`): which alternative point NSPO is compared with, and the shares."""

import sys
from dataclasses import asdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))

from safety_front import bootstrap_ratio, matched_comparison, matched_markdown, summarise_points  # noqa: E402
from safety_gain import ARMS  # noqa: E402


def metrics(gain: float, kl: float) -> dict:
    return {
        "safety_gain": gain,
        "general_kl": kl,
        "over_refusal_rate_benign": 0.0,
        "greedy_agreement": 1.0,
        "general_accuracy": 0.5,
    }


def run(arm: str, seed: int, gain: float, kl: float, scaled: dict | None = None) -> dict:
    return {
        "arm": arm,
        "seed": seed,
        "arm_settings": asdict(ARMS[arm]),
        "metrics": metrics(gain, kl),
        "scaled": {str(alpha): metrics(*point) for alpha, point in (scaled or {}).items()},
        "reward_curve": [0.0, 0.1],
    }


def test_the_matched_point_is_the_least_drift_alternative_reaching_grpos_gain():
    runs = []
    for seed, noise in enumerate([-0.01, 0.0, 0.01, 0.0, 0.0]):
        # GRPO: gain 0.6 at KL 0.2; scaled by 0.5 it keeps 97.5% of the gain (within the seeds' noise: it reaches
        # it) at KL 0.05, by 0.25 it loses half of it.
        runs.append(run("grpo", seed, 0.6 + noise, 0.2, {0.5: (0.585 + noise, 0.05), 0.25: (0.3, 0.01)}))
        # A KL penalty that loses gain: never the matched point, however little it drifts.
        runs.append(run("grpo_beta0.1_lr2e-3", seed, 0.4, 0.001))
        # NSPO: 95% of the matched gain at a fifth of its drift.
        runs.append(run("nspo_task_conv_lr5e-3", seed, 0.589 + noise, 0.01))
    comparison = matched_comparison(runs)
    assert comparison["full_gain"] == pytest.approx(0.6)
    assert comparison["matched"] == ["grpo", 0.5]
    (nspo,) = comparison["nspo"]
    assert nspo["gain_share"]["ratio"] == pytest.approx(0.589 / 0.585)
    assert nspo["drift_share"]["ratio"] == pytest.approx(0.2)
    assert nspo["meets_target"] and nspo["meets_target_on_means"]
    assert "| met |" in matched_markdown(comparison)
    assert nspo["dominated_by"] == []
    assert comparison["by_alternative"] == {"grpo": "GRPO lr=2e-03 ×α=0.5", "grpo_beta0.1_lr2e-3": None}


def test_nspo_misses_the_target_when_its_interval_reaches_parity():
    runs = []
    for seed, kl in enumerate([0.001, 0.002, 0.1, 0.001, 0.002]):
        runs.append(run("grpo", seed, 0.5, 0.1))
        # The mean drift share is under 25%, but one seed drifts as far as GRPO: the interval is not.
        runs.append(run("nspo_task_conv_lr5e-3", seed, 0.5, kl))
    comparison = matched_comparison(runs)
    (nspo,) = comparison["nspo"]
    assert nspo["drift_share"]["ratio"] == pytest.approx(0.212)
    assert nspo["drift_share"]["ci95"][1] > 0.25
    assert not nspo["meets_target"] and nspo["meets_target_on_means"]
    assert "| met on the means, not by the intervals |" in matched_markdown(comparison)
    # On the means no alternative has its gain at less drift: only the interval keeps the target from being met.
    assert nspo["dominated_by"] == []


def test_points_have_means_and_student_intervals_over_seeds():
    runs = [run("grpo", seed, gain, 0.1, {0.5: (gain / 2, 0.02)}) for seed, gain in enumerate([0.4, 0.5, 0.6])]
    summary = summarise_points(runs)
    assert set(summary) == {("grpo", 1.0), ("grpo", 0.5)}
    assert summary[("grpo", 1.0)]["safety_gain"]["mean"] == pytest.approx(0.5)
    # t(0.975, 2) · s / √n with s = 0.1.
    assert summary[("grpo", 1.0)]["safety_gain"]["ci95"] == pytest.approx(4.303 * 0.1 / 3**0.5)
    assert summary[("grpo", 0.5)]["label"].endswith("×α=0.5")


def test_bootstrap_ratio_is_exact_for_constant_seeds():
    ratio = bootstrap_ratio({0: 0.2, 1: 0.2, 2: 0.2}, {0: 0.4, 1: 0.4, 2: 0.4})
    assert ratio["ratio"] == pytest.approx(0.5)
    assert ratio["ci95"] == pytest.approx([0.5, 0.5])
