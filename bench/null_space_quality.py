"""Do the null spaces hold on inputs they were never computed from, and do they separate the training task's inputs
from general ones? Measured in minutes, without any RL run.

For every shared layer input of SmolLM2-135M-Instruct (120: q/k/v and gate/up read one), the share of a set's input
energy inside the null space, tr(Uᵀ·C·U) / tr(C) (`trl_nspo.measurement.null_space_energy`), for:

- `calibration`: the data the null spaces were computed from (in-sample: the energy rule's budget ε by construction);
- `heldout_pool`: more of the calibration data's own kind, never calibrated on (the model's own sampled user turns
  and greedy answers, `general_conversations_heldout`);
- `general_eval`, `general_heldout`: hand-written general prompts with the base model's greedy answers, never
  calibrated on (a different distribution from the calibration data);
- `train`: the training prompts (harmful and benign-but-risky) with the base model's greedy answers, what GRPO's
  gradient is computed on;
- `harmful_heldout`: harmful prompts training never sees, with the base model's answers.

Selectivity is the ratio of two shares, per input: `train` ÷ `general_heldout` (what the issue defines), and
`harmful_heldout` ÷ `general_heldout` (the honest one for a task-aware rule, which saw the training prompts).

It compares the calibration data (the old 80 embedded prompts with 16-token answers; growing prefixes of the
model's own conversations) and the rules (`energy`: in-sample budget; `heldout`: budget enforced on calibration folds
held out of the null space; `task`: task-aware selection under the held-out budget; `soft`: the ridge weighting
λ·(C + λI)⁻¹, measured only, with λ set so that its in-sample share is ε).

    python bench/null_space_quality.py            # ~25 min on 2 cores -> bench/results/null_space_quality.json
    python bench/null_space_quality.py --quick    # smoke test
    python bench/null_space_quality.py --report   # the Markdown table from the results file
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, concatenate_datasets
from harness import environment, model_dir, parse_arguments, record_end, results_path, write_final_results
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_nspo.calibration_data import CalibrationSettings
from trl_nspo.demo import demo_safety_dataset, embedded_prompts
from trl_nspo.measurement import NullSpaceEnergy, collect_layer_inputs, null_space_energy
from trl_nspo.null_space import InputStatistics, NullSpaceBasis, NullSpaceRule, decompose_covariance

EVALUATION_SETS = ("heldout_pool", "general_eval", "general_heldout", "train", "harmful_heldout")
SELECTIVITY = {"train": "general_heldout", "harmful_heldout": "general_heldout"}


@dataclass
class QualityArguments:
    """
    Args:
        energy (`float`, *optional*, defaults to `1e-3`):
            The budget ε of every rule.
        max_null_dim (`int`, *optional*, defaults to `128`):
            The cap of every rule.
        chunk_size (`int`, *optional*, defaults to `48`):
            Conversations per covariance chunk; prefixes of 2, 4, 8, … chunks make the tokens curve, and even and
            odd chunks are the two folds of the held-out rules.
        num_chunks (`int`, *optional*, defaults to `16`):
            Chunks of the model's own conversations (`general_conversations`, all 768 at the defaults).
        answer_tokens (`int`, *optional*, defaults to `48`):
            Greedy answer tokens appended to every evaluation and training prompt.
        task_prefixes (`list[int]`, *optional*):
            Prefixes (in chunks) for the task-aware and soft rules; default: the largest.
    """

    output: str | None = field(default=None, metadata={"help": "JSON file of the raw results."})
    quick: bool = field(default=False, metadata={"help": "Tiny settings for a smoke test."})
    report: bool = field(default=False, metadata={"help": "Only print the Markdown table from the results file."})
    energy: float = field(default=1e-3, metadata={"help": "Budget ε of every rule."})
    max_null_dim: int = field(default=128, metadata={"help": "Cap of every rule."})
    chunk_size: int = field(default=48, metadata={"help": "Conversations per covariance chunk."})
    num_chunks: int = field(default=16, metadata={"help": "Chunks of the model's own conversations."})
    answer_tokens: int = field(default=48, metadata={"help": "Greedy answer tokens after each evaluation prompt."})
    task_prefixes: list[int] | None = field(default=None, metadata={"help": "Prefixes (chunks) for task/soft."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Local model instead of SmolLM2."})
    model_cache_dir: str | None = field(default=None, metadata={"help": "Cache folder of the converted SmolLM2."})

    def __post_init__(self) -> None:
        if self.output is None:
            self.output = str(results_path("null_space_quality", self.quick))


def quick_settings(arguments: QualityArguments) -> dict:
    return {"chunk_size": 8, "num_chunks": 4, "answer_tokens": 8}


def soft_energy_shares(
    covariance: torch.Tensor, evaluation: dict[str, torch.Tensor], energy: float
) -> dict[str, float]:
    """
    The ridge weighting P = λ·(C + λI)⁻¹ (soft projection: each eigen-direction weighted by λ / (σ + λ)), with λ
    found by bisection so that tr(P·C·P) / tr(C) = ε in-sample; returns tr(P·C_s·P) / tr(C_s) for every set s.
    """
    eigenvalues, eigenvectors = decompose_covariance(covariance)
    eigenvalues = eigenvalues.clamp(min=0.0)
    total = eigenvalues.sum()

    def share(ridge: float, energies: torch.Tensor, trace: torch.Tensor) -> float:
        return float(((ridge / (eigenvalues + ridge)) ** 2 * energies).sum() / trace)

    low, high = 1e-12 * total.item(), total.item()
    for _ in range(100):
        middle = (low * high) ** 0.5
        if share(middle, eigenvalues, total) > energy:
            high = middle
        else:
            low = middle
    shares = {}
    for name, other in evaluation.items():
        energies = (eigenvectors * (other @ eigenvectors)).sum(dim=0)
        shares[name] = share(low, energies, torch.trace(other))
    shares["calibration"] = share(low, eigenvalues, total)
    return shares


def summarize(shares: dict[str, NullSpaceEnergy]) -> dict:
    summary = {name: energy.summary() for name, energy in shares.items()}
    for numerator, denominator in SELECTIVITY.items():
        ratio = shares[numerator].ratio_to(shares[denominator])
        summary[f"selectivity_{numerator}"] = ratio.summary()
    return summary


def print_report(results: dict) -> None:
    """The results as the Markdown table of BENCHMARKS.md section 6."""
    print(
        "| calibration data (tokens) | rule | null dim mean / min | calibration | held-out pool | general_eval | "
        "general_heldout (p90) | training prompts | held-out harmful | selectivity: training / held-out harmful |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in results["runs"]:
        summary = run["summary"]
        median = {name: f"{values['median']:.2e}" for name, values in summary.items() if "median" in values}
        null_dims = f"{run['null_dim_mean']:.1f} / {run['null_dim_min']}" if "null_dims" in run else "(weights)"
        print(
            f"| {run['data']} ({run['tokens']:,}) | {run['rule']} | {null_dims} | {median['calibration']} | "
            f"{median['heldout_pool']} | {median['general_eval']} | {median['general_heldout']} "
            f"({summary['general_heldout']['p90']:.2e}) | {median['train']} | {median['harmful_heldout']} | "
            f"{summary['selectivity_train']['median']:.2f} / {summary['selectivity_harmful_heldout']['median']:.2f} |"
        )


def main() -> None:
    arguments = parse_arguments(QualityArguments, quick_settings)
    if arguments.report:
        print_report(json.loads(Path(arguments.output).read_text()))
        return
    started = time.perf_counter()
    torch.manual_seed(0)
    results: dict = {"arguments": vars(arguments).copy(), "environment": environment(), "runs": []}
    path = model_dir(arguments.model_name_or_path, arguments.model_cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    answered = CalibrationSettings(completion_length=arguments.answer_tokens, sketch_dim=0, batch_size=32)
    as_is = CalibrationSettings(generate_completions=False, sketch_dim=0, batch_size=32, max_length=1024)

    def covariances(dataset: Dataset, settings: CalibrationSettings) -> tuple[dict[str, torch.Tensor], int, float]:
        settings = CalibrationSettings(**{**vars(settings), "num_samples": len(dataset)})
        inputs = collect_layer_inputs(model, tokenizer, dataset, settings)
        seconds = sum(inputs.seconds.values())
        return {names[0]: accumulator.sum for names, accumulator in inputs.groups}, inputs.token_count, seconds

    def first(dataset: Dataset, rows: int) -> Dataset:
        return dataset.select(range(min(rows, len(dataset))))

    limit = 8 if arguments.quick else None
    sets = {
        "heldout_pool": (embedded_prompts("general_conversations_heldout"), as_is),
        "general_eval": (embedded_prompts("general_eval"), answered),
        "general_heldout": (embedded_prompts("general_heldout"), answered),
        "train": (demo_safety_dataset("train"), answered),
        "harmful_heldout": (
            concatenate_datasets([embedded_prompts("harmful_eval"), embedded_prompts("harmful_heldout")]),
            answered,
        ),
    }
    evaluation: dict[str, dict[str, torch.Tensor]] = {}
    for name, (dataset, settings) in sets.items():
        evaluation[name], tokens, seconds = covariances(first(dataset, limit or len(dataset)), settings)
        results.setdefault("sets", {})[name] = {"tokens": tokens, "seconds": seconds}
        print(f"{name}: {tokens} tokens ({seconds:.0f} s)", flush=True)
    group_names = list(evaluation["train"])

    # Calibration data: the old embedded prompts (two folds by row parity) and chunks of the model's conversations.
    old = embedded_prompts("general_calibration")
    old_settings = CalibrationSettings(completion_length=16, sketch_dim=0, batch_size=32)
    old_folds = []
    old_tokens = 0
    for parity in (0, 1):
        fold = old.select(range(parity, len(old) if limit is None else min(len(old), 2 * limit), 2))
        covariance, tokens, _ = covariances(fold, old_settings)
        old_folds.append({name: matrix.float() for name, matrix in covariance.items()})
        old_tokens += tokens
    conversations = embedded_prompts("general_conversations")
    chunks = []
    chunk_tokens = []
    for index in range(arguments.num_chunks):
        rows = range(index * arguments.chunk_size, (index + 1) * arguments.chunk_size)
        covariance, tokens, seconds = covariances(conversations.select(rows), as_is)
        chunks.append({name: matrix.float() for name, matrix in covariance.items()})
        chunk_tokens.append(tokens)
        print(f"chunk {index}: {tokens} tokens ({seconds:.0f} s)", flush=True)
    results["sets"]["old_calibration"] = {"tokens": old_tokens}
    results["sets"]["conversation_chunks"] = {"tokens": chunk_tokens}

    def folds_of(prefix: int | None, name: str) -> list[torch.Tensor]:
        if prefix is None:
            return [fold[name].double() for fold in old_folds]
        return [sum(chunks[index][name].double() for index in range(parity, prefix, 2)) for parity in (0, 1)]

    rules = {
        "energy": NullSpaceRule(rule="energy", energy=arguments.energy, max_null_dim=arguments.max_null_dim),
        "heldout": NullSpaceRule(rule="heldout", energy=arguments.energy, max_null_dim=arguments.max_null_dim),
        "task": NullSpaceRule(rule="task", energy=arguments.energy, max_null_dim=arguments.max_null_dim),
    }
    prefixes: list[int | None] = [None]
    size = arguments.num_chunks
    while size >= 2 and len(prefixes) < 4:
        prefixes.insert(1, size)
        size //= 2
    task_prefixes = arguments.task_prefixes or [prefixes[-1]]
    for prefix in prefixes:
        tokens = old_tokens if prefix is None else sum(chunk_tokens[:prefix])
        data = "old 80 prompts" if prefix is None else f"{prefix * arguments.chunk_size} conversations"
        names = ["energy", "heldout"] + (["task", "soft"] if prefix in task_prefixes or prefix is None else [])
        for rule_name in names:
            rule_started = time.perf_counter()
            soft_shares: dict[str, dict[str, float]] = {"calibration": {}, **{name: {} for name in EVALUATION_SETS}}
            bases: dict[str, NullSpaceBasis] = {}
            totals: dict[str, torch.Tensor] = {}
            null_dims, heldout_estimates = {}, {}
            for group in group_names:
                folds = folds_of(prefix, group)
                totals[group] = sum(folds[1:], folds[0])
                if rule_name == "soft":
                    evaluated = {name: evaluation[name][group] for name in EVALUATION_SETS}
                    for set_name, share in soft_energy_shares(totals[group], evaluated, arguments.energy).items():
                        soft_shares[set_name][group] = share
                    continue
                # The energy rule selects from the merged covariance; its fold estimate (two more eigendecompositions)
                # is computed where the other rules run too.
                measured_folds = folds if rule_name != "energy" or len(names) > 2 else [totals[group]]
                statistics = InputStatistics(measured_folds, task=evaluation["train"][group])
                selection = rules[rule_name].select(statistics)
                bases[group] = selection.basis
                null_dims[group] = selection.basis.null_dim
                heldout_estimates[group] = selection.heldout_share
            if rule_name == "soft":
                energies = {name: NullSpaceEnergy(values) for name, values in soft_shares.items()}
            else:
                energies = {"calibration": null_space_energy(bases, totals)}
                energies.update({name: null_space_energy(bases, evaluation[name]) for name in EVALUATION_SETS})
            run = {
                "data": data,
                "tokens": tokens,
                "rule": rule_name,
                "seconds": time.perf_counter() - rule_started,
                "summary": summarize(energies),
                "by_group": {name: energy.by_group for name, energy in energies.items()},
            }
            if null_dims:
                run["null_dims"] = null_dims
                run["null_dim_mean"] = sum(null_dims.values()) / len(null_dims)
                run["null_dim_min"] = min(null_dims.values())
                if None not in heldout_estimates.values():
                    run["fold_heldout_estimate"] = NullSpaceEnergy(heldout_estimates).summary()
            results["runs"].append(run)
            summary = run["summary"]
            print(
                f"{data:>20} ({tokens:>6} tok) {rule_name:>7}: calib {summary['calibration']['median']:.2e} "
                f"pool {summary['heldout_pool']['median']:.2e} eval {summary['general_eval']['median']:.2e} "
                f"heldout {summary['general_heldout']['median']:.2e} (p90 {summary['general_heldout']['p90']:.2e}) "
                f"train {summary['train']['median']:.2e} sel {summary['selectivity_train']['median']:.2f} "
                f"sel_h {summary['selectivity_harmful_heldout']['median']:.2f} "
                f"null {run.get('null_dim_mean', float('nan')):.1f} ({run['seconds']:.0f} s)",
                flush=True,
            )
    record_end(results, started)
    write_final_results(Path(arguments.output), results, arguments.quick)
    print_report(results)


if __name__ == "__main__":
    main()
