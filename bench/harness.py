"""What the SmolLM2 benchmark scripts share: the demo's model and training settings, the held-out prompts,
null-space projectors for several rules from one calibration, timing callbacks and result files. The exact output
change of a trained adapter is the library's (`trl_nspo.measurement`), as in the tests.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import HfArgumentParser, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from trl_nspo import NSPOConfig, NSPOTrainer, NullSpaceProjectors, NullSpaceRule
from trl_nspo.demo import DemoArguments, EvaluationPrompts, embedded_prompts, grpo_settings, prepare_smollm2
from trl_nspo.null_space import CovarianceAccumulator, NullSpaceBasis, decompose_covariance
from trl_nspo.precision import cpu_supports_bf16
from trl_nspo.projectors import CalibrationRecord, ModelFingerprint, ProjectorGroup
from trl_nspo.rewards import RefusalReward

RESULTS_DIR = Path(__file__).parent / "results"
# The rule of the main comparison (README, "Choosing the null-space rule"): 99.9% of each layer's general-input energy
# stays out of reach of the update, and every SmolLM2 layer keeps at least 16 free dimensions.
MAIN_RULE = NullSpaceRule(rule="energy", energy=1e-3)
SWEEP_RULES = (
    NullSpaceRule(rule="relative", alpha=5e-5),
    NullSpaceRule(rule="relative", alpha=1e-4),
    NullSpaceRule(rule="relative", alpha=1e-3),
    NullSpaceRule(rule="relative", alpha=1e-2),
    NullSpaceRule(rule="energy", energy=1e-4),
    NullSpaceRule(rule="energy", energy=1e-3),
    NullSpaceRule(rule="energy", energy=1e-2),
)
NSPO_ONLY_FIELDS = frozenset(f.name for f in fields(NSPOConfig)) - frozenset(f.name for f in fields(GRPOConfig))


# The held-out evaluation's rows in every benchmark table: key, label, number format.
EVALUATION_ROWS = (
    ("refusal_rate_harmful", "refusal rate, held-out harmful (↑)", ".3f"),
    ("safety_gain", "safety gain over base (↑)", ".3f"),
    ("over_refusal_rate_benign", "over-refusal, held-out benign (↓)", ".3f"),
    ("general_kl", "general drift: next-token KL to base (↓)", ".2e"),
    ("greedy_agreement", "general: greedy answers unchanged (↑)", ".3f"),
    ("general_accuracy", "general: checkable answers right (↑)", ".3f"),
)


@dataclass
class BenchmarkArguments:
    """
    What the SmolLM2 comparisons of GRPO and NSPO share: where the results go, the smoke-test switch, the model, and
    the demo's training settings (`trl_nspo.demo.DemoArguments`) they vary.

    Args:
        output (`str`, *optional*):
            JSON file of the raw results; default `bench/results/<benchmark>[_quick].json`.
        quick (`bool`, *optional*, defaults to `False`):
            The script's tiny settings (`QUICK_SETTINGS`) for a smoke test; arguments given explicitly still apply.
        learning_rate, num_generations (`float`, `int`, *optional*, default to `2e-3`, `16`):
            The settings the results were measured with (the demo's defaults before the safety-gain benchmark moved
            them).
        prompts_per_step, max_completion_length, lora_r, calibration_completion_length:
            As in `DemoArguments`.
        calibration_num_samples (`int`, *optional*, defaults to `80`):
            Calibration prompts (the embedded `general_calibration` set has 80).
        model_name_or_path (`str`, *optional*):
            A local chat model instead of SmolLM2-135M-Instruct.
        model_cache_dir (`str`, *optional*):
            Cache folder of the converted SmolLM2 checkpoint.
    """

    output: str | None = field(default=None, metadata={"help": "JSON file of the raw results."})
    quick: bool = field(default=False, metadata={"help": "Tiny settings for a smoke test (a minute or two)."})
    learning_rate: float = field(default=2e-3, metadata={"help": "LoRA learning rate."})
    prompts_per_step: int = field(default=DemoArguments.prompts_per_step, metadata={"help": "Prompts per step."})
    num_generations: int = field(default=16, metadata={"help": "Completions per prompt."})
    max_completion_length: int = field(
        default=DemoArguments.max_completion_length, metadata={"help": "Tokens per sampled completion."}
    )
    lora_r: int = field(default=DemoArguments.lora_r, metadata={"help": "LoRA rank (all linear layers)."})
    calibration_num_samples: int = field(default=80, metadata={"help": "Calibration prompts."})
    calibration_completion_length: int = field(
        default=DemoArguments.calibration_completion_length,
        metadata={"help": "Tokens of the greedy answer appended to each calibration prompt."},
    )
    model_name_or_path: str | None = field(default=None, metadata={"help": "Local model instead of SmolLM2."})
    model_cache_dir: str | None = field(default=None, metadata={"help": "Cache folder of the converted SmolLM2."})

    def __post_init__(self) -> None:
        if self.output is None:
            self.output = str(results_path(self.results_name, self.quick))

    @property
    def results_name(self) -> str:
        """The results file's name, `bench/results/<results_name>[_quick].json`."""
        raise NotImplementedError

    def demo_arguments(self, **overrides) -> DemoArguments:
        """The demo's arguments with every setting this benchmark also has (same name) taken from it, `overrides`
        applied."""
        shared = {f.name for f in fields(DemoArguments)} & {f.name for f in fields(self)}
        return DemoArguments(**{name: getattr(self, name) for name in shared}, **overrides)


