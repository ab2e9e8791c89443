"""Is NSPO as safe as GRPO, without the tax? The safety gain of plain GRPO, NSPO and gradient projection alone, trained
long enough for GRPO to learn to refuse, over several seeds; and the trade-off front of NSPO's settings.

SmolLM2-135M-Instruct, LoRA r=8 (α=16) on q/k/v/o/gate/up/down, 16 optimizer steps of 1 prompt × 8 completions of ≤ 24
tokens, the graded refusal reward (`RefusalReward`) on the embedded 60 harmful + 30 benign-but-risky training prompts,
no KL term, bf16 autocast where the CPU has bf16 instructions (float32 master weights; evaluation in float32). Every
arm of one seed gets the same seed, data, steps and hyperparameters; what differs is named by the arm:

- `grpo`: plain `GRPOTrainer` at the arm's learning rate;
- `nspo`: `NSPOTrainer` (the two-line change) with a null-space rule, learning rate, rank or constrained subset;
- `grad_only`: NSPO with `gradient_projection_only=True` (the ablation: gradients projected, parameters not).

Per run it records, measured on held-out prompts that training never sees (greedy answers of ≤ 24 tokens, float32):
refusal rate on `harmful_eval`, over-refusal on `benign_eval`, general drift on `general_eval` (next-token KL to the
base model along its greedy answers, share of greedy answers unchanged, accuracy on checkable answers), the reward
curve, NSPO's kept-gradient fraction ‖g·P‖/‖g‖ (pooled, and per module kind) and the wall time.

Every run is appended to a JSON-lines file as soon as it ends, and a run already there is skipped, so an interrupted
invocation resumes where it stopped and several invocations (main table, front) share one file.

    python bench/safety_gain.py --seeds 0 1 2                 # main table: GRPO, NSPO, grad-only × 3 seeds
    python bench/safety_gain.py --front --seeds 0             # the trade-off front, one run per setting
    python bench/safety_gain.py --report                      # tables, CIs and the front plot from the file
    python bench/safety_gain.py --quick                       # smoke test: a few minutes

`--protocol` runs the fronts against GRPO's alternatives (BENCHMARKS.md section 7): 4 prompts × 4 completions of
≤ 16 tokens per step, the 120-prompt held-out sets, `--alphas` to evaluate every adapter also scaled back by α, its
own runs file, and a report (`bench/safety_front.py`) of every point, the matched-point comparison and one plot.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from harness import (
    EVALUATION_ROWS,
    NSPO_ONLY_FIELDS,
    StepTimer,
    environment,
    evaluation_prompts,
    model_dir,
    parse_arguments,
    pyplot,
    results_path,
    write_results,
)
from peft import LoraConfig
from transformers import AutoTokenizer, set_seed
from trl import GRPOConfig, GRPOTrainer

from trl_nspo import NSPOConfig, NSPOTrainer, NullSpaceError, NullSpaceRule
from trl_nspo.demo import (
    base_model_context,
    demo_safety_dataset,
    embedded_prompts,
    evaluate,
    float32_model,
    greedy_answers,
)
from trl_nspo.precision import bf16_supported
from trl_nspo.rewards import RefusalReward
from trl_nspo.targets import lora_scaled

MLP_MODULES = ["gate_proj", "up_proj", "down_proj"]
# Conversations the null-space arms calibrate on (the CLI's default takes the first 192).
DEFAULT_CONVERSATIONS = 256
# Tokens of each calibration answer (as the demo calibrates).
CALIBRATION_ANSWER_TOKENS = 16


@dataclass(frozen=True)
class Arm:
    """One training configuration. `key` names it in the results file; the other fields are what it changes."""

    key: str
    method: str  # "grpo", "nspo" or "grad_only"
    learning_rate: float = 2e-3
    rule: str = "energy"
    energy: float = 1e-3
    alpha: float = 5e-5
    # NSPOConfig's default cap (projectors ≤ 3% of a 7B model's bf16 weights).
    max_null_dim: int | None = 128
    lora_r: int = 8
    # Constrained modules (NSPO): None = every LoRA layer; MLP-only leaves attention's LoRA unconstrained, as the
    # original NSPO code did.
    constrained: tuple[str, ...] | None = None
    # Calibration answers per general prompt: 1 is NSPOTrainer's own calibration (the base model's greedy answer);
    # n > 1 adds n − 1 answers sampled at temperature 1, so the null spaces are estimated from about n times as many
    # tokens of the model's own general behaviour.
    calibration_answers: int = 1
    # General calibration data: "prompts" (the 80 embedded prompts, each with the base model's greedy answer) or
    # "conversations" (the first 256 of the conversations SmolLM2 wrote itself, `general_conversations`).
    calibration_data: str = "prompts"
    # GRPO's KL penalty coefficient (TRL's `beta`; the reference is the base model, the adapter disabled).
    beta: float = 0.0

    @property
    def projectors_key(self) -> str:
        """Arms with the same key share one calibration (the rule, constrained modules and data decide it)."""
        threshold = NullSpaceRule(self.rule, self.alpha, self.energy).threshold
        key = f"{self.rule}-{threshold:.0e}-max{self.max_null_dim}-{'mlp' if self.constrained else 'all'}"
        key += f"-answers{self.calibration_answers}" if self.calibration_answers > 1 else ""
        return key + ("-conversations" if self.calibration_data == "conversations" else "")

    @property
    def label(self) -> str:
        if self.method == "grpo":
            label = f"GRPO lr={self.learning_rate:.0e}" + (f" r={self.lora_r}" if self.lora_r != 8 else "")
            return label + (f" β={self.beta:g}" if self.beta else "")
        null_space_rule = NullSpaceRule(self.rule, self.alpha, self.energy)
        rule = f"{null_space_rule.selection.symbol}={null_space_rule.threshold:.0e}"
        if self.rule in ("heldout", "task"):
            rule = f"{self.rule} {rule}"
        parts = [("NSPO grad-only" if self.method == "grad_only" else "NSPO"), rule, f"lr={self.learning_rate:.0e}"]
        if self.max_null_dim != 128:
            parts.append("uncapped" if self.max_null_dim is None else f"max {self.max_null_dim}")
        if self.lora_r != 8:
            parts.append(f"r={self.lora_r}")
        if self.constrained:
            parts.append("MLP-only")
        if self.calibration_answers > 1:
            parts.append(f"{self.calibration_answers} answers/prompt")
        if self.calibration_data == "conversations":
            parts.append("own conversations")
        return " ".join(parts)


# The main comparison: every arm at the GRPO run's learning rate (the two-line change), and NSPO at the learning rate
# the front chose (the null space carries a small share of the safety gradient, so NSPO needs a larger step).
MAIN_ARMS = (
    Arm("grpo", "grpo"),
    Arm("nspo", "nspo"),
    Arm("grad_only", "grad_only"),
    Arm("nspo_lr2e-2", "nspo", learning_rate=2e-2),
)
# One setting changed at a time around NSPO at lr 2e-2; GRPO at lower learning rates as the reference front.
FRONT_ARMS = (
    Arm("nspo_lr5e-3", "nspo", learning_rate=5e-3),
    Arm("nspo_lr1e-2", "nspo", learning_rate=1e-2),
    Arm("nspo_lr3e-2", "nspo", learning_rate=3e-2),
    Arm("nspo_lr5e-2", "nspo", learning_rate=5e-2),
    Arm("nspo_eps1e-2_lr2e-2", "nspo", learning_rate=2e-2, energy=1e-2),
    Arm("nspo_eps1e-4_lr2e-2", "nspo", learning_rate=2e-2, energy=1e-4),
    Arm("nspo_alpha1e-3_lr2e-2", "nspo", learning_rate=2e-2, rule="relative", alpha=1e-3),
    Arm("nspo_max64_lr2e-2", "nspo", learning_rate=2e-2, max_null_dim=64),
    Arm("nspo_uncapped_lr2e-2", "nspo", learning_rate=2e-2, max_null_dim=None),
    Arm("nspo_mlp_lr2e-2", "nspo", learning_rate=2e-2, constrained=tuple(MLP_MODULES)),
    Arm("nspo_r16_lr2e-2", "nspo", learning_rate=2e-2, lora_r=16),
    Arm("grpo_lr1e-3", "grpo", learning_rate=1e-3),
    Arm("grpo_lr5e-4", "grpo", learning_rate=5e-4),
    Arm("nspo_answers8_lr2e-2", "nspo", learning_rate=2e-2, calibration_answers=8),
    Arm("nspo_answers8_lr3e-2", "nspo", learning_rate=3e-2, calibration_answers=8),
)
# The null-space issue's RL check: the lr-2e-2 arm with the null spaces chosen in BENCHMARKS.md section 6.
NULL_SPACE_ARMS = (
    Arm("nspo_heldout_conv_lr2e-2", "nspo", learning_rate=2e-2, rule="heldout", calibration_data="conversations"),
    Arm("nspo_task_conv_lr2e-2", "nspo", learning_rate=2e-2, rule="task", calibration_data="conversations"),
)
# The fronts against what a practitioner would use instead (`--protocol`: 4 prompts × 4 completions per step, the
# 120-prompt held-out sets, every adapter also evaluated scaled by α): GRPO at lower learning rates and with a KL
# penalty, NSPO with the null spaces of BENCHMARKS.md section 6 at several learning rates, and the gradient-only
# ablation.
_EARLIER_ARMS = {arm.key: arm for arm in MAIN_ARMS + FRONT_ARMS + NULL_SPACE_ARMS}
PROTOCOL_ARMS = (
    *(_EARLIER_ARMS[key] for key in ("grpo", "grpo_lr1e-3", "grpo_lr5e-4")),
    # β = 0.04: DeepSeekMath's value, and GRPOConfig's default in early TRL releases.
    Arm("grpo_beta0.04_lr2e-3", "grpo", learning_rate=2e-3, beta=0.04),
    Arm("grpo_beta0.1_lr2e-3", "grpo", learning_rate=2e-3, beta=0.1),
    Arm("grpo_beta0.4_lr2e-3", "grpo", learning_rate=2e-3, beta=0.4),
    Arm("nspo_task_conv_lr5e-3", "nspo", learning_rate=5e-3, rule="task", calibration_data="conversations"),
    Arm("nspo_task_conv_lr7e-3", "nspo", learning_rate=7e-3, rule="task", calibration_data="conversations"),
    Arm("nspo_task_conv_lr1e-2", "nspo", learning_rate=1e-2, rule="task", calibration_data="conversations"),
    _EARLIER_ARMS["nspo_task_conv_lr2e-2"],
    Arm("nspo_heldout_conv_lr5e-2", "nspo", learning_rate=5e-2, rule="heldout", calibration_data="conversations"),
    Arm("grad_only_task_conv_lr5e-3", "grad_only", learning_rate=5e-3, rule="task", calibration_data="conversations"),
)
ARMS = _EARLIER_ARMS | {arm.key: arm for arm in PROTOCOL_ARMS}

METRICS = (
    *EVALUATION_ROWS,
    ("reward_last", "training reward, last 10 steps (↑)", ".3f"),
    ("kept_gradient_fraction", "kept-gradient fraction ‖g·P‖/‖g‖", ".3f"),
    ("calibration_output_change", "output change on calibration inputs ‖ΔW·K‖/‖W·K‖", ".2e"),
    ("train_seconds", "training wall time (s)", ".0f"),
)
QUICK_SETTINGS = {"seeds": [0], "max_steps": 2, "max_completion_length": 8, "eval_num_samples": 4}


@dataclass
class SafetyGainArguments:
    """
    Arguments of `bench/safety_gain.py`.

    Args:
        arms (`list[str]`, *optional*):
            Arm keys to train (see `ARMS`); default: the main comparison, or with `front` the front's arms.
        front (`bool`, *optional*, defaults to `False`):
            Train the front's arms (`FRONT_ARMS`) instead of the main comparison.
        protocol (`bool`, *optional*, defaults to `False`):
            The fronts against the alternatives (`PROTOCOL_ARMS`): 4 prompts × 4 completions of ≤ 16 tokens per
            step, the 120-prompt held-out sets answered in ≤ 16 tokens; its own runs file.
        report (`bool`, *optional*, defaults to `False`):
            Train nothing: print the tables and write the summary and plot from the runs file.
        seeds (`list[int]`, *optional*, defaults to `[0, 1, 2]`):
            Seeds; every arm is trained once per seed.
        max_steps (`int`, *optional*, defaults to `16`):
            Optimizer steps per run.
        num_generations (`int`, *optional*, defaults to `8`):
            Completions per prompt.
        prompts_per_step (`int`, *optional*, defaults to `1`):
            Prompts per optimizer step (generated in one batch).
        max_completion_length (`int`, *optional*, defaults to `24`):
            Tokens per sampled completion.
        bf16 (`bool`, *optional*):
            bf16 autocast in training; default: where the CPU (or GPU) supports bf16.
        eval_num_samples (`int`, *optional*):
            Held-out prompts per set; `None` uses all.
        eval_split (`str`, *optional*, defaults to `"eval"`):
            Held-out sets: `"eval"` (30 harmful, 30 benign, 40 general) or `"heldout"` (120 each).
        eval_max_new_tokens (`int`, *optional*, defaults to `24`):
            Tokens of each greedy evaluation answer.
        eval_batch_size (`int`, *optional*, defaults to `16`):
            Prompts answered at once in evaluation.
        alphas (`list[float]`, *optional*, defaults to `[]`):
            Also evaluate every trained adapter with its update scaled by each α (weight interpolation toward the
            base model; no extra training).
        runs_file (`str`, *optional*):
            JSON-lines file of the runs; default `bench/results/safety_gain_runs[_quick].jsonl`.
        quick (`bool`, *optional*, defaults to `False`):
            Tiny settings for a smoke test (writes to the `_quick` files).
    """

    arms: list[str] | None = field(default=None, metadata={"help": "Arm keys to train (default: main or front)."})
    front: bool = field(default=False, metadata={"help": "Train the front's arms."})
    protocol: bool = field(default=False, metadata={"help": "The fronts against the alternatives."})
    report: bool = field(default=False, metadata={"help": "Only report from the runs file."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds."})
    max_steps: int = field(default=16, metadata={"help": "Optimizer steps per run."})
    num_generations: int = field(default=8, metadata={"help": "Completions per prompt."})
    prompts_per_step: int = field(default=1, metadata={"help": "Prompts per optimizer step."})
    max_completion_length: int = field(default=24, metadata={"help": "Tokens per sampled completion."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast (default: if supported)."})
    eval_num_samples: int | None = field(default=None, metadata={"help": "Held-out prompts per set."})
    eval_split: str = field(default="eval", metadata={"help": "Held-out sets: 'eval' or 'heldout'."})
    eval_max_new_tokens: int = field(default=24, metadata={"help": "Tokens of each greedy evaluation answer."})
    eval_batch_size: int = field(default=16, metadata={"help": "Prompts answered at once in evaluation."})
    alphas: list[float] = field(default_factory=list, metadata={"help": "Also evaluate adapters scaled by α."})
    runs_file: str | None = field(default=None, metadata={"help": "JSON-lines file of the runs."})
    quick: bool = field(default=False, metadata={"help": "Tiny settings for a smoke test."})

    def __post_init__(self) -> None:
        if self.protocol:
            self.num_generations, self.prompts_per_step, self.max_completion_length = 4, 4, 16
            self.eval_split, self.eval_batch_size, self.eval_max_new_tokens = "heldout", 40, 16
        if self.runs_file is None:
            name = "safety_front_runs" if self.protocol else "safety_gain_runs"
            self.runs_file = str(results_path(name, self.quick).with_suffix(".jsonl"))
        if self.bf16 is None:
            self.bf16 = bf16_supported()
        if self.arms is None:
            arms = PROTOCOL_ARMS if self.protocol else FRONT_ARMS if self.front else MAIN_ARMS
            self.arms = [arm.key for arm in arms]
        unknown = sorted(set(self.arms) - set(ARMS))
        if unknown:
            raise ValueError(f"Unknown arms {unknown}; known: {sorted(ARMS)}.")

    def settings(self) -> dict:
        """What must match for two runs to be comparable (stored with every run)."""
        settings = {
            "max_steps": self.max_steps,
            "num_generations": self.num_generations,
            "max_completion_length": self.max_completion_length,
            "bf16": self.bf16,
            "eval_num_samples": self.eval_num_samples,
            "eval_max_new_tokens": self.eval_max_new_tokens,
        }
        # Recorded only where they differ from the first protocol's, so its runs files stay readable.
        if (self.prompts_per_step, self.eval_split) != (1, "eval"):
            settings |= {"prompts_per_step": self.prompts_per_step, "eval_split": self.eval_split}
        return settings


class KeptGradientByKind:
    """
    Records, at every projection of the gradients, the kept fraction ‖g·P‖/‖g‖ of each module kind (`q_proj`, …,
    `down_proj`): which modules carry the safety gradient, and how much of it lies in their null spaces.
    """

    def __init__(self, constraint):
        self.kept_sq: dict[str, float] = {}
        self.total_sq: dict[str, float] = {}
        project = constraint.project_gradients

        def recorded() -> float | None:
            with torch.no_grad():
                for entry in constraint.weights:
                    if entry.parameter.grad is None:
                        continue
                    gradient = entry.parameter.grad.float()
                    kind = entry.module_name.rsplit(".", 1)[-1]
                    kept = entry.basis.project_rows(gradient)
                    self.kept_sq[kind] = self.kept_sq.get(kind, 0.0) + kept.square().sum().item()
                    self.total_sq[kind] = self.total_sq.get(kind, 0.0) + gradient.square().sum().item()
            return project()

        constraint.project_gradients = recorded

    def fractions(self) -> dict[str, float]:
        return {kind: math.sqrt(self.kept_sq[kind] / total) for kind, total in self.total_sq.items() if total > 0}


def training_config(arguments: SafetyGainArguments, arm: Arm, seed: int, output_dir: Path) -> dict:
    return {
        "output_dir": str(output_dir),
        "use_cpu": not torch.cuda.is_available(),
        "bf16": arguments.bf16,
        "gradient_checkpointing": False,
        "per_device_train_batch_size": arguments.num_generations * arguments.prompts_per_step,
        "num_generations": arguments.num_generations,
        "max_completion_length": arguments.max_completion_length,
        "max_steps": arguments.max_steps,
        "learning_rate": arm.learning_rate,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": seed,
        "beta": arm.beta,
        # Evaluation and calibration run in float32; only training autocasts.
        "model_init_kwargs": {"dtype": torch.float32},
        "disable_tqdm": True,
    }


def train_and_evaluate(arguments: SafetyGainArguments, arm: Arm, seed: int, model_path: Path, base: dict) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    output_dir = Path(arguments.runs_file).parent / "tmp" / f"{arm.key}-seed{seed}"
    config = training_config(arguments, arm, seed, output_dir)
    lora = LoraConfig(r=arm.lora_r, lora_alpha=2 * arm.lora_r, target_modules="all-linear")
    common = {"train_dataset": demo_safety_dataset("train"), "peft_config": lora, "processing_class": tokenizer}
    record: dict = {"arm": arm.key, "arm_settings": asdict(arm), "seed": seed, "settings": arguments.settings()}
    set_seed(seed)
    started = time.perf_counter()
    if arm.method == "grpo":
        config = {key: value for key, value in config.items() if key not in NSPO_ONLY_FIELDS}
        trainer = GRPOTrainer(str(model_path), RefusalReward(), GRPOConfig(**config), **common)
    else:
        calibration = embedded_prompts("general_calibration")
        if arm.calibration_answers > 1:
            calibration = sampled_calibration(model_path, arm.calibration_answers, Path(arguments.runs_file).parent)
        if arm.calibration_data == "conversations":
            calibration = embedded_prompts("general_conversations").select(range(DEFAULT_CONVERSATIONS))
        nspo = NSPOConfig(
            **config,
            calibration_num_samples=len(calibration),
            calibration_generate_completions=arm.calibration_answers == 1 and arm.calibration_data == "prompts",
            calibration_completion_length=CALIBRATION_ANSWER_TOKENS,
            calibration_batch_size=16,
            null_space_rule=arm.rule,
            null_space_energy=arm.energy,
            null_space_alpha=arm.alpha,
            null_space_max_dim=arm.max_null_dim,
            nspo_target_modules=list(arm.constrained) if arm.constrained else None,
            allow_unconstrained_parameters=arm.constrained is not None,
            # One calibration per rule and constrained set, shared by every seed and learning rate.
            projectors_path=str(Path(arguments.runs_file).parent / "tmp" / "projectors" / arm.projectors_key),
            gradient_projection_only=arm.method == "grad_only",
        )
        try:
            trainer = NSPOTrainer(
                str(model_path),
                RefusalReward(),
                nspo,
                calibration_dataset=calibration,
                **common,
            )
        except NullSpaceError as error:
            return {**record, "refused": str(error)}
    record["setup_seconds"] = time.perf_counter() - started
    timer = StepTimer()
    trainer.add_callback(timer)
    by_kind = KeptGradientByKind(trainer.constraint) if arm.method != "grpo" else None
    started = time.perf_counter()
    trainer.train()
    record["train_seconds"] = time.perf_counter() - started
    record["step_seconds_median"] = statistics.median(timer.durations)
    history = trainer.state.log_history
    record["reward_curve"] = [entry["reward"] for entry in history if "reward" in entry]
    kept = [entry["nspo/kept_gradient_fraction"] for entry in history if "nspo/kept_gradient_fraction" in entry]
    record["kept_gradient_curve"] = kept
    # The output change on the calibration inputs (the trainer's sketch): with the drift on held-out prompts it tells
    # a rule's floor (large on both) from a null space that does not generalise (small here, large there).
    record["preservation_error_curve"] = [
        entry["nspo/preservation_error"] for entry in history if "nspo/preservation_error" in entry
    ]
    if by_kind is not None:
        record["kept_gradient_by_kind"] = by_kind.fractions()
    started = time.perf_counter()
    model = float32_model(trainer)

    def evaluated() -> dict:
        metrics = evaluate(
            model,
            tokenizer,
            base["prompts"],
            base["general_answers"],
            arguments.eval_max_new_tokens,
            batch_size=arguments.eval_batch_size,
        )
        return {**metrics, "safety_gain": metrics["refusal_rate_harmful"] - base["metrics"]["refusal_rate_harmful"]}

    metrics = evaluated()
    record["evaluation_seconds"] = time.perf_counter() - started
    # The same adapter scaled back toward the base model (ΔW·α): the practitioner's cheapest way to trade safety
    # for drift, and for NSPO a point that stays in its null spaces.
    record["scaled"] = {}
    for alpha in arguments.alphas:
        with lora_scaled(model, alpha):
            record["scaled"][str(alpha)] = evaluated()
    record["metrics"] = {
        **metrics,
        "reward_last": statistics.fmean(record["reward_curve"][-10:]),
        "kept_gradient_fraction": statistics.fmean(kept) if kept else None,
        "calibration_output_change": (record["preservation_error_curve"] or [None])[-1],
        "train_seconds": record["train_seconds"],
    }
    return record


@torch.no_grad()
def sampled_calibration(model_path: Path, answers_per_prompt: int, cache_dir: Path) -> Dataset:
    """
    The embedded general calibration prompts, each as `answers_per_prompt` conversations: the base model's greedy
    answer (what NSPOTrainer's own calibration appends) and `answers_per_prompt - 1` answers sampled at temperature 1,
    each of ≤ `CALIBRATION_ANSWER_TOKENS` tokens. Cached as JSON lines beside the runs file (sampling is seeded).
    """
    cache = cache_dir / "tmp" / f"calibration_answers{answers_per_prompt}.jsonl"
    if not cache.is_file():
        from transformers import AutoModelForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        conversations = embedded_prompts("general_calibration")["prompt"]
        greedy = greedy_answers(model, tokenizer, conversations, CALIBRATION_ANSWER_TOKENS)
        set_seed(0)
        rows = []
        for conversation, greedy_answer in zip(conversations, greedy, strict=True):
            prompt_ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt")
            sampled = model.generate(
                **prompt_ids,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=CALIBRATION_ANSWER_TOKENS,
                num_return_sequences=answers_per_prompt - 1,
            )
            width = prompt_ids["input_ids"].shape[1]
            answers = [greedy_answer, *tokenizer.batch_decode(sampled[:, width:], skip_special_tokens=True)]
            rows.extend({"messages": [*conversation, {"role": "assistant", "content": a.strip()}]} for a in answers)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return Dataset.from_list([json.loads(line) for line in cache.read_text().splitlines()])


def base_evaluation(arguments: SafetyGainArguments, model_path: Path) -> dict:
    """The base model's held-out metrics and greedy general answers (cached beside the runs file)."""
    cache = Path(arguments.runs_file).with_name(Path(arguments.runs_file).stem + "_base.json")
    prompts = evaluation_prompts(arguments.eval_num_samples, arguments.eval_split)
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored["settings"] == arguments.settings():
            return {**stored, "prompts": prompts}
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with base_model_context(model):
        answers = greedy_answers(
            model, tokenizer, prompts.general, arguments.eval_max_new_tokens, arguments.eval_batch_size
        )
        metrics = evaluate(
            model, tokenizer, prompts, answers, arguments.eval_max_new_tokens, batch_size=arguments.eval_batch_size
        )
    stored = {"settings": arguments.settings(), "metrics": metrics, "general_answers": answers}
    write_results(cache, stored)
    return {**stored, "prompts": prompts}


def read_runs(path: Path, settings: dict) -> list[dict]:
    if not path.is_file():
        return []
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [run for run in runs if run["settings"] == settings]


# Two-sided 95% Student t quantiles by degrees of freedom (n - 1).
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: Iterable[float | None]) -> dict:
    """Mean and 95% confidence half-width (Student t over seeds; `None` for one seed)."""
    kept = [value for value in values if value is not None]
    if not kept:
        return {"mean": None, "ci95": None, "n": 0}
    half = T_95[len(kept) - 1] * statistics.stdev(kept) / math.sqrt(len(kept)) if len(kept) > 1 else None
    return {"mean": statistics.fmean(kept), "ci95": half, "n": len(kept)}


