"""What the projection costs: NSPOTrainer against GRPOTrainer in the same process with the same settings, on
SmolLM2-135M-Instruct with the demo's LoRA (r=8, all linear layers) and the main rule (energy ε = 1e-3).

Step time. Both trainers run `warmup_steps + steps` optimizer steps, `rounds` times, alternating which goes first
(GRPO, NSPO, NSPO, GRPO, …) so a slow drift of the machine's load hits both alike; every completion is generated to
its full length (`min_new_tokens`) so every step does the same work. Reported as medians over the timed steps:

- TRL's logged `step_time` and the ratio of its medians, NSPO / GRPO. Caution: TRL times `GRPOTrainer.training_step`
  (generation, forward, backward), and NSPO's work runs after it (gradient projection) and after the optimizer step
  (re-projection), so this ratio cannot see the projection: it is ≈ 1 by construction, up to noise;
- the whole optimizer step (`on_step_begin` → `on_step_end`: the above, clipping, the optimizer step and both
  projections) and its ratio: what a user waits for, noise included;
- the NSPO-only work itself, timed by wrapping the trainer's constraint methods: gradient projection and parameter
  re-projection per step, the logged preservation metric per log; and the overhead estimate
  1 + median(projections per step) / median(GRPO optimizer step), which the machine's noise barely moves.
  Target: ≤ 1.03.

Calibration. With the trainer's settings, on the base model, phase by phase with the library's own functions: greedy
answers (generation), the covariance pass (forward with the hooks that accumulate K·Kᵀ), and the eigendecompositions,
against a plain forward pass over the same tokens (same batches, no hooks); tokens/s of each, and each phase's time
as a multiple of that plain forward pass. Also the end-to-end cost as a user sees it: NSPOTrainer's construction time
minus GRPOTrainer's, when it calibrates and when it loads the projector file it wrote.

Memory. Bytes of the stored projector bases (the smaller of the null basis and its complement, fp32), of the input
sketches kept for the logged metric, and of the file, against dense d×d fp32 projectors (one per shared input, one per
module, and the original implementation's set: MLP modules only), the model's parameters and the adapter; and the
stored bytes under every rule of the sweep. Target: projector bytes ≤ 5% of the model's.

    python bench/cost.py            # -> bench/results/cost.json
    python bench/cost.py --quick    # smoke test: about 2 minutes on one CPU thread
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from harness import (
    MAIN_RULE,
    SWEEP_RULES,
    BenchmarkArguments,
    ConstraintTimer,
    StepTimer,
    demo_lora_config,
    eigendecompose,
    environment,
    median,
    model_dir,
    nspo_settings,
    null_space_statistics,
    parse_arguments,
    projectors_for_rule,
    record_end,
    refusal_trainer,
    rule_key,
    rule_label,
    write_final_results,
    write_results,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from trl_nspo import NSPOConfig, NullSpaceRule
from trl_nspo.calibration import layer_input_covariances
from trl_nspo.calibration_data import calibration_token_sequences, eval_mode, pad_token_id, right_padded_batches
from trl_nspo.demo import DemoArguments, demo_safety_dataset, embedded_prompts
from trl_nspo.fingerprints import model_fingerprint, projectors_calibration_record
from trl_nspo.projectors import PROJECTORS_FILE_NAME
from trl_nspo.targets import find_constrained_modules

QUICK_SETTINGS = {
    "steps": 3,
    "warmup_steps": 1,
    "rounds": 1,
    "num_generations": 2,
    "max_completion_length": 8,
    "calibration_num_samples": 8,
    "calibration_completion_length": 8,
    "trainer_calibrates": False,
}
MLP_INPUT_MODULES = ("gate_proj", "up_proj", "down_proj")
# Stored bytes are reported for the sweep's rules and for the main rule with its null dimension capped
# (`null_space_max_dim`): the stored basis is then d × cap, whatever the null fraction.
MEMORY_RULES = SWEEP_RULES + tuple(
    NullSpaceRule(rule=MAIN_RULE.rule, energy=MAIN_RULE.energy, max_null_dim=cap) for cap in (32, 128)
)


@dataclass
class CostArguments(BenchmarkArguments):
    """
    Arguments of `bench/cost.py`: those of `harness.BenchmarkArguments` (every sampled completion is made full
    length), and

    Args:
        steps (`int`, *optional*, defaults to `10`):
            Timed optimizer steps per trainer and round.
        warmup_steps (`int`, *optional*, defaults to `2`):
            Optimizer steps before the timed ones.
        rounds (`int`, *optional*, defaults to `2`):
            Runs of each trainer, alternating which goes first.
        trainer_calibrates (`bool`, *optional*, defaults to `True`):
            Let the first NSPOTrainer calibrate itself (its construction time then shows calibration as a user sees
            it); otherwise it loads the projectors computed by the phase measurement.
    """

    results_name = "cost"
    steps: int = field(default=10, metadata={"help": "Timed optimizer steps per trainer and round."})
    warmup_steps: int = field(default=2, metadata={"help": "Optimizer steps before the timed ones."})
    rounds: int = field(default=2, metadata={"help": "Runs of each trainer, alternating which goes first."})
    trainer_calibrates: bool = field(
        default=True, metadata={"help": "Let the first NSPOTrainer calibrate itself (timed end to end)."}
    )

    def run_demo_arguments(self) -> DemoArguments:
        """The demo's arguments of one run: warm-up and timed steps."""
        return self.demo_arguments(max_steps=self.warmup_steps + self.steps)

    def trainer_settings(self, output_dir: Path, projectors_dir: Path) -> dict:
        """NSPOConfig keyword arguments; one log per step, so TRL's `step_time` is logged for every step."""
        return nspo_settings(
            self.run_demo_arguments(),
            output_dir,
            MAIN_RULE,
            logging_steps=1,
            generation_kwargs={"min_new_tokens": self.max_completion_length},
            calibration_num_samples=self.calibration_num_samples,
            projectors_path=str(projectors_dir),
        )