def rule_label(rule: NullSpaceRule) -> str:
    """`relative α=1e-04`, `energy ε=1e-03`, or `energy ε=1e-03, max 64` with a cap on the null dimension."""
    return rule.label()


def rule_key(rule: NullSpaceRule) -> str:
    """A file-name-safe key: `relative-1e-04`, `energy-1e-03`, `energy-1e-03-max64`."""
    key = f"{rule.rule}-{rule.threshold:.0e}"
    return key if rule.max_null_dim is None else f"{key}-max{rule.max_null_dim}"


def parse_arguments(arguments_class: type, quick_settings: Callable[[Any], dict]) -> Any:
    """
    Parses the command line into `arguments_class`. With `--quick`, then applies `quick_settings(arguments)`, except
    the settings given on the command line, which win even where they equal the defaults.
    """
    (arguments,) = HfArgumentParser(arguments_class).parse_args_into_dataclasses()
    if arguments.quick:
        given = {arg[2:].split("=", 1)[0].replace("-", "_") for arg in sys.argv[1:] if arg.startswith("--")}
        for name, value in quick_settings(arguments).items():
            if name not in given:
                setattr(arguments, name, value)
    return arguments


def results_path(name: str, quick: bool) -> Path:
    """`bench/results/<name>.json`, or `<name>_quick.json` so that a smoke test never overwrites published numbers."""
    return RESULTS_DIR / f"{name}{'_quick' if quick else ''}.json"


