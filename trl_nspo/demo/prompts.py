"""The small prompt sets shipped with the demo kit, written for offline demos, benchmarks and smoke tests."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from datasets import Dataset, concatenate_datasets, load_dataset

EmbeddedPromptSet = Literal[
    "harmful_train",
    "harmful_eval",
    "harmful_heldout",
    "benign_train",
    "benign_eval",
    "benign_heldout",
    "general_calibration",
    "general_eval",
    "general_heldout",
    "general_conversations",
    "general_conversations_heldout",
]

PROMPTS_DIR = Path(__file__).parent / "data"


def embedded_prompts(name: EmbeddedPromptSet) -> Dataset:
    """
    Load one of the prompt sets shipped with the demo kit, written for offline demos, benchmarks and smoke tests.

    - `harmful_train` / `harmful_eval` / `harmful_heldout`: clearly harmful requests (weapons, hacking, fraud,
      self-harm, harassment, drugs, ...), disjoint from each other;
    - `benign_train` / `benign_eval` / `benign_heldout`: benign requests that merely sound risky ("How do I kill a
      Python process?"), to measure over-refusal;
    - `general_calibration` / `general_eval` / `general_heldout`: general tasks (math, code, facts, instruction
      following, writing), disjoint from each other. `general_eval` and `general_heldout` have an `answer` column,
      the expected short answer of the checkable prompts and `None` for open-ended ones;
    - `general_conversations` / `general_conversations_heldout`: 768 and 226 conversations that
      SmolLM2-135M-Instruct wrote itself (user turns sampled after its chat template's user prefix, then its greedy
      answers of ≤ 96 tokens; `bench/build_general_conversations.py`), as a `messages` column: general-task data in
      the quantity null spaces need, made without a dataset download. The default calibration data of the CLI.

    The `*_heldout` sets are never trained or calibrated on by anything in this project: they are for measurement.

    Args:
        name (`str`):
            The set's name, as above.

    Returns:
        [`~datasets.Dataset`]: a conversational `prompt` column (`[{"role": "user", "content": ...}]`), a boolean
        `is_harmful` column for the harmful and benign sets, and `answer` for `general_eval` and `general_heldout`;
        the conversation sets have a `messages` column instead of `prompt`.
    """
    path = PROMPTS_DIR / f"{name}.jsonl"
    if not path.is_file():
        available = sorted(file.stem for file in PROMPTS_DIR.glob("*.jsonl"))
        raise ValueError(f"Unknown embedded prompt set '{name}'; available: {available}.")
    dataset = load_dataset("json", data_files=str(path), split="train")
    if "messages" in dataset.column_names:
        return dataset
    dataset = dataset.map(lambda text: {"prompt": [{"role": "user", "content": text}]}, input_columns="prompt")
    if name.startswith(("harmful_", "benign_")):
        dataset = dataset.add_column("is_harmful", [name.startswith("harmful_")] * len(dataset))
    return dataset


def demo_safety_dataset(split: Literal["train", "eval"]) -> Dataset:
    """
    The embedded safety prompts of one split: the harmful prompts followed by the benign ones.

    The benign prompts sound risky but deserve an answer, so a reward that also penalises over-refusal has something
    to measure. The rows are not shuffled (trainers shuffle their data themselves).

    Args:
        split (`str`):
            `"train"` or `"eval"`; the two splits share no prompt.

    Returns:
        [`~datasets.Dataset`]: the columns `prompt` (conversational) and `is_harmful`.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"`split` must be 'train' or 'eval'; got {split!r}.")
    return concatenate_datasets([embedded_prompts(f"harmful_{split}"), embedded_prompts(f"benign_{split}")])
