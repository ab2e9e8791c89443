"""Datasets for NSPO: safety prompts for GRPO and general-task data for calibration (the small prompt sets of the
offline demo are in `trl_nspo.demo`).

Every loader returns a [`~datasets.Dataset`] in one of the formats TRL accepts (a `prompt` column of chat messages,
or a `messages` column of whole conversations), so its output can be passed to `GRPOTrainer` or to the calibration
as it is.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, Value, load_dataset, load_from_disk

logger = logging.getLogger(__name__)

DatasetSource = str | os.PathLike | Dataset | DatasetDict

# `datasets` packaged builders for single data files, by file suffix.
_BUILDER_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
# PKU-SafeRLHF labels each response of a row with `is_response_{i}_safe`.
_RESPONSE_SAFETY_COLUMN = re.compile(r"is_response_\d+_safe")
# Columns holding text or conversations, in the order `load_calibration_dataset` looks for them.
_CALIBRATION_COLUMNS = ("messages", "prompt", "text", "instruction", "question", "conversations")
# Columns whose conversations are whole dialogues (TRL's `messages`), not prompts awaiting a completion.
_CONVERSATION_COLUMNS = ("messages", "conversations")
# ShareGPT speaker names (`from`) and the chat roles they stand for.
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "tool": "tool",
}


def _load_split(path_or_name: DatasetSource, split: str) -> Dataset:
    """One split of a dataset given as a `Dataset`, a `DatasetDict`, a local file or folder, or a Hub name."""
    if isinstance(path_or_name, Dataset):
        return path_or_name
    if isinstance(path_or_name, DatasetDict):
        if split not in path_or_name:
            raise ValueError(f"Split '{split}' not found; the dataset has splits {list(path_or_name)}.")
        return path_or_name[split]
    path = Path(path_or_name)
    if path.suffix.lower() in _BUILDER_BY_SUFFIX and not path.exists():
        # Without this, `load_dataset` would look the file name up on the Hub and fail with a less useful error.
        raise FileNotFoundError(f"Dataset file '{path}' does not exist.")
    if path.is_file():
        builder = _BUILDER_BY_SUFFIX.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"Cannot read '{path}': unsupported file type '{path.suffix}'. Supported: "
                f"{sorted(_BUILDER_BY_SUFFIX)}, a folder of such files, a `save_to_disk` folder or a Hub dataset name."
            )
        # A single file holds one split; it is read under the name that was asked for.
        return load_dataset(builder, data_files={split: str(path)}, split=split)
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        return _load_split(load_from_disk(str(path)), split)
    # A folder of data files or a Hub name: `load_dataset` resolves both.
    return load_dataset(str(path_or_name), split=split)


def _source_name(path_or_name: DatasetSource) -> str:
    return "the given dataset" if isinstance(path_or_name, (Dataset, DatasetDict)) else f"'{path_or_name}'"


def _missing_column_error(column: str, dataset: Dataset, source: str, argument: str) -> ValueError:
    return ValueError(
        f"Column '{column}' not found in {source}; it has columns {dataset.column_names}. "
        f"Pass `{argument}=` to name the right one."
    )


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(message, dict) for message in value)


def _as_messages(conversation: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Chat messages (`role`/`content`) from messages in that format or in ShareGPT's (`from`/`value`)."""
    messages = []
    for message in conversation:
        # Arrow gives every message the union of all keys seen in the column, so absent keys read as None.
        if message.get("role") is not None:
            role, content = message["role"], message.get("content")
        elif message.get("from") is not None:
            speaker = message["from"]
            if speaker not in _SHAREGPT_ROLES:
                raise ValueError(f"Unknown ShareGPT speaker '{speaker}'; expected one of {sorted(_SHAREGPT_ROLES)}.")
            role, content = _SHAREGPT_ROLES[speaker], message["value"]
        else:
            raise ValueError(
                f"A chat message needs `role` and `content` (or ShareGPT's `from` and `value`) keys; got {message}."
            )
        if not isinstance(content, str):
            raise ValueError(f"Only text message contents are supported; got {type(content).__name__}: {content!r}.")
        messages.append({"role": role, "content": content})
    return messages


def _is_empty(value: str | list[dict[str, str]] | None) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return not any(message["content"].strip() for message in value)