@torch.no_grad()
def plain_forward_seconds(model, sequences: list[list[int]], pad_id: int, batch_size: int) -> float:
    """A forward pass over the calibration tokens with the calibration's batches, without hooks."""
    device = next(model.parameters()).device
    with eval_mode(model):
        started = time.perf_counter()
        for input_ids, attention_mask in right_padded_batches(sequences, batch_size, pad_id, device):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return time.perf_counter() - started


def measure_calibration(arguments: CostArguments, model_path: Path, tokenizer, projectors_dir: Path) -> dict:
    """Calibration phase by phase, against a plain forward pass over the same tokens; the stored bytes of every rule.
    Writes the main rule's projectors to `projectors_dir` (used when the trainer does not calibrate itself)."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    settings = NSPOConfig(**arguments.trainer_settings(projectors_dir, projectors_dir)).calibration_settings()
    dataset = embedded_prompts("general_calibration")
    modules = find_constrained_modules(model)
    pad_id = pad_token_id(tokenizer)

    started = time.perf_counter()
    sequences, counts = calibration_token_sequences(model, tokenizer, dataset, settings, show_progress=False)
    generation_s = time.perf_counter() - started
    tokens = sum(len(ids) for ids in sequences)
    # One batch first, so that neither timed pass pays for first-call allocations.
    plain_forward_seconds(model, sequences[: settings.batch_size], pad_id, settings.batch_size)
    plain_before_s = plain_forward_seconds(model, sequences, pad_id, settings.batch_size)
    started = time.perf_counter()
    groups = list(layer_input_covariances(model, modules, sequences, pad_id, settings, show_progress=False))
    covariance_s = time.perf_counter() - started
    plain_after_s = plain_forward_seconds(model, sequences, pad_id, settings.batch_size)
    decompositions, eigen_s = eigendecompose(groups)
    plain_s = (plain_before_s + plain_after_s) / 2

    by_rule = {}
    fingerprint = model_fingerprint(model)
    calibration = projectors_calibration_record(model, tokenizer, dataset, settings, sequences, counts)
    for rule in MEMORY_RULES:
        projectors = projectors_for_rule(decompositions, rule, fingerprint, calibration, bool(settings.sketch_dim))
        by_rule[rule_key(rule)] = {"rule": asdict(rule), **null_space_statistics(projectors, arguments.lora_r)}
        if rule is MAIN_RULE:
            projectors.save(projectors_dir)
    group_dims = [accumulator.input_dim for _, accumulator in groups]
    module_dims = {name: module.in_features for name, module in modules.items()}
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model_parameters = sum(p.numel() for p in model.parameters())
    del model, groups, decompositions
    gc.collect()
    return {
        "rows": counts["rows"],
        "tokens": tokens,
        "generated_tokens": counts["generated_tokens"],
        "groups": len(group_dims),
        "modules": len(module_dims),
        "seconds": {
            "generation": generation_s,
            "covariance_pass": covariance_s,
            "eigendecomposition": eigen_s,
            "total": generation_s + covariance_s + eigen_s,
            "plain_forward": plain_s,
            "plain_forward_runs": [plain_before_s, plain_after_s],
        },
        "tokens_per_second": {
            "generation": counts["generated_tokens"] / generation_s if generation_s else None,
            "covariance_pass": tokens / covariance_s,
            "plain_forward": tokens / plain_s,
            "calibration_end_to_end": tokens / (generation_s + covariance_s + eigen_s),
        },
        "covariance_pass_over_plain_forward": covariance_s / plain_s,
        "over_plain_forward": {
            "generation": generation_s / plain_s,
            "covariance_pass": covariance_s / plain_s,
            "eigendecomposition": eigen_s / plain_s,
            "total": (generation_s + covariance_s + eigen_s) / plain_s,
        },
        "bytes": {
            "model_parameters": model_bytes,
            "model_parameters_bf16": 2 * model_parameters,
            "dense_fp32_per_shared_input": sum(4 * d * d for d in group_dims),
            "dense_fp32_per_module": sum(4 * d * d for d in module_dims.values()),
            "dense_fp32_original_mlp_modules": sum(
                4 * d * d for name, d in module_dims.items() if name.endswith(MLP_INPUT_MODULES)
            ),
        },
        "by_rule": by_rule,
    }


def run_trainer(arguments: CostArguments, method: str, model_path: Path, tokenizer, work_dir: Path) -> dict:
    """One timed training run; `method` is `grpo` or `nspo`."""
    settings = arguments.trainer_settings(work_dir / method, work_dir / "projectors")
    timer = StepTimer()
    common = {
        "train_dataset": demo_safety_dataset("train"),
        "peft_config": demo_lora_config(arguments.run_demo_arguments()),
        "processing_class": tokenizer,
        "callbacks": [timer],
    }
    calibrates = method == "nspo" and not (work_dir / "projectors" / PROJECTORS_FILE_NAME).is_file()
    set_seed(0)
    started = time.perf_counter()
    trainer = refusal_trainer(method == "nspo", model_path, settings, **common)
    constraint_timer = ConstraintTimer(trainer.constraint) if method == "nspo" else None
    construction_s = time.perf_counter() - started
    trainer.train()
    warmup = arguments.warmup_steps
    step_times = [entry["step_time"] for entry in trainer.state.log_history if "step_time" in entry]
    record = {
        "method": method,
        "construction_s": construction_s,
        "calibrated_in_constructor": calibrates,
        "trl_step_time": step_times[warmup:],
        "optimizer_step": timer.durations[warmup:],
        "completion_lengths": [
            entry["completions/mean_length"]
            for entry in trainer.state.log_history
            if "completions/mean_length" in entry
        ],
    }
    if constraint_timer is not None:
        seconds = constraint_timer.seconds
        record["project_gradients"] = seconds["project_gradients"][warmup:]
        record["project_parameters"] = seconds["project_parameters"][warmup:]
        record["preservation_metric_per_log"] = seconds["preservation_error"]
        projectors = trainer.projectors
        record["bytes"] = {
            "projector_bases": projectors.num_bytes,
            "input_sketches": sum(
                g.input_sketch.numel() * g.input_sketch.element_size()
                for g in projectors.groups.values()
                if g.input_sketch is not None
            ),
            "projector_file": (work_dir / "projectors" / PROJECTORS_FILE_NAME).stat().st_size,
            "lora_adapter": sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad),
        }
        record["null_spaces"] = null_space_statistics(projectors, arguments.lora_r)
    del trainer
    gc.collect()
    return record


def pooled(runs: list[dict], method: str, key: str) -> list[float]:
    return [value for run in runs if run["method"] == method for value in run.get(key, [])]


def summarise(runs: list[dict], calibration: dict) -> dict:
    grpo_trl, nspo_trl = median(pooled(runs, "grpo", "trl_step_time")), median(pooled(runs, "nspo", "trl_step_time"))
    grpo_step, nspo_step = (
        median(pooled(runs, "grpo", "optimizer_step")),
        median(pooled(runs, "nspo", "optimizer_step")),
    )
    nspo_runs = [run for run in runs if run["method"] == "nspo"]
    per_step = [
        gradient + parameters
        for run in nspo_runs
        for gradient, parameters in zip(run["project_gradients"], run["project_parameters"], strict=False)
    ]
    projection_s = median(per_step)
    grpo_construction = median([run["construction_s"] for run in runs if run["method"] == "grpo"])
    calibrating = [run["construction_s"] for run in nspo_runs if run["calibrated_in_constructor"]]
    loading = [run["construction_s"] for run in nspo_runs if not run["calibrated_in_constructor"]]
    memory = nspo_runs[0]["bytes"]
    model_bytes = calibration["bytes"]["model_parameters"]
    return {
        "median_s": {
            "grpo_trl_step_time": grpo_trl,
            "nspo_trl_step_time": nspo_trl,
            "grpo_optimizer_step": grpo_step,
            "nspo_optimizer_step": nspo_step,
            "nspo_projections_per_step": projection_s,
            "nspo_project_gradients": median(pooled(runs, "nspo", "project_gradients")),
            "nspo_project_parameters": median(pooled(runs, "nspo", "project_parameters")),
            "nspo_preservation_metric_per_log": median(pooled(runs, "nspo", "preservation_metric_per_log")),
        },
        "timed_steps_per_method": len(pooled(runs, "grpo", "optimizer_step")),
        "ratios": {
            "trl_step_time": nspo_trl / grpo_trl,
            "optimizer_step": nspo_step / grpo_step,
            "projection_overhead_estimate": 1 + projection_s / grpo_step,
            "target": 1.03,
        },
        "construction_s": {
            "grpo": grpo_construction,
            "nspo_calibrating": median(calibrating),
            "nspo_loading_projectors": median(loading),
        },
        "memory": {
            **memory,
            "projector_bases_over_model": memory["projector_bases"] / model_bytes,
            "projector_bases_over_model_bf16": memory["projector_bases"]
            / calibration["bytes"]["model_parameters_bf16"],
            "target_over_model": 0.05,
        },
    }


def _mb(value: int) -> str:
    return f"{value / 1e6:9.1f} MB"


def print_tables(results: dict) -> None:
    summary, calibration = results["summary"], results["calibration"]
    seconds, ratios = summary["median_s"], summary["ratios"]
    print(f"\nStep time: medians over {summary['timed_steps_per_method']} timed steps per trainer")
    print(f"{'':58}{'GRPO':>10}{'NSPO':>10}{'NSPO/GRPO':>11}")
    print(
        f"{'TRL step_time (training_step only; blind to projections)':58}{seconds['grpo_trl_step_time']:>10.3f}"
        f"{seconds['nspo_trl_step_time']:>10.3f}{ratios['trl_step_time']:>11.3f}"
    )
    print(
        f"{'optimizer step (incl. projections; noisy)':58}{seconds['grpo_optimizer_step']:>10.3f}"
        f"{seconds['nspo_optimizer_step']:>10.3f}{ratios['optimizer_step']:>11.3f}"
    )
    print(f"{'  NSPO gradient projection, per step':58}{'':>10}{seconds['nspo_project_gradients']:>10.4f}")
    print(f"{'  NSPO parameter re-projection, per step':58}{'':>10}{seconds['nspo_project_parameters']:>10.4f}")
    print(
        f"{'  overhead estimate 1 + projections / GRPO step (≤ 1.03)':58}{'':>10}{'':>10}"
        f"{ratios['projection_overhead_estimate']:>11.4f}"
    )
    print(
        f"{'  NSPO preservation metric, per log (not per step)':58}{'':>10}"
        f"{seconds['nspo_preservation_metric_per_log']:>10.4f}"
    )

    phase, rate = calibration["seconds"], calibration["tokens_per_second"]
    print(
        f"\nCalibration: {calibration['rows']} prompts, {calibration['tokens']} tokens "
        f"({calibration['generated_tokens']} generated), {calibration['groups']} shared inputs of "
        f"{calibration['modules']} modules"
    )
    ratio = calibration["over_plain_forward"]
    print(f"{'':44}{'seconds':>10}{'tokens/s':>12}{'× plain forward':>17}")
    rows = (
        ("greedy answers (generated tokens/s)", "generation", "generation"),
        ("covariance pass (forward + hooks)", "covariance_pass", "covariance_pass"),
        ("eigendecompositions (float64)", "eigendecomposition", None),
        ("calibration total", "total", "calibration_end_to_end"),
    )
    for label, key, rate_key in rows:
        tokens_per_second = f"{rate[rate_key]:>12.1f}" if rate_key else f"{'':>12}"
        print(f"{label:44}{phase[key]:>10.1f}{tokens_per_second}{ratio[key]:>17.2f}")
    print(
        f"{'plain forward, same tokens and batches':44}{phase['plain_forward']:>10.1f}{rate['plain_forward']:>12.1f}"
        f"{1:>17.2f}"
    )
    construction = summary["construction_s"]
    print(f"{'GRPOTrainer construction':44}{construction['grpo']:>10.1f}")
    for key, label in (("nspo_calibrating", "calibrating"), ("nspo_loading_projectors", "loading its file")):
        if construction[key] is not None:
            print(f"{'NSPOTrainer, ' + label:44}{construction[key]:>10.1f}")

    memory, sizes = summary["memory"], calibration["bytes"]
    print("\nMemory")
    print(f"{'projector bases, stored (fp32, smaller of U and R)':52}{_mb(memory['projector_bases'])}")
    print(
        f"{'  share of the model (fp32 / bf16 weights; ≤ 5%)':52}{memory['projector_bases_over_model']:>11.1%}"
        f"  /{memory['projector_bases_over_model_bf16']:>6.1%}"
    )
    print(f"{'input sketches (logged preservation metric)':52}{_mb(memory['input_sketches'])}")
    print(f"{'projector file on disk':52}{_mb(memory['projector_file'])}")
    print(f"{'dense d×d fp32, one per shared input':52}{_mb(sizes['dense_fp32_per_shared_input'])}")
    print(f"{'dense d×d fp32, one per module':52}{_mb(sizes['dense_fp32_per_module'])}")
    print(f"{'dense d×d fp32, original (MLP modules only)':52}{_mb(sizes['dense_fp32_original_mlp_modules'])}")
    print(f"{'model parameters (as loaded, fp32)':52}{_mb(sizes['model_parameters'])}")
    print(f"{'LoRA adapter (trainable parameters)':52}{_mb(memory['lora_adapter'])}")
    print(f"\n{'rule':28}{'null fraction':>14}{'min null dim':>14}{'stored':>13}{'of model':>10}")
    for rule in MEMORY_RULES:
        stats = calibration["by_rule"][rule_key(rule)]
        print(
            f"{rule_label(rule):28}{stats['null_dim_fraction']:>14.3f}{stats['null_dim_min']:>14d}"
            f"{_mb(stats['projector_bytes']):>13}{stats['projector_bytes'] / sizes['model_parameters']:>10.1%}"
        )


def main(arguments: CostArguments) -> dict:
    started = time.perf_counter()
    model_path = model_dir(arguments.model_name_or_path, arguments.model_cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    output_path = Path(arguments.output)
    results: dict = {"arguments": asdict(arguments), "environment": environment(), "model": str(model_path)}
    with tempfile.TemporaryDirectory(prefix="cost-") as work:
        work_dir = Path(work)
        print("[1/2] Calibration, phase by phase, against a plain forward pass")
        phase_dir = work_dir / ("phase-projectors" if arguments.trainer_calibrates else "projectors")
        results["calibration"] = measure_calibration(arguments, model_path, tokenizer, phase_dir)
        print(f"[2/2] Step times: {arguments.rounds} round(s) of GRPO and NSPO")
        results["runs"] = []
        for round_index in range(arguments.rounds):
            order = ("grpo", "nspo") if round_index % 2 == 0 else ("nspo", "grpo")
            for method in order:
                print(f"  round {round_index + 1}: {method}")
                results["runs"].append(run_trainer(arguments, method, model_path, tokenizer, work_dir))
                write_results(output_path, results)
    results["summary"] = summarise(results["runs"], results["calibration"])
    record_end(results, started)
    print_tables(results)
    write_final_results(output_path, results, arguments.quick)
    return results


if __name__ == "__main__":
    main(parse_arguments(CostArguments, lambda arguments: QUICK_SETTINGS))