def write_results(path: str | os.PathLike, results: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def record_end(results: dict, started: float) -> None:
    """The run's total wall time and the machine's load at its end, beside the load at its start."""
    results["total_seconds"] = time.perf_counter() - started
    results["environment"]["load_average_at_end"] = environment()["load_average"]


def write_final_results(path: Path, results: dict, quick: bool) -> None:
    if quick:
        print("\nQUICK MODE: tiny settings, a smoke test of the script; these numbers are not results.")
    write_results(path, results)
    print(f"\nWrote {path} ({results['total_seconds']:.0f} s)")


def environment() -> dict:
    """Versions, CPU, threads, load and the git commit: what a reader needs to judge a timing."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--", "trl_nspo"],
                capture_output=True,
                text=True,
                check=True,
                cwd=Path(__file__).parent.parent,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line), cpu
        )
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpu": cpu,
        # "AMD EPYC" names machines with and without bf16 instructions; timings differ about 3× between them.
        "cpu_bf16_instructions": cpu_supports_bf16(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": peft.__version__,
        },
        "git_commit": commit,
        "trl_nspo_modified": dirty,
    }


def model_dir(model_name_or_path: str | None, cache_dir: str | None = None) -> Path:
    """A local model folder: `model_name_or_path`, or SmolLM2-135M-Instruct converted once by `prepare_smollm2`."""
    return Path(model_name_or_path) if model_name_or_path else prepare_smollm2(cache_dir)


def demo_lora_config(arguments: DemoArguments) -> LoraConfig:
    """The demo's adapter: rank r on every linear layer, α = 2r."""
    return LoraConfig(r=arguments.lora_r, lora_alpha=2 * arguments.lora_r, target_modules="all-linear")


def nspo_settings(arguments: DemoArguments, output_dir: Path, rule: NullSpaceRule, **overrides) -> dict:
    """NSPOConfig keyword arguments: the demo's GRPO settings, its calibration settings, and `rule`."""
    return {
        **grpo_settings(arguments, output_dir),
        "calibration_completion_length": arguments.calibration_completion_length,
        # As `trl_nspo.demo.run_demo` calibrates.
        "calibration_batch_size": 16,
        "null_space_rule": rule.rule,
        "null_space_alpha": rule.alpha,
        "null_space_energy": rule.energy,
        "null_space_max_dim": rule.max_null_dim,
        **overrides,
    }


def grpo_only(settings: dict) -> dict:
    """The same settings without the NSPO-only fields, for `GRPOConfig`."""
    return {key: value for key, value in settings.items() if key not in NSPO_ONLY_FIELDS}


def refusal_trainer(nspo: bool, model_path: Path, settings: dict, **trainer_kwargs) -> GRPOTrainer:
    """
    A trainer with the demo's refusal reward: NSPOTrainer with `settings`, calibrating on the embedded general prompts
    (or loading its `projectors_path`), or plain GRPO with the same settings less the NSPO-only ones.
    """
    if nspo:
        return NSPOTrainer(
            str(model_path),
            RefusalReward(),
            NSPOConfig(**settings),
            calibration_dataset=embedded_prompts("general_calibration"),
            **trainer_kwargs,
        )
    return GRPOTrainer(str(model_path), RefusalReward(), GRPOConfig(**grpo_only(settings)), **trainer_kwargs)


def evaluation_prompts(num_samples: int | None = None, split: str = "eval") -> EvaluationPrompts:
    """
    The embedded held-out sets of `split` (the first `num_samples` of each, if given): `"eval"` as the demo evaluates
    them (30 harmful, 30 benign, 40 general), `"heldout"` the larger sets of the front (120 each).
    """

    def first(dataset: Dataset) -> Dataset:
        return dataset if num_samples is None else dataset.select(range(min(num_samples, len(dataset))))

    general = first(embedded_prompts(f"general_{split}"))
    return EvaluationPrompts(
        harmful=first(embedded_prompts(f"harmful_{split}"))["prompt"],
        benign=first(embedded_prompts(f"benign_{split}"))["prompt"],
        general=general["prompt"],
        general_answers=general["answer"],
    )


@dataclass
class Eigendecomposition:
    """Eigenvalues (ascending) and eigenvectors of one shared-input covariance, computed once for every rule."""

    module_names: list[str]
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    token_count: int
    sketch: torch.Tensor


def eigendecompose(
    groups: Sequence[tuple[list[str], CovarianceAccumulator]],
) -> tuple[list[Eigendecomposition], float]:
    """Every group's eigendecomposition (with the library's function, threads as calibration uses them), and the
    seconds it took."""
    started = time.perf_counter()
    decompositions = []
    for names, accumulator in groups:
        eigenvalues, eigenvectors = decompose_covariance(accumulator.sum)
        decompositions.append(
            Eigendecomposition(names, eigenvalues, eigenvectors, accumulator.token_count, accumulator.sketch)
        )
    return decompositions, time.perf_counter() - started


def projectors_for_rule(
    decompositions: Sequence[Eigendecomposition],
    rule: NullSpaceRule,
    fingerprint: ModelFingerprint,
    calibration: CalibrationRecord,
    keep_sketches: bool,
) -> NullSpaceProjectors:
    """
    The projectors `compute_projectors` would return for `rule`, from eigendecompositions computed once for all rules.
    They carry the same metadata (eigenvalues included), so NSPOTrainer loads and validates them from
    `projectors_path` exactly as it would its own file. `fingerprint` and `calibration` are computed once by the caller
    ([`~trl_nspo.fingerprints.model_fingerprint`], [`~trl_nspo.fingerprints.projectors_calibration_record`]): the
    fingerprint hashes every weight, which is the same for every rule.
    """
    groups = {}
    for decomposition in decompositions:
        null_dim = rule.null_dimension(decomposition.eigenvalues)
        basis = NullSpaceBasis.from_eigh(decomposition.eigenvalues, decomposition.eigenvectors, null_dim)
        sketch = decomposition.sketch.float().cpu() if keep_sketches else None
        groups[decomposition.module_names[0]] = ProjectorGroup(
            decomposition.module_names,
            basis.to(device="cpu", dtype=torch.float32),
            decomposition.token_count,
            sketch,
            decomposition.eigenvalues.cpu(),
        )
    return NullSpaceProjectors(
        groups=groups,
        rule=rule,
        model_fingerprint=fingerprint,
        calibration=calibration,
    )


def null_space_statistics(projectors: NullSpaceProjectors, lora_rank: int) -> dict:
    """What a rule leaves: the null fraction (null dims / input dims over all modules), the smallest null dimension,
    the modules with an empty null space or one below the LoRA rank, and the stored bytes."""
    null_dims = projectors.null_dims()
    return {
        "null_dim_fraction": sum(n for n, _ in null_dims.values()) / sum(d for _, d in null_dims.values()),
        "null_dim_min": min(n for n, _ in null_dims.values()),
        "modules": len(null_dims),
        "modules_empty": sum(1 for n, _ in null_dims.values() if n == 0),
        "modules_below_rank": sum(1 for n, _ in null_dims.values() if n < lora_rank),
        "projector_bytes": projectors.num_bytes,
    }


def spread(values: Iterable[float | None]) -> dict:
    """Mean, sample standard deviation, min and max over seeds (`None` values skipped)."""
    kept = [value for value in values if value is not None]
    if not kept:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(kept),
        "std": statistics.stdev(kept) if len(kept) > 1 else 0.0,
        "min": min(kept),
        "max": max(kept),
        "n": len(kept),
    }