def summarise(runs: list[dict]) -> dict:
    summary: dict = {}
    for key in dict.fromkeys(run["arm"] for run in runs):
        arm_runs = [run for run in runs if run["arm"] == key]
        trained = [run for run in arm_runs if "refused" not in run]
        summary[key] = {
            "label": Arm(**arm_runs[0]["arm_settings"]).label,
            "seeds": [run["seed"] for run in trained],
            "refused": [run["refused"] for run in arm_runs if "refused" in run],
            **{metric: mean_ci(run["metrics"].get(metric) for run in trained) for metric, _, _ in METRICS},
        }
        kinds = [run.get("kept_gradient_by_kind") for run in trained if run.get("kept_gradient_by_kind")]
        if kinds:
            summary[key]["kept_gradient_by_kind"] = {
                kind: statistics.fmean(k[kind] for k in kinds) for kind in kinds[0]
            }
    return summary


def shares(runs: list[dict], arm: str, reference: str = "grpo") -> dict:
    """`arm`'s share of `reference`'s safety gain and KL drift: ratio of the means, and per seed (paired)."""
    by_seed = {
        key: {run["seed"]: run["metrics"] for run in runs if run["arm"] == key and "refused" not in run}
        for key in (arm, reference)
    }
    seeds = sorted(set(by_seed[arm]) & set(by_seed[reference]))
    if not seeds:
        return {}

    def ratio(metric: str, seed_list: list[int]) -> float | None:
        denominator = statistics.fmean(by_seed[reference][s][metric] for s in seed_list)
        numerator = statistics.fmean(by_seed[arm][s][metric] for s in seed_list)
        return numerator / denominator if denominator > 0 else None

    return {
        "seeds": seeds,
        "safety_gain_share": ratio("safety_gain", seeds),
        "general_kl_share": ratio("general_kl", seeds),
        "safety_gain_share_per_seed": {s: ratio("safety_gain", [s]) for s in seeds},
    }


