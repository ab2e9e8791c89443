"""What makes a CPU training step affordable: the demo's step in float32 and under bf16 autocast, with its old and new
group size, and where the time goes.

One NSPOTrainer run per setting, all in one process on one calibration (shared projector file), SmolLM2-135M-Instruct,
LoRA r=8 on all linear layers, 1 prompt per step, completions of ≤ 24 tokens, the graded refusal reward. Each run
takes `warmup_steps` untimed steps, then `steps` timed ones. Per step it records the wall time (`StepTimer`) and its
parts, by wrapping the trainer's methods on the instance:

- generation: TRL's `_generate_single_turn` (sampling the completions);
- reward: `_calculate_rewards`;
- log-prob forward: `_get_per_token_logps_and_entropies` (the policy forward of the loss);
- NSPO projections: the gradient projection and the post-step re-projection;
- the rest: backward, optimizer step, tokenization and bookkeeping.

Settings: `old_demo` (float32, 16 completions: the demo before the safety-gain benchmark), `fp32` (8 completions),
`bf16_16` (bf16 autocast, 16 completions), `bf16` (bf16 autocast, 8 completions: the demo now), and `bf16_generation`
(as `bf16`, with generation also under bf16 autocast: accelerate's autocast wraps the model's `forward`, which
`generate` does not call, so without it sampling runs in float32). Ratios are to `old_demo`, from the same run.

    OMP_NUM_THREADS=2 python bench/cpu_speed.py          # about 10 minutes on 2 idle cores
    python bench/cpu_speed.py --quick                    # smoke test
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from harness import (
    ConstraintTimer,
    MethodTimer,
    StepTimer,
    environment,
    model_dir,
    parse_arguments,
    results_path,
    write_results,
)
from peft import LoraConfig
from transformers import AutoTokenizer, set_seed

from trl_nspo import NSPOConfig, NSPOTrainer
from trl_nspo.demo import demo_safety_dataset, embedded_prompts
from trl_nspo.precision import cpu_supports_bf16
from trl_nspo.rewards import RefusalReward

PARTS = {
    "generation": "_generate_single_turn",
    "reward": "_calculate_rewards",
    "logprob_forward": "_get_per_token_logps_and_entropies",
}


@dataclass(frozen=True)
class Setting:
    key: str
    bf16: bool
    num_generations: int
    autocast_generation: bool = False


SETTINGS = (
    Setting("old_demo", bf16=False, num_generations=16),
    Setting("fp32", bf16=False, num_generations=8),
    Setting("bf16_16", bf16=True, num_generations=16),
    Setting("bf16", bf16=True, num_generations=8),
    Setting("bf16_generation", bf16=True, num_generations=8, autocast_generation=True),
)


@dataclass
class CpuSpeedArguments:
    """
    Arguments of `bench/cpu_speed.py`.

    Args:
        steps (`int`, *optional*, defaults to `3`):
            Timed optimizer steps per setting.
        warmup_steps (`int`, *optional*, defaults to `1`):
            Untimed steps before them.
        max_completion_length (`int`, *optional*, defaults to `24`):
            Tokens per sampled completion.
        settings (`list[str]`, *optional*):
            Setting keys to run (default: all).
        output (`str`, *optional*):
            Results file; default `bench/results/cpu_speed[_quick].json`.
        quick (`bool`, *optional*, defaults to `False`):
            Tiny settings for a smoke test.
    """

    steps: int = field(default=3, metadata={"help": "Timed optimizer steps per setting."})
    warmup_steps: int = field(default=1, metadata={"help": "Untimed steps before them."})
    max_completion_length: int = field(default=24, metadata={"help": "Tokens per sampled completion."})
    settings: list[str] | None = field(default=None, metadata={"help": "Setting keys to run (default: all)."})
    output: str | None = field(default=None, metadata={"help": "Results file."})
    quick: bool = field(default=False, metadata={"help": "Tiny settings for a smoke test."})

    def __post_init__(self) -> None:
        if self.output is None:
            self.output = str(results_path("cpu_speed", self.quick))
        if self.settings is None:
            self.settings = [setting.key for setting in SETTINGS]


def generation_under_autocast(trainer: NSPOTrainer) -> None:
    """Runs the trainer's sampling under bf16 autocast (on the instance), as its training forward passes are."""
    generate = trainer._generate_single_turn

    def autocast_generate(*args, **kwargs):
        with torch.autocast(trainer.accelerator.device.type, dtype=torch.bfloat16):
            return generate(*args, **kwargs)

    trainer._generate_single_turn = autocast_generate


