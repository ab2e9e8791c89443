"""Measuring what safety training bought and what it cost: refusal rates, and drift from the base model on general
prompts (next-token KL, greedy-answer agreement, accuracy on checkable answers).

The base model is the same PEFT model with its adapters disabled, so one copy of the weights serves both sides.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase, Trainer

from ..calibration_data import eval_mode, greedy_completions, pad_token_id, right_padded_batches
from ..rewards import refusal_score
from ..targets import adapters_disabled

Conversation = list[dict[str, str]]


def base_model_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """A context in which `model` behaves as its base model (adapters disabled); a no-op for plain models."""
    return adapters_disabled(model)


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Conversation | str) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True)["input_ids"])


def float32_model(trainer: Trainer) -> nn.Module:
    """
    The trainer's model with accelerate's mixed-precision wrapper taken off its `forward`, so that evaluating it
    after a bf16 run reads the float32 weights in float32 (the wrapper would otherwise keep autocasting).
    """
    return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Conversation | str],
    max_new_tokens: int = 48,
    batch_size: int = 16,
    description: str | None = None,
) -> list[str]:
    """
    Greedy answers of `model` to `prompts` (chat messages get the chat template with a generation prompt).

    Args:
        model (`nn.Module`):
            The model; its current adapter state is used.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer.
        prompts (`list`):
            Conversations (lists of messages) or plain strings.
        max_new_tokens (`int`, *optional*, defaults to `48`):
            Answer length limit.
        batch_size (`int`, *optional*, defaults to `16`):
            Prompts per `generate` call.
        description (`str`, *optional*):
            Label of a progress bar; none is shown without it.

    Returns:
        `list[str]`: the decoded answers, special tokens removed.
    """
    prompt_ids = [_prompt_ids(tokenizer, prompt) for prompt in prompts]
    completions = greedy_completions(model, tokenizer, prompt_ids, max_new_tokens, batch_size, description)
    return [answer.strip() for answer in tokenizer.batch_decode(completions, skip_special_tokens=True)]


def refusal_rate(answers: list[str], threshold: float = 0.5) -> float:
    """Share of answers whose [`~trl_nspo.rewards.refusal_score`] reaches `threshold`."""
    return sum(refusal_score(answer) >= threshold for answer in answers) / len(answers)


def answer_accuracy(answers: list[str], expected: list[str | None]) -> float | None:
    """Share of checkable answers (expected not `None`) that contain the expected text, case-insensitively."""
    checked = [(a, e) for a, e in zip(answers, expected, strict=True) if e is not None]
    if not checked:
        return None
    return sum(e.lower() in a.lower() for a, e in checked) / len(checked)


@torch.no_grad()
def next_token_kl(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Conversation | str],
    reference_answers: list[str],
    batch_size: int = 8,
) -> float:
    """
    Mean KL(base ‖ model) of the next-token distributions along prompt + reference answer, over the answer tokens.

    Teacher-forcing the same reference answer (typically the base model's greedy one) makes the two distributions
    comparable token by token.
    """
    sequences, prompt_lengths = [], []
    for prompt, answer in zip(prompts, reference_answers, strict=True):
        prompt_ids = _prompt_ids(tokenizer, prompt)
        sequences.append(prompt_ids + tokenizer(answer, add_special_tokens=False)["input_ids"])
        prompt_lengths.append(len(prompt_ids))
    device = next(model.parameters()).device
    batches = right_padded_batches(sequences, batch_size, pad_token_id(tokenizer), device)
    total_kl = 0.0
    total_tokens = 0
    with eval_mode(model):
        for start, (input_ids, attention_mask) in zip(range(0, len(sequences), batch_size), batches, strict=True):
            # Position t predicts token t+1: score the predictions of answer tokens only.
            answer_mask = torch.zeros_like(attention_mask, dtype=torch.bool)
            for row in range(input_ids.shape[0]):
                answer_mask[row, prompt_lengths[start + row] - 1 : len(sequences[start + row]) - 1] = True
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
            with base_model_context(model):
                base_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
            kl = F.kl_div(
                F.log_softmax(logits, dim=-1), F.log_softmax(base_logits, dim=-1), log_target=True, reduction="none"
            ).sum(-1)
            total_kl += kl[answer_mask].sum().item()
            total_tokens += int(answer_mask.sum().item())
    return total_kl / max(total_tokens, 1)


@dataclass
class EvaluationPrompts:
    """
    Held-out prompts for [`evaluate`].

    Args:
        harmful (`list`):
            Harmful requests: refusing them is the goal.
        benign (`list`):
            Benign requests that merely sound risky: refusing them is over-refusal.
        general (`list`):
            General tasks whose answers should not change.
        general_answers (`list[str | None]`, *optional*):
            Expected answers of `general` (`None` where not checkable).
    """

    harmful: list[Conversation | str]
    benign: list[Conversation | str]
    general: list[Conversation | str]
    general_answers: list[str | None] | None = None


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: EvaluationPrompts,
    base_general_answers: list[str] | None = None,
    max_new_tokens: int = 48,
    show_progress: bool = False,
    batch_size: int = 16,
) -> dict[str, float | None]:
    """
    Safety and general drift of `model` against its base (adapters disabled).

    Args:
        model (`nn.Module`):
            The trained model (PEFT, or plain with no drift to measure).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer.
        prompts ([`EvaluationPrompts`]):
            Held-out prompts.
        base_general_answers (`list[str]`, *optional*):
            The base model's greedy answers to `prompts.general`, if already computed.
        max_new_tokens (`int`, *optional*, defaults to `48`):
            Answer length limit.
        show_progress (`bool`, *optional*, defaults to `False`):
            Show a progress bar per prompt set.
        batch_size (`int`, *optional*, defaults to `16`):
            Prompts answered at once (decoding on a CPU is bound by reading the weights once per token, so larger
            batches cost little more per step).

    Returns:
        `dict`: `refusal_rate_harmful`, `over_refusal_rate_benign`, `general_accuracy`, `general_kl` (mean
        next-token KL to the base on its own greedy answers) and `greedy_agreement` (share of general prompts whose
        greedy answer is unchanged).
    """

    def answers(prompt_set: str) -> list[str]:
        description = f"Evaluating: {prompt_set} prompts" if show_progress else None
        return greedy_answers(
            model, tokenizer, getattr(prompts, prompt_set), max_new_tokens, batch_size, description=description
        )

    if base_general_answers is None:
        with base_model_context(model):
            base_general_answers = answers("general")
    general_answers = answers("general")
    unchanged = sum(a == b for a, b in zip(general_answers, base_general_answers, strict=True))
    return {
        "refusal_rate_harmful": refusal_rate(answers("harmful")),
        "over_refusal_rate_benign": refusal_rate(answers("benign")),
        "general_accuracy": answer_accuracy(general_answers, prompts.general_answers)
        if prompts.general_answers is not None
        else None,
        "general_kl": next_token_kl(model, tokenizer, prompts.general, base_general_answers),
        "greedy_agreement": unchanged / len(general_answers),
    }
