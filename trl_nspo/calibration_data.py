"""Calibration data: general-task rows → token ids → the base model's greedy completions.

Accepts the dataset formats TRL does (`prompt`, as text or chat messages; `messages`; `text`), applies the chat
template, and pads batches for the forward passes of [`~calibration.layer_input_covariances`]. Nothing here knows about
hooks or null spaces.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from trl.data_utils import apply_chat_template, is_conversational

from .null_space import NullSpaceError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationSettings:
    """
    What calibration data is fed to the model, and how.

    Args:
        num_samples (`int`, *optional*, defaults to `1024`):
            Rows of the calibration dataset to use (the first ones).
        max_length (`int`, *optional*, defaults to `256`):
            Maximum tokens of each prompt (or conversation); longer ones are truncated, and counted.
        generate_completions (`bool`, *optional*, defaults to `True`):
            Append the base model's own greedy completion to every `prompt`, so the preserved behaviour includes
            responses (as the paper does).
        completion_length (`int`, *optional*, defaults to `128`):
            Maximum tokens of each generated completion.
        batch_size (`int`, *optional*, defaults to `8`):
            Sequences per forward pass.
        sketch_dim (`int`, *optional*, defaults to `64`):
            Columns of the random sketch of each layer's inputs kept for the preservation metric; `0` disables it.
        groups_per_pass (`int`, *optional*):
            Covariances held in memory at once. Fewer means more forward passes over the data but less memory (a d×d
            float64 matrix per group); `None` does everything in one pass.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the sketch.
    """

    num_samples: int = 1024
    max_length: int = 256
    generate_completions: bool = True
    completion_length: int = 128
    batch_size: int = 8
    sketch_dim: int = 64
    groups_per_pass: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_samples", "max_length", "completion_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"Calibration setting `{name}` must be a positive integer, got {getattr(self, name)}."
                )
        if self.sketch_dim < 0:
            raise ValueError(f"Calibration setting `sketch_dim` must be ≥ 0, got {self.sketch_dim}.")
        if self.groups_per_pass is not None and self.groups_per_pass < 1:
            raise ValueError(f"Calibration setting `groups_per_pass` must be ≥ 1 or None, got {self.groups_per_pass}.")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Runs the block with `model` in eval mode (no dropout), then puts its training flag back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def tokenizer_of(processing_class) -> PreTrainedTokenizerBase:
    """The tokenizer itself, or the one a processor (multimodal models) holds."""
    return getattr(processing_class, "tokenizer", processing_class)


def calibration_prompts(
    processing_class, dataset: Dataset, settings: CalibrationSettings
) -> tuple[list[list[int]], dict[str, int], str]:
    """
    Token ids of every calibration prompt (or conversation, or text), chat template applied and truncated to
    `settings.max_length`; empty ones dropped.

    Returns:
        `tuple[list[list[int]], dict[str, int], str]`: the sequences, counts (rows, truncated rows, empty rows) and
        the column they came from.
    """
    tokenizer = tokenizer_of(processing_class)
    if len(dataset) == 0:
        raise NullSpaceError("The calibration dataset is empty; pass general-task prompts (`calibration_dataset`).")
    rows = dataset.select(range(min(settings.num_samples, len(dataset))))
    column = next((c for c in ("prompt", "messages", "text") if c in rows.column_names), None)
    if column is None:
        raise NullSpaceError(
            f"The calibration dataset has columns {rows.column_names}; NSPO needs one of 'prompt' (text or chat "
            "messages), 'messages' (conversations) or 'text'. Rename a column or use `trl_nspo.data`."
        )
    # TRL's name for a whole conversation is `messages`; a `text` column of conversations is rendered as one.
    key = "prompt" if column == "prompt" else "messages"
    texts = []
    for value in rows[column]:
        example = {key: value}
        if is_conversational(example):
            # Rendered as TRL renders its datasets: a prompt gets the generation prompt (or continues a final
            # assistant message), a conversation does not. The template adds its own special tokens: not twice.
            rendered = apply_chat_template(example, tokenizer)
            texts.append((rendered["prompt" if key == "prompt" else "text"], False))
        else:
            texts.append((value, True))
    sequences = []
    truncated = 0
    for text, add_special_tokens in texts:
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        if len(ids) > settings.max_length:
            truncated += 1
            ids = ids[: settings.max_length]
        sequences.append(ids)
    empty = sum(1 for ids in sequences if not ids)
    sequences = [ids for ids in sequences if ids]
    if not sequences:
        raise NullSpaceError("Every calibration row tokenized to nothing; check the dataset's text column.")
    return sequences, {"rows": len(texts), "truncated_rows": truncated, "empty_rows": empty}, column


def calibration_token_sequences(
    model: nn.Module,
    processing_class,
    dataset: Dataset,
    settings: CalibrationSettings,
    show_progress: bool = True,
) -> tuple[list[list[int]], dict[str, int]]:
    """
    Token ids of every calibration sequence: prompts (optionally followed by the model's greedy completion), or
    whole conversations.

    Accepts the dataset formats TRL does: `prompt` (text, or a list of chat messages), `messages` (full
    conversations) or `text`.

    Returns:
        `tuple[list[list[int]], dict[str, int]]`: the sequences, and counts (rows, truncated rows, generated tokens).
    """
    # Imported here: calibration.py, which owns it, imports this module.
    from .calibration import adapters_disabled

    tokenizer = tokenizer_of(processing_class)
    sequences, counts, column = calibration_prompts(processing_class, dataset, settings)
    generated_tokens = 0
    if settings.generate_completions and column == "prompt":
        with adapters_disabled(model):
            completions = greedy_completions(
                model,
                tokenizer,
                sequences,
                settings.completion_length,
                settings.batch_size,
                "NSPO calibration: greedy completions" if show_progress else None,
            )
        sequences = [prompt + completion for prompt, completion in zip(sequences, completions, strict=True)]
        generated_tokens = sum(len(completion) for completion in completions)
    if counts["truncated_rows"]:
        logger.warning(
            "%d of %d calibration rows were longer than calibration_max_length=%d tokens and were truncated.",
            counts["truncated_rows"],
            counts["rows"],
            settings.max_length,
        )
    return sequences, {**counts, "generated_tokens": generated_tokens}


def stop_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokens that end a greedy calibration completion: the generation config's and the tokenizer's EOS."""
    eos_ids = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else []
    return set([eos_ids] if isinstance(eos_ids, int) else eos_ids) | {tokenizer.eos_token_id}


@torch.no_grad()
def greedy_completions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    description: str | None = None,
) -> list[list[int]]:
    """
    Token ids of `model`'s greedy completion of each prompt (ids), up to and including the first end-of-sequence
    token. Runs in eval mode with the model's current adapter state; a progress bar is shown if `description` is set.
    """
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    eos_ids = stop_token_ids(model, tokenizer)
    completions = []
    batches = range(0, len(prompts), batch_size)
    with eval_mode(model):
        for start in tqdm(batches, desc=description, disable=description is None):
            batch = prompts[start : start + batch_size]
            width = max(len(ids) for ids in batch)
            # Left padding, so every completion starts right after its prompt.
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in batch], device=device)
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
            for row in output[:, width:].tolist():
                completion = []
                for token in row:
                    completion.append(token)
                    if token in eos_ids:
                        break
                completions.append(completion)
    return completions


def right_padded_batches(
    sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # Right padding: under causal attention, pads after a sequence cannot change its real tokens' activations.
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([list(ids) + [pad_id] * (width - len(ids)) for ids in batch], device=device)
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch], device=device)
        yield input_ids, attention_mask


def pad_token_id(processing_class) -> int:
    tokenizer = tokenizer_of(processing_class)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