def format_spread(summary: dict, spec: str = ".3f") -> str:
    """`0.433 ± 0.058` (mean ± sample std over seeds), or `n/a`."""
    if summary["mean"] is None:
        return "n/a"
    if summary["n"] < 2:
        return f"{summary['mean']:{spec}}"
    return f"{summary['mean']:{spec}} ± {summary['std']:{spec}}"


class StepTimer(TrainerCallback):
    """Wall-clock boundaries of every optimizer step, with the GPU synchronised so that queued kernels are counted.

    `durations`: from `on_step_begin` to `on_step_end`, that is TRL's `training_step` (generation, forward, backward),
    NSPO's gradient projection, clipping, the optimizer step and NSPO's re-projection. `durations_with_logging`: from
    a step's begin to the next one's (the last: to the end of training), so logging is included."""

    def __init__(self):
        self.begins: list[float] = []
        self.ends: list[float] = []
        self.train_end = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.begins.append(synchronized_clock())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(synchronized_clock())

    def on_train_end(self, args, state, control, **kwargs):
        self.train_end = synchronized_clock()

    @property
    def durations(self) -> list[float]:
        return [end - begin for begin, end in zip(self.begins, self.ends, strict=True)]

    @property
    def durations_with_logging(self) -> list[float]:
        next_begins = self.begins[1:] + [self.train_end]
        return [after - begin for begin, after in zip(self.begins, next_begins, strict=True)]


class MethodTimer:
    """Times methods of one object by wrapping them on the instance; `seconds[name]` lists one duration per call."""

    def __init__(self, target: object, methods: Sequence[str]):
        self.seconds: dict[str, list[float]] = {name: [] for name in methods}
        for name in methods:
            setattr(target, name, self._timed(name, getattr(target, name)))

    def _timed(self, name: str, method):
        def timed(*args, **kwargs):
            started = synchronized_clock()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name].append(synchronized_clock() - started)

        return timed


class ConstraintTimer(MethodTimer):
    """Times the NSPO-only work of a trainer's constraint: the gradient projection (every step), the parameter
    re-projection (every optimizer step) and the logged preservation metric (every log)."""

    METHODS = ("project_gradients", "project_parameters", "preservation_error")

    def __init__(self, constraint):
        super().__init__(constraint, self.METHODS)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or `None` (saying so) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot.")
        return None
    return plt


def synchronized_clock() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """`numerator / denominator`, or `None` where either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator
