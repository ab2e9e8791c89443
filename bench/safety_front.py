"""The fronts of `bench/safety_gain.py --protocol`: safety gain against general drift for GRPO at several learning
rates, with a KL penalty and scaled back toward the base model (ΔW·α), and for NSPO the same ways; the point where
NSPO is compared (the alternatives' least-drift point that reaches GRPO's full gain); and the reward curves.

    python bench/safety_gain.py --protocol --arms grpo nspo_task_conv_lr5e-3 --seeds 0 1 2 3 4 --alphas 0.25 0.5 0.75
    python bench/safety_gain.py --protocol --report     # tables, the matched-point comparison and the plots
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path

from harness import pyplot
from safety_gain import METHOD_MARKERS, Arm, label_front_axis, mean_ci

# The reference: plain GRPO at the protocol's learning rate, unscaled. Its mean gain is "GRPO's full gain".
REFERENCE = ("grpo", 1.0)
POINT_METRICS = (
    ("safety_gain", "safety gain", ".3f"),
    ("over_refusal_rate_benign", "over-refusal", ".3f"),
    ("general_kl", "KL to base", ".2e"),
    ("greedy_agreement", "greedy unchanged", ".3f"),
    ("general_accuracy", "checkable right", ".3f"),
)
# An alternative point "reaches" GRPO's full gain when its mean is at least this share of it: over 5 seeds whose gains
# spread by ±0.3, a point 3% below the reference's mean has reached it as much as the reference itself.
REACH_SHARE = 0.95
# The target of the issue: NSPO keeps ≥ 90% of the matched point's gain with ≤ 25% of its drift.
GAIN_SHARE_TARGET = 0.9
DRIFT_SHARE_TARGET = 0.25
BOOTSTRAP_RESAMPLES = 4000


def run_points(runs: list[dict]) -> dict[tuple[str, float], dict[int, dict]]:
    """Every evaluated point, `(arm, α)` → {seed: metrics}; α = 1 is the adapter as trained."""
    points: dict[tuple[str, float], dict[int, dict]] = {}
    for run in runs:
        if "metrics" not in run:
            continue
        points.setdefault((run["arm"], 1.0), {})[run["seed"]] = run["metrics"]
        for alpha, metrics in run.get("scaled", {}).items():
            points.setdefault((run["arm"], float(alpha)), {})[run["seed"]] = metrics
    return points


def point_label(arm: Arm, alpha: float) -> str:
    return arm.label + (f" ×α={alpha:g}" if alpha != 1.0 else "")


def summarise_points(runs: list[dict]) -> dict[tuple[str, float], dict]:
    arms = {run["arm"]: Arm(**run["arm_settings"]) for run in runs}
    summary = {}
    for (key, alpha), by_seed in run_points(runs).items():
        summary[(key, alpha)] = {
            "label": point_label(arms[key], alpha),
            "method": arms[key].method,
            "seeds": sorted(by_seed),
            **{metric: mean_ci(m.get(metric) for m in by_seed.values()) for metric, _, _ in POINT_METRICS},
        }
    return summary


def bootstrap_ratio(numerator: dict[int, float], denominator: dict[int, float], seed: int = 0) -> dict:
    """
    Ratio of means of two points and its 95% percentile interval, resampling seeds: paired when both points have the
    same seeds (the runs of one seed saw the same prompts in the same order), otherwise each point on its own.
    """
    rng = random.Random(seed)
    num, den = list(numerator.values()), list(denominator.values())
    ratio = statistics.fmean(num) / statistics.fmean(den)
    paired = sorted(set(numerator) & set(denominator))
    samples = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        if len(paired) == len(numerator) == len(denominator):
            chosen = [rng.choice(paired) for _ in paired]
            n, d = [numerator[s] for s in chosen], [denominator[s] for s in chosen]
        else:
            n, d = [rng.choice(num) for _ in num], [rng.choice(den) for _ in den]
        if statistics.fmean(d) > 0:
            samples.append(statistics.fmean(n) / statistics.fmean(d))
    samples.sort()
    low, high = samples[int(0.025 * len(samples))], samples[int(0.975 * len(samples)) - 1]
    return {"ratio": ratio, "ci95": [low, high]}


def matched_comparison(runs: list[dict]) -> dict:
    """
    The issue's target: among the alternatives' points (every GRPO arm, scaled or not) whose mean gain reaches the
    reference's (`REACH_SHARE` of it), the one with the least drift; every NSPO point's share of its gain and of its
    drift, with intervals.
    """
    points = run_points(runs)
    summary = summarise_points(runs)
    if REFERENCE not in summary:
        return {}
    full_gain = summary[REFERENCE]["safety_gain"]["mean"]
    reaching = [
        key
        for key, row in summary.items()
        if row["method"] == "grpo" and row["safety_gain"]["mean"] >= REACH_SHARE * full_gain
    ]
    matched = min(reaching, key=lambda key: summary[key]["general_kl"]["mean"])
    result = {"full_gain": full_gain, "matched": list(matched), "matched_label": summary[matched]["label"]}
    # Each alternative on its own: its least-drift point (over α) that reaches the full gain, if any.
    result["by_alternative"] = {}
    for arm in dict.fromkeys(key[0] for key, row in summary.items() if row["method"] == "grpo"):
        own = [key for key in reaching if key[0] == arm]
        best = min(own, key=lambda key: summary[key]["general_kl"]["mean"]) if own else None
        result["by_alternative"][arm] = None if best is None else summary[best]["label"]
    comparisons = []
    for key, row in summary.items():
        if row["method"] == "grpo":
            continue

        def values(point: tuple[str, float], metric: str) -> dict[int, float]:
            return {seed: metrics[metric] for seed, metrics in points[point].items()}

        gain = bootstrap_ratio(values(key, "safety_gain"), values(matched, "safety_gain"))
        drift = bootstrap_ratio(values(key, "general_kl"), values(matched, "general_kl"))
        comparisons.append(
            {
                "point": list(key),
                "label": row["label"],
                "gain_share": gain,
                "drift_share": drift,
                "meets_target": gain["ci95"][0] >= GAIN_SHARE_TARGET and drift["ci95"][1] <= DRIFT_SHARE_TARGET,
                # With seeds this noisy the means can meet the target while the intervals still reach parity: the
                # table tells the two apart rather than calling both "missed".
                "meets_target_on_means": gain["ratio"] >= GAIN_SHARE_TARGET and drift["ratio"] <= DRIFT_SHARE_TARGET,
                # Alternative points with at least this gain at no more drift (means): NSPO's front lies above the
                # alternatives' only where this is empty.
                "dominated_by": [
                    other["label"]
                    for other in summary.values()
                    if other["method"] == "grpo"
                    and other["safety_gain"]["mean"] >= row["safety_gain"]["mean"]
                    and other["general_kl"]["mean"] <= row["general_kl"]["mean"]
                ],
            }
        )
    result["nspo"] = comparisons
    return result


def points_markdown(summary: dict) -> str:
    header = "| point | seeds | " + " | ".join(label for _, label, _ in POINT_METRICS) + " |"
    lines = [header, "|---|---|" + "---|" * len(POINT_METRICS)]
    for key in sorted(summary, key=lambda key: (summary[key]["method"] != "grpo", key[0], -key[1])):
        row = summary[key]
        cells = []
        for metric, _, spec in POINT_METRICS:
            stats = row[metric]
            if stats["mean"] is None:
                cells.append("n/a")
            elif stats["ci95"] is None:
                cells.append(f"{stats['mean']:{spec}}")
            else:
                cells.append(f"{stats['mean']:{spec}} ± {stats['ci95']:{spec}}")
        lines.append(f"| {row['label']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matched_markdown(comparison: dict) -> str:
    if not comparison:
        return "(no reference runs yet)"
    lines = [
        f"GRPO's full gain: {comparison['full_gain']:.3f}; the alternatives' least-drift point reaching it (mean ≥ "
        f"{REACH_SHARE:.0%} of it): {comparison['matched_label']}.",
        "",
        "| NSPO point | share of its gain (95% CI) | share of its drift (95% CI) | target (≥ 90%, ≤ 25%) | "
        "alternatives with more gain and less drift |",
        "|---|---|---|---|---|",
    ]
    for row in comparison["nspo"]:
        gain, drift = row["gain_share"], row["drift_share"]
        verdict = (
            "met"
            if row["meets_target"]
            else "met on the means, not by the intervals"
            if row["meets_target_on_means"]
            else "missed"
        )
        lines.append(
            f"| {row['label']} | {gain['ratio']:.0%} ({gain['ci95'][0]:.0%} to {gain['ci95'][1]:.0%}) | "
            f"{drift['ratio']:.0%} ({drift['ci95'][0]:.0%} to {drift['ci95'][1]:.0%}) | "
            f"{verdict} | {'; '.join(row['dominated_by']) or 'none'} |"
        )
    return "\n".join(lines)


def plot_fronts(summary: dict, runs: list[dict], base: dict, path: Path) -> Path | None:
    """Left: every point (mean ± 95% CI over seeds), each arm's α points joined; right: the mean reward curves."""
    plt = pyplot()
    if plt is None:
        return None
    figure, (front_axis, reward_axis) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [3, 2]})
    arms = list(dict.fromkeys(key for key, _ in summary))
    # The default ten colours, then their lighter shades: up to 20 arms get distinct colours.
    colors = plt.get_cmap("tab10").colors + plt.get_cmap("tab20").colors[1::2]
    # Intervals reaching below zero KL are drawn to this left edge of the log axis instead of vanishing.
    kl_floor = 0.3 * min(max(row["general_kl"]["mean"], 1e-6) for row in summary.values())
    for index, arm in enumerate(arms):
        keys = sorted((key for key in summary if key[0] == arm), key=lambda key: key[1])
        rows = [summary[key] for key in keys]
        method = rows[0]["method"]
        marker = METHOD_MARKERS[method]
        linestyle = "--" if method == "grpo" else "-"
        color = colors[index % len(colors)]
        kl = [max(row["general_kl"]["mean"], 1e-6) for row in rows]
        gain = [row["safety_gain"]["mean"] for row in rows]
        kl_half_widths = [row["general_kl"]["ci95"] or 0.0 for row in rows]
        front_axis.errorbar(
            kl,
            gain,
            xerr=[[min(half, x - kl_floor) for half, x in zip(kl_half_widths, kl, strict=True)], kl_half_widths],
            yerr=[row["safety_gain"]["ci95"] or 0.0 for row in rows],
            marker=marker,
            linestyle=linestyle,
            color=color,
            capsize=2,
            label=f"{rows[-1]['label']} (n={len(rows[-1]['seeds'])})" + (", α points" if len(rows) > 1 else ""),
        )
        for key, x, y in zip(keys, kl, gain, strict=True):
            if key[1] != 1.0:
                front_axis.annotate(f"α={key[1]:g}", (x, y), fontsize=6, xytext=(3, -8), textcoords="offset points")
        curves = [run["reward_curve"] for run in runs if run["arm"] == arm and run.get("reward_curve")]
        if curves:
            steps = min(len(curve) for curve in curves)
            mean_curve = [statistics.fmean(curve[step] for curve in curves) for step in range(steps)]
            reward_axis.plot(range(1, steps + 1), mean_curve, linestyle=linestyle, color=color)
    label_front_axis(
        front_axis,
        "120 held-out",
        f"SmolLM2-135M-Instruct, LoRA r=8, 4 prompts × 4 completions × 16 steps; base refusal "
        f"{base['metrics']['refusal_rate_harmful']:.3f}; mean ± 95% CI over seeds\n"
        "(a KL interval reaching zero ends at the left edge)",
    )
    front_axis.set_xlim(left=kl_floor)
    reward_axis.set_xlabel("optimizer step")
    reward_axis.set_ylabel("training reward (mean over seeds)")
    reward_axis.set_title("reward curves (same colours)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