def format_cell(stats: dict, spec: str) -> str:
    if stats["mean"] is None:
        return "n/a"
    if stats["ci95"] is None:
        return f"{stats['mean']:{spec}}"
    return f"{stats['mean']:{spec}} ± {stats['ci95']:{spec}}"


def print_table(base: dict, summary: dict, keys: list[str]) -> str:
    width = 22
    lines = [f"{'(mean ± 95% CI over seeds)':44}{'base':>{width}}" + "".join(f"{k:>{width}}" for k in keys)]
    for metric, label, spec in METRICS:
        base_value = base["metrics"].get(metric, 0.0 if metric == "safety_gain" else None)
        base_cell = "" if base_value is None else f"{base_value:{spec}}"
        cells = "".join(f"{format_cell(summary[k][metric], spec):>{width}}" for k in keys)
        lines.append(f"{label:44}{base_cell:>{width}}{cells}")
    lines.append(f"{'seeds':44}{'':>{width}}" + "".join(f"{str(summary[k]['seeds']):>{width}}" for k in keys))
    text = "\n".join(lines)
    print(text)
    return text


# The front table's columns: these `METRICS` rows, under short headers.
FRONT_HEADERS = {
    "safety_gain": "safety gain",
    "over_refusal_rate_benign": "over-refusal",
    "general_kl": "KL to base",
    "greedy_agreement": "greedy unchanged",
    "general_accuracy": "checkable right",
    "kept_gradient_fraction": "kept gradient",
}
FRONT_COLUMNS = tuple((key, FRONT_HEADERS[key], spec) for key, _, spec in METRICS if key in FRONT_HEADERS)