def run_setting(arguments: CpuSpeedArguments, setting: Setting, model_path: Path, work_dir: Path) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    config = NSPOConfig(
        output_dir=str(work_dir / setting.key),
        use_cpu=not torch.cuda.is_available(),
        bf16=setting.bf16,
        model_init_kwargs={"dtype": torch.float32},
        gradient_checkpointing=False,
        per_device_train_batch_size=setting.num_generations,
        num_generations=setting.num_generations,
        max_completion_length=arguments.max_completion_length,
        max_steps=arguments.warmup_steps + arguments.steps,
        learning_rate=2e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        beta=0.0,
        disable_tqdm=True,
        calibration_num_samples=80,
        calibration_completion_length=16,
        calibration_batch_size=16,
        projectors_path=str(work_dir / "projectors"),
    )
    set_seed(0)
    trainer = NSPOTrainer(
        str(model_path),
        RefusalReward(),
        config,
        train_dataset=demo_safety_dataset("train"),
        calibration_dataset=embedded_prompts("general_calibration"),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        processing_class=tokenizer,
    )
    if setting.autocast_generation:
        generation_under_autocast(trainer)
    step_timer = StepTimer()
    trainer.add_callback(step_timer)
    parts = MethodTimer(trainer, list(PARTS.values()))
    projections = ConstraintTimer(trainer.constraint)
    trainer.train()
    warmup = arguments.warmup_steps

    def per_step(durations: list[float]) -> list[float]:
        # Calls per step vary (one generation per step, one log-prob forward per micro-batch): sum them per step by
        # splitting the calls evenly over the steps.
        calls_per_step = len(durations) // (warmup + arguments.steps)
        return [
            sum(durations[step * calls_per_step : (step + 1) * calls_per_step])
            for step in range(warmup, warmup + arguments.steps)
        ]

    record = {"setting": setting.key, "step": step_timer.durations[warmup:]}
    for part, method in PARTS.items():
        record[part] = per_step(parts.seconds[method])
    record["nspo_projections"] = [
        gradient + parameters
        for gradient, parameters in zip(
            projections.seconds["project_gradients"][warmup:],
            projections.seconds["project_parameters"][warmup:],
            strict=True,
        )
    ]
    record["rest"] = [
        step - sum(record[part][index] for part in (*PARTS, "nspo_projections"))
        for index, step in enumerate(record["step"])
    ]
    del trainer
    gc.collect()
    return record


def summarise(records: list[dict]) -> dict:
    medians = {
        record["setting"]: {
            part: statistics.median(values) for part, values in record.items() if isinstance(values, list) and values
        }
        for record in records
    }
    reference = medians.get("old_demo", {}).get("step")
    for parts in medians.values():
        parts["speedup_vs_old_demo"] = reference / parts["step"] if reference else None
    return medians


def print_table(summary: dict) -> None:
    columns = ["step", *PARTS, "nspo_projections", "rest", "speedup_vs_old_demo"]
    print(f"{'setting (median s per step)':28}" + "".join(f"{c:>21}" for c in columns))
    for key, parts in summary.items():
        cells = "".join(f"{parts[c]:>18.2f}" if c != "speedup_vs_old_demo" else f"{parts[c]:>17.2f}×" for c in columns)
        print(f"{key:28}{cells}")


def main(arguments: CpuSpeedArguments) -> dict:
    model_path = model_dir(None)
    records = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for setting in SETTINGS:
            if setting.key not in arguments.settings:
                continue
            if setting.bf16 and not (torch.cuda.is_available() or cpu_supports_bf16()):
                print(f"skipping {setting.key}: this CPU has no bf16 instructions")
                continue
            print(f"== {setting.key}", flush=True)
            records.append(run_setting(arguments, setting, model_path, Path(work)))
    summary = summarise(records)
    print_table(summary)
    results = {
        "arguments": vars(arguments),
        "environment": environment(),
        "wall_seconds": time.perf_counter() - started,
        "runs": records,
        "summary": summary,
    }
    write_results(arguments.output, results)
    return results


if __name__ == "__main__":
    main(parse_arguments(CpuSpeedArguments, lambda arguments: {"steps": 1, "max_completion_length": 8}))
