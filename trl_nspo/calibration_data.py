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
from .targets import adapters_disabled

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
        batch_size (`int`, *optional*, defaults to `32`):
            Sequences per forward pass and per batch of greedy completions (token-by-token decoding of a small model
            is bound by per-step overhead, so larger batches decode more tokens per second).
        sketch_dim (`int`, *optional*, defaults to `64`):
            Columns of the random sketch of each layer's inputs kept for the preservation metric; `0` disables it.
        groups_per_pass (`int`, *optional*):
            Covariances held in memory at once. Fewer means more forward passes over the data but less memory (a d×d
            float64 matrix per group and fold); `None` does everything in one pass.
        folds (`int`, *optional*, defaults to `2`):
            Parts of the calibration sequences (every `folds`-th sequence) whose covariances are kept apart, so that
            a null space computed without one part can be measured on it: the held-out share every projector file
            records, and the selection of the `heldout` and `task` rules. `1` keeps one covariance (half the memory)
            and measures nothing out of sample.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the sketch.
    """

    num_samples: int = 1024
    max_length: int = 256
    generate_completions: bool = True
    completion_length: int = 128
    batch_size: int = 32
    sketch_dim: int = 64
    groups_per_pass: int | None = None
    folds: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_samples", "max_length", "completion_length", "batch_size", "folds"):
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


def user_turn_prefix(tokenizer: PreTrainedTokenizerBase) -> str:
    """
    The text the chat template puts before a user's message (system prompt and user header included), found by
    rendering a one-message conversation around a marker.
    """
    marker = "\x00USER-TURN\x00"
    if tokenizer.chat_template is None:
        raise NullSpaceError(
            "The tokenizer has no chat template, so there is no user turn to sample; pass calibration data instead."
        )
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    if marker not in rendered:
        raise NullSpaceError("The chat template drops the user's message; pass calibration data instead.")
    return rendered[: rendered.index(marker)]


@torch.no_grad()
def sampled_user_prompts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    num_prompts: int,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    temperature: float = 1.0,
    top_p: float = 0.95,
    seed: int = 0,
    description: str | None = None,
) -> list[str]:
    """
    User messages the chat model writes itself: sampled after its chat template's user prefix until the end of the
    turn. A chat model's own idea of a user request is general-task data that needs no dataset: with enough samples it
    covers far more inputs than a small hand-written set (BENCHMARKS.md section 6).

    Samples that do not end within `max_new_tokens`, are empty, or repeat an earlier one are dropped, so fewer than
    `num_prompts` may come back. Runs in eval mode with the model's current adapter state.

    Args:
        model (`nn.Module`):
            A chat model.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer, with a chat template.
        num_prompts (`int`):
            Prompts to sample.
        max_new_tokens (`int`, *optional*, defaults to `64`):
            Longest prompt, in tokens.
        batch_size (`int`, *optional*, defaults to `64`):
            Sequences sampled at once.
        temperature, top_p (`float`, *optional*, default to `1.0`, `0.95`):
            Sampling settings.
        seed (`int`, *optional*, defaults to `0`):
            Seed of torch's generator for the sampling (restored afterwards).
        description (`str`, *optional*):
            Show a progress bar with this description.

    Returns:
        `list[str]`: the distinct, complete user messages, in the order they were sampled.
    """
    device = next(model.parameters()).device
    prefix_ids = tokenizer(user_turn_prefix(tokenizer), add_special_tokens=False)["input_ids"]
    eos_ids = stop_token_ids(model, tokenizer)
    prompts: list[str] = []
    seen: set[str] = set()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(model):
        torch.manual_seed(seed)
        for start in tqdm(range(0, num_prompts, batch_size), desc=description, disable=description is None):
            rows = min(batch_size, num_prompts - start)
            input_ids = torch.tensor([prefix_ids] * rows, device=device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                pad_token_id=pad_token_id(tokenizer),
            )
            for row in output[:, len(prefix_ids) :].tolist():
                end = next((position for position, token in enumerate(row) if token in eos_ids), None)
                if end is None:
                    continue
                text = tokenizer.decode(row[:end], skip_special_tokens=True).strip()
                if text and text not in seen:
                    seen.add(text)
                    prompts.append(text)
    return prompts


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
