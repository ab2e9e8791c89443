"""The safety-versus-drift front of trained adapters: every adapter evaluated, scaled back toward its base model by
factors α (ΔW·α, weight interpolation), on held-out prompts. `trl-nspo front` runs it on any model, adapters and
prompts, so that NSPO and its alternatives (GRPO at other learning rates, with a KL penalty, scaled back) can be
compared on a user's own data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..targets import lora_scaled
from .evaluation import EvaluationPrompts, base_model_context, evaluate, greedy_answers
from .prompts import embedded_prompts

FRONT_METRICS = ("safety_gain", "over_refusal_rate_benign", "general_kl", "greedy_agreement", "general_accuracy")


@dataclass
class FrontArguments:
    """
    Arguments of `trl-nspo front`.

    Args:
        model_name_or_path (`str`):
            The base model (a local folder or Hub id) the adapters were trained on.
        adapters (`list[str]`):
            PEFT adapter folders (LoRA) to evaluate.
        alphas (`list[float]`, *optional*, defaults to `[0.25, 0.5, 0.75, 1.0]`):
            Factors each adapter's update is scaled by.
        harmful_prompts, benign_prompts, general_prompts (`str`, *optional*):
            JSON-lines, CSV or Parquet files (or Hub datasets) with a `prompt` column (text or chat messages);
            `general_prompts` may have an `answer` column (the expected short answer, or null). Default: the embedded
            held-out sets (`harmful_heldout`, `benign_heldout`, `general_heldout`, 120 prompts each, never trained
            or calibrated on in this project).
        num_samples (`int`, *optional*):
            Use the first `num_samples` prompts of each set.
        max_new_tokens (`int`, *optional*, defaults to `32`):
            Tokens of each greedy answer.
        output (`str`, *optional*, defaults to `"front.json"`):
            JSON file of every point.
        plot (`str`, *optional*):
            PNG of safety gain against general KL, one line per adapter (needs matplotlib).
    """

    model_name_or_path: str = field(metadata={"help": "Base model: local folder or Hub id."})
    adapters: list[str] = field(metadata={"help": "PEFT (LoRA) adapter folders to evaluate."})
    alphas: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 0.75, 1.0], metadata={"help": "Factors each adapter update is scaled by."}
    )
    harmful_prompts: str | None = field(default=None, metadata={"help": "Harmful prompts (default: embedded)."})
    benign_prompts: str | None = field(default=None, metadata={"help": "Benign but risky-sounding prompts."})
    general_prompts: str | None = field(default=None, metadata={"help": "General prompts, optional `answer` column."})
    num_samples: int | None = field(default=None, metadata={"help": "First prompts of each set to use."})
    max_new_tokens: int = field(default=32, metadata={"help": "Tokens of each greedy answer."})
    output: str = field(default="front.json", metadata={"help": "JSON file of every point."})
    plot: str | None = field(default=None, metadata={"help": "PNG of the front (needs matplotlib)."})

    def __post_init__(self) -> None:
        if not self.adapters:
            raise ValueError("`--adapters` names no adapter folder; pass one or more trained LoRA adapters.")
        if any(not 0.0 < alpha <= 1.0 for alpha in self.alphas):
            raise ValueError(f"Every α must be in (0, 1] (the base model is always evaluated); got {self.alphas}.")


def _prompt_set(source: str | None, embedded: str, num_samples: int | None) -> Dataset:
    if source is None:
        dataset = embedded_prompts(embedded)
    else:
        path = Path(source)
        builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
        if builder is None:
            dataset = load_dataset(source, split="train")
        else:
            dataset = load_dataset(builder, data_files=str(path), split="train")
        if "prompt" not in dataset.column_names:
            raise ValueError(f"{source} has columns {dataset.column_names}; the front needs a `prompt` column.")
    if num_samples is not None:
        dataset = dataset.select(range(min(num_samples, len(dataset))))
    return dataset


def _conversations(dataset: Dataset) -> list:
    return [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in dataset["prompt"]]


def front_prompts(arguments: FrontArguments) -> EvaluationPrompts:
    """The three held-out prompt sets of the front, as [`EvaluationPrompts`]."""
    general = _prompt_set(arguments.general_prompts, "general_heldout", arguments.num_samples)
    return EvaluationPrompts(
        harmful=_conversations(_prompt_set(arguments.harmful_prompts, "harmful_heldout", arguments.num_samples)),
        benign=_conversations(_prompt_set(arguments.benign_prompts, "benign_heldout", arguments.num_samples)),
        general=_conversations(general),
        general_answers=general["answer"] if "answer" in general.column_names else None,
    )


@torch.no_grad()
def evaluate_front(arguments: FrontArguments, show_progress: bool = True) -> dict:
    """
    Evaluates the base model, then every adapter at every α, on the held-out prompts.

    Returns:
        `dict`: `base` (the base model's metrics), `points` (one row per adapter and α: its metrics and its
        `safety_gain`, the refusal rate on harmful prompts minus the base model's) and the arguments.
    """
    tokenizer = AutoTokenizer.from_pretrained(arguments.model_name_or_path)
    base = AutoModelForCausalLM.from_pretrained(arguments.model_name_or_path, dtype=torch.float32)
    prompts = front_prompts(arguments)
    names = [f"adapter_{index}" for index in range(len(arguments.adapters))]
    model = PeftModel.from_pretrained(base, arguments.adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], arguments.adapters[1:], strict=True):
        model.load_adapter(path, adapter_name=name)
    model.eval()
    with base_model_context(model):
        base_answers = greedy_answers(model, tokenizer, prompts.general, arguments.max_new_tokens)
        base_metrics = evaluate(model, tokenizer, prompts, base_answers, arguments.max_new_tokens)
    points = []
    for name, path in zip(names, arguments.adapters, strict=True):
        model.set_adapter(name)
        for alpha in sorted(arguments.alphas):
            with lora_scaled(model, alpha):
                metrics = evaluate(model, tokenizer, prompts, base_answers, arguments.max_new_tokens)
            metrics["safety_gain"] = metrics["refusal_rate_harmful"] - base_metrics["refusal_rate_harmful"]
            points.append({"adapter": path, "alpha": alpha, **metrics})
            if show_progress:
                cells = ", ".join(f"{key} {metrics[key]:.4g}" for key in FRONT_METRICS if metrics[key] is not None)
                print(f"{path} α={alpha:g}: {cells}", flush=True)
    return {"arguments": asdict(arguments), "base": base_metrics, "points": points}


def front_table(results: dict) -> str:
    """The front as a Markdown table, sorted by adapter then α."""
    header = "| adapter | α | safety gain | over-refusal | KL to base | greedy unchanged | checkable right |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for point in results["points"]:
        accuracy = point["general_accuracy"]
        lines.append(
            f"| {point['adapter']} | {point['alpha']:g} | {point['safety_gain']:+.3f} | "
            f"{point['over_refusal_rate_benign']:.3f} | {point['general_kl']:.2e} | {point['greedy_agreement']:.3f} | "
            f"{'n/a' if accuracy is None else f'{accuracy:.3f}'} |"
        )
    return "\n".join(lines)


def plot_front(results: dict, path: str) -> None:
    """Safety gain against general KL, one line per adapter through its α points (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for adapter in dict.fromkeys(point["adapter"] for point in results["points"]):
        points = [point for point in results["points"] if point["adapter"] == adapter]
        kl = [0.0] + [max(point["general_kl"], 0.0) for point in points]
        gain = [0.0] + [point["safety_gain"] for point in points]
        axes.plot(kl, gain, marker="o", label=Path(adapter).name)
        for point in points:
            axes.annotate(f"{point['alpha']:g}", (max(point["general_kl"], 0.0), point["safety_gain"]), fontsize=7)
    axes.set_xscale("symlog", linthresh=1e-4)
    axes.set_xlabel("general drift: next-token KL to the base model (held-out general prompts)")
    axes.set_ylabel("safety gain: Δ refusal on held-out harmful prompts")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def run_front(arguments: FrontArguments) -> dict:
    """`trl-nspo front`: evaluates, prints the table, writes the JSON (and the plot)."""
    results = evaluate_front(arguments)
    print(front_table(results))
    Path(arguments.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"Wrote {arguments.output}.")
    if arguments.plot is not None:
        try:
            plot_front(results, arguments.plot)
            print(f"Wrote {arguments.plot}.")
        except ImportError:
            print("matplotlib is not installed (`pip install matplotlib`): no plot written.")
    return results