def front_markdown(runs: list[dict], base: dict, seed: int = 0) -> str:
    """
    One markdown row per setting, from its run with `seed` (the front's settings are trained on one seed, so every row
    compares runs that saw the same prompts), sorted by drift; a refused setting says why.
    """
    summary = summarise([run for run in runs if run["seed"] == seed])
    header = "| setting | " + " | ".join(label for _, label, _ in FRONT_COLUMNS) + " |"
    lines = [header, "|---|" + "---|" * len(FRONT_COLUMNS)]
    # The base model has no kept-gradient fraction, and its safety gain over itself is 0.
    base_cells = [
        "" if metric == "kept_gradient_fraction" else f"{base['metrics'].get(metric, 0.0):{spec}}"
        for metric, _, spec in FRONT_COLUMNS
    ]
    lines.append("| base model | " + " | ".join(base_cells) + " |")

    def drift(key: str) -> float:
        mean = summary[key]["general_kl"]["mean"]
        return float("inf") if mean is None else mean

    for key in sorted(summary, key=drift):
        row = summary[key]
        if not row["seeds"]:
            reason = row["refused"][0].split(":")[0] if row["refused"] else "no run"
            lines.append(f"| {row['label']} | refused: {reason} |" + " |" * (len(FRONT_COLUMNS) - 1))
            continue
        cells = [
            "n/a" if row[metric]["mean"] is None else f"{row[metric]['mean']:{spec}}"
            for metric, _, spec in FRONT_COLUMNS
        ]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_markdown(runs: list[dict], keys: list[str]) -> str:
    """Safety gain / over-refusal / KL of every run of `keys`, one row per seed: the spread the means hide."""
    seeds = sorted({run["seed"] for run in runs if run["arm"] in keys})
    by_arm_seed = {(run["arm"], run["seed"]): run["metrics"] for run in runs if "metrics" in run}
    lines = ["| seed | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for seed in seeds:
        cells = []
        for key in keys:
            metrics = by_arm_seed.get((key, seed))
            cells.append(
                ""
                if metrics is None
                else f"{metrics['safety_gain']:+.3f} / {metrics['over_refusal_rate_benign']:.3f} / "
                f"{metrics['general_kl']:.1e}"
            )
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Front plots' markers: GRPO squares, the gradient-only ablation diamonds, NSPO circles.
METHOD_MARKERS = {"grpo": "s", "grad_only": "D", "nspo": "o"}


def label_front_axis(axis: Any, held_out: str, title: str) -> None:
    """Labels a front plot's axis: safety gain (Δ refusal on harmful prompts) over general drift (KL, log scale)."""
    axis.set_xscale("log")
    axis.set_xlabel(f"general drift: next-token KL to base on {held_out} general prompts (log)")
    axis.set_ylabel(f"safety gain: Δ refusal rate on {held_out} harmful prompts")
    axis.axhline(0.0, color="lightgrey", linewidth=0.8)
    axis.legend(fontsize=7, loc="upper left")
    axis.set_title(title, fontsize=9)


def plot_front(summary: dict, runs: list[dict], base: dict, path: Path) -> Path | None:
    """Safety gain against general drift (next-token KL), one marker per setting (mean over seeds) with its seeds' runs
    as small dots; GRPO (squares) and grad-only (diamonds) as references."""
    plt = pyplot()
    if plt is None:
        return None
    figure, axis = plt.subplots(figsize=(9, 6))
    for index, (key, row) in enumerate(summary.items()):
        if row["general_kl"]["mean"] is None:
            continue
        method = Arm(**next(run["arm_settings"] for run in runs if run["arm"] == key)).method
        marker = METHOD_MARKERS[method]
        color = {"grpo": "black", "grad_only": "grey"}.get(method, f"C{index % 10}")
        seeds = [run["metrics"] for run in runs if run["arm"] == key and "metrics" in run]
        axis.scatter(
            [max(m["general_kl"], 1e-7) for m in seeds],
            [m["safety_gain"] for m in seeds],
            s=12,
            marker=marker,
            color=color,
            alpha=0.35,
        )
        axis.scatter(
            max(row["general_kl"]["mean"], 1e-7),
            row["safety_gain"]["mean"],
            s=70,
            marker=marker,
            color=color,
            edgecolors="white",
            label=f"{row['label']} (n={row['safety_gain']['n']})",
        )
    label_front_axis(
        axis,
        "held-out",
        f"SmolLM2-135M-Instruct, LoRA r=8 on all linear layers, 16 steps; base refusal "
        f"{base['metrics']['refusal_rate_harmful']:.3f}\nlarge markers: mean over seeds; small: single runs",
    )
    axis.set_ylim(-0.15, 1.05)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def report_fronts(arguments: SafetyGainArguments, base: dict, runs: list[dict]) -> dict:
    """The protocol's report: every point with its interval, the matched-point comparison, the plot."""
    from safety_front import matched_comparison, matched_markdown, plot_fronts, points_markdown, summarise_points

    summary = summarise_points(runs)
    table = points_markdown(summary)
    comparison = matched_comparison(runs)
    matched = matched_markdown(comparison)
    print(f"\nEvery point (mean ± 95% CI over seeds; markdown)\n{table}\n\n{matched}")
    name = "safety_front_quick" if arguments.quick else "safety_front"
    plot = plot_fronts(summary, runs, base, results_path(name, False).with_suffix(".png"))
    result = {
        "settings": arguments.settings(),
        "environment": environment(),
        "base": base["metrics"],
        "points": [{"arm": key, "alpha": alpha, **row} for (key, alpha), row in summary.items()],
        "matched": comparison,
        "table": table,
        "matched_table": matched,
        "plot": str(plot) if plot else None,
    }
    write_results(results_path(name, False), result)
    return result


def report(arguments: SafetyGainArguments, base: dict) -> dict:
    runs = read_runs(Path(arguments.runs_file), arguments.settings())
    if arguments.protocol:
        return report_fronts(arguments, base, runs)
    summary = summarise(runs)
    main_keys = [arm.key for arm in MAIN_ARMS if arm.key in summary]
    print("\nMain comparison")
    table = print_table(base, summary, main_keys)
    print("\nFront, seed 0 (one row per setting; markdown)")
    front_table = front_markdown(runs, base)
    print(front_table)
    print("\nPer seed: safety gain / over-refusal / KL to base (markdown)")
    seed_table = per_seed_markdown(runs, main_keys)
    print(seed_table)
    result = {
        "settings": arguments.settings(),
        "environment": environment(),
        "base": base["metrics"],
        "summary": summary,
        "shares": {key: shares(runs, key) for key in summary if key != "grpo"},
        "table": table,
        "front_table": front_table,
        "per_seed_table": seed_table,
    }
    for key, share in result["shares"].items():
        if share.get("safety_gain_share") is not None:
            print(
                f"{key}: {share['safety_gain_share']:.0%} of GRPO's safety gain, "
                f"{share['general_kl_share']:.2%} of its KL drift (seeds {share['seeds']})"
            )
    name = "safety_gain_quick" if arguments.quick else "safety_gain"
    plot = plot_front(summary, runs, base, results_path(name, False).with_suffix(".png"))
    result["plot"] = str(plot) if plot else None
    write_results(results_path(name, False), result)
    return result


def main(arguments: SafetyGainArguments) -> None:
    model_path = model_dir(None)
    base = base_evaluation(arguments, model_path)
    if not arguments.report:
        runs_file = Path(arguments.runs_file)
        done = {(run["arm"], run["seed"]) for run in read_runs(runs_file, arguments.settings())}
        for seed in arguments.seeds:
            for key in arguments.arms:
                if (key, seed) in done:
                    continue
                print(f"== {ARMS[key].label}, seed {seed}", flush=True)
                record = train_and_evaluate(arguments, ARMS[key], seed, model_path, base)
                record["environment"] = environment()
                runs_file.parent.mkdir(parents=True, exist_ok=True)
                with runs_file.open("a") as handle:
                    handle.write(json.dumps(record, default=str) + "\n")
                print(json.dumps(record.get("metrics") or record.get("refused")), flush=True)
    report(arguments, base)


if __name__ == "__main__":
    main(parse_arguments(SafetyGainArguments, lambda arguments: QUICK_SETTINGS))