def _sample_indices(num_rows: int, num_samples: int, seed: int) -> list[int]:
    """`num_samples` distinct row indices drawn with `seed`, in dataset order.

    The indices are a prefix of one fixed permutation, so with the same seed a smaller sample is contained in a larger
    one.
    """
    permutation = np.random.default_rng(seed).permutation(num_rows)
    return sorted(permutation[:num_samples].tolist())


def _as_flag(value: Any, column: str) -> bool:
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, float)) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"Column '{column}' must hold booleans (or 0/1); got {value!r}.")


def load_safety_prompts(
    path_or_name: DatasetSource,
    split: str = "train",
    fraction: float = 1.0,
    seed: int = 0,
    prompt_column: str = "prompt",
    harmful_column: str | None = None,
) -> Dataset:
    """
    Turn safety preference data (PKU-SafeRLHF style) into a GRPO prompt dataset.

    Each distinct prompt becomes one row in TRL's conversational format: a `prompt` column holding
    `[{"role": "user", "content": ...}]` (prompts that already are lists of chat messages are kept as they are), and a
    boolean `is_harmful` column. Prompts are stripped of surrounding whitespace, empty ones are dropped, and repeated
    ones (PKU-SafeRLHF pairs every prompt with several response pairs) are kept once, at their first occurrence.

    Whether a prompt is harmful is decided, in order of precedence:

    1. by `harmful_column`, if given (booleans or 0/1; a repeated prompt is harmful if any of its rows says so);
    2. by PKU-SafeRLHF's response labels `is_response_0_safe`, `is_response_1_safe`, ... if present: a prompt is
       harmful if any response to it, in any of its rows, is labelled unsafe. This is a proxy: the prompt drew out
       an unsafe response at least once;
    3. otherwise every prompt is treated as harmful (a warning is logged), as for sets of red-teaming prompts.

    Args:
        path_or_name (`str`, `os.PathLike`, [`~datasets.Dataset`] or [`~datasets.DatasetDict`]):
            A Hub dataset name (e.g. `"PKU-Alignment/PKU-SafeRLHF"`), a local `.json`/`.jsonl`/`.csv`/`.parquet` file,
            a folder of such files or one written by `save_to_disk`, or a dataset already loaded.
        split (`str`, *optional*, defaults to `"train"`):
            Split to load. A single local file is read as this split.
        fraction (`float`, *optional*, defaults to `1.0`):
            Share of the distinct prompts to keep, in `(0, 1]`, rounded to the nearest count (at least one). The paper
            used `0.4` of PKU-SafeRLHF.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the sample drawn when `fraction < 1`. The same seed always gives the same rows, and a smaller
            fraction gives a subset of a larger one.
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Column holding the prompts.
        harmful_column (`str`, *optional*):
            Boolean column saying whether each prompt is harmful; overrides the response labels.

    Returns:
        [`~datasets.Dataset`]: the columns `prompt` and `is_harmful`, one row per distinct prompt, in dataset order.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"`fraction` must be in (0, 1]; got {fraction}.")
    dataset = _load_split(path_or_name, split)
    source = _source_name(path_or_name)
    if prompt_column not in dataset.column_names:
        raise _missing_column_error(prompt_column, dataset, source, "prompt_column")
    if harmful_column is not None:
        if harmful_column not in dataset.column_names:
            raise _missing_column_error(harmful_column, dataset, source, "harmful_column")
        label_columns = [harmful_column]
    else:
        label_columns = [column for column in dataset.column_names if _RESPONSE_SAFETY_COLUMN.fullmatch(column)]
        if not label_columns:
            logger.warning(
                "%s has no `is_response_*_safe` columns and no `harmful_column` was given; treating every prompt as "
                "harmful.",
                source,
            )

    prompts: dict[str, list[dict[str, str]]] = {}
    is_harmful: dict[str, bool] = {}
    labels = {column: dataset[column] for column in label_columns}
    for row, value in enumerate(dataset[prompt_column]):
        if _is_conversation(value):
            conversation = _as_messages(value)
            key = repr([(message["role"], message["content"].strip()) for message in conversation])
        elif isinstance(value, str) or value is None:
            conversation = [{"role": "user", "content": (value or "").strip()}]
            key = conversation[0]["content"]
        else:
            raise ValueError(
                f"Column '{prompt_column}' must hold text or lists of chat messages; row {row} holds {value!r}."
            )
        if _is_empty(conversation):
            continue
        if harmful_column is not None:
            harmful = _as_flag(labels[harmful_column][row], harmful_column)
        elif label_columns:
            # An unlabelled response (None) says nothing about the prompt.
            harmful = any(labels[column][row] is False for column in label_columns)
        else:
            harmful = True
        prompts.setdefault(key, conversation)
        is_harmful[key] = is_harmful.get(key, False) or harmful

    keys = list(prompts)
    if fraction < 1.0 and keys:
        num_samples = max(1, round(fraction * len(keys)))
        keys = [keys[index] for index in _sample_indices(len(keys), num_samples, seed)]
    return Dataset.from_dict(
        {"prompt": [prompts[key] for key in keys], "is_harmful": [is_harmful[key] for key in keys]}
    )


def load_calibration_dataset(
    path_or_name: DatasetSource,
    split: str = "train",
    num_samples: int | None = None,
    seed: int = 0,
    text_column: str | None = None,
) -> Dataset:
    """
    Turn any text or chat dataset into general-task calibration data for NSPO.

    The column read is `text_column` if given, otherwise the first of these that exists:

    - `messages`: chat conversations (`role`/`content`), kept as a `messages` column;
    - `prompt`: text or chat messages, kept as a `prompt` column;
    - `text`: text, as a `prompt` column;
    - `instruction` (Alpaca style): the instruction, followed by a blank line and the `input` column when that exists
      and is not empty, as a `prompt` column;
    - `question`: text, as a `prompt` column;
    - `conversations` (ShareGPT style, `from`/`value` with speakers `human`, `gpt`, `system`, ...): converted to chat
      messages, as a `messages` column.

    A `text_column` holding text gives a `prompt` column; one holding conversations gives a `messages` column if it is
    named `messages` or `conversations`, and a `prompt` column otherwise. Rows whose text (or every message) is empty
    are dropped. `prompt` rows are what the model continues during calibration; `messages` rows are used whole.

    Args:
        path_or_name (`str`, `os.PathLike`, [`~datasets.Dataset`] or [`~datasets.DatasetDict`]):
            A Hub dataset name, a local `.json`/`.jsonl`/`.csv`/`.parquet`/`.txt` file, a folder of such files or one
            written by `save_to_disk`, or a dataset already loaded.
        split (`str`, *optional*, defaults to `"train"`):
            Split to load. A single local file is read as this split.
        num_samples (`int`, *optional*):
            Number of rows to keep, drawn after empty rows are dropped; all rows if `None` or if fewer remain.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the `num_samples` draw. The same seed always gives the same rows, in dataset order.
        text_column (`str`, *optional*):
            Column to read instead of the detected one.

    Returns:
        [`~datasets.Dataset`]: a single column, `prompt` (text or chat messages) or `messages` (conversations).
    """
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive number of rows or None; got {num_samples}.")
    dataset = _load_split(path_or_name, split)
    source = _source_name(path_or_name)
    if text_column is not None:
        if text_column not in dataset.column_names:
            raise _missing_column_error(text_column, dataset, source, "text_column")
        column = text_column
    else:
        column = next((name for name in _CALIBRATION_COLUMNS if name in dataset.column_names), None)
        if column is None:
            raise ValueError(
                f"No text or chat column found in {source}; it has columns {dataset.column_names}, and one of "
                f"{list(_CALIBRATION_COLUMNS)} was expected. Pass `text_column=` to name the right one."
            )
    feature = dataset.features[column]
    holds_text = isinstance(feature, Value) and feature.dtype in ("string", "large_string")
    output_column = "messages" if column in _CONVERSATION_COLUMNS and not holds_text else "prompt"
    joins_input = column == "instruction" and text_column is None and "input" in dataset.column_names

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        value = row[column]
        if holds_text:
            # CSV readers give empty cells as None, or NaN when the whole column is empty.
            if joins_input and isinstance(row["input"], str) and row["input"].strip():
                value = f"{value}\n\n{row['input']}"
            return {"prompt": value}
        if not _is_conversation(value):
            raise ValueError(f"Column '{column}' must hold text or lists of chat messages; got {value!r}.")
        return {output_column: _as_messages(value)}

    converted = dataset.map(convert, remove_columns=dataset.column_names)
    converted = converted.filter(lambda value: not _is_empty(value), input_columns=output_column)
    if num_samples is not None and num_samples < len(converted):
        converted = converted.select(_sample_indices(len(converted), num_samples, seed))
    return converted
