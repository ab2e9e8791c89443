"""Reward from a generative guard model loaded locally with transformers, scored from its next-token probabilities."""

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .completions import Completion, Prompt, guard_conversations


class LocalGuardReward:
    """
    Reward from a generative guard model loaded locally (Llama Guard, ShieldGemma, ...), scored from the probability
    of its first answer token rather than from a sampled answer, which gives a graded signal.

    Each prompt-response pair is rendered with the guard tokenizer's chat template (`add_generation_prompt=True`),
    followed by `answer_prefix`. One forward pass per batch (left padding) gives the next-token logits, of which only
    two are read: those of the first token of `safe_token` and of `unsafe_token`. With `p_unsafe` the softmax over
    these two logits, i.e. the probability of `unsafe` given that the guard answers `safe` or `unsafe`, the reward is

        reward = unsafe_reward * p_unsafe + safe_reward * (1 - p_unsafe)

    so the defaults give `-p_unsafe`, a soft version of the NSPO paper's −1 / 0 reward.

    Args:
        model (`str` or [`~transformers.PreTrainedModel`]):
            The guard's model name or path, loaded with `AutoModelForCausalLM.from_pretrained`, or a loaded causal LM.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`] or `None`, *optional*, defaults to `None`):
            The guard's tokenizer, which must have a chat template. Loaded from `model` when it is a name or path;
            required when `model` is a loaded model.
        safe_token (`str`, *optional*, defaults to `"safe"`):
            The guard's answer meaning safe (ShieldGemma: `"No"`). Only its first token is used.
        unsafe_token (`str`, *optional*, defaults to `"unsafe"`):
            The guard's answer meaning unsafe (ShieldGemma: `"Yes"`). Only its first token is used, which must differ
            from the first token of `safe_token`.
        safe_reward (`float`, *optional*, defaults to `0.0`):
            Reward for a response the guard is certain is safe.
        unsafe_reward (`float`, *optional*, defaults to `-1.0`):
            Reward for a response the guard is certain is unsafe.
        include_prompt (`bool`, *optional*, defaults to `True`):
            Whether the guard sees the prompt. If `False`, the response alone is judged as a single user turn.
        answer_prefix (`str`, *optional*, defaults to `""`):
            Text the guard writes before its verdict that the chat template does not already end with. Llama Guard 3's
            template stops right after the assistant header, and the model first writes `"\\n\\n"`: pass `"\\n\\n"`
            there, otherwise the scored token is not the verdict.
        chat_template_kwargs (`dict[str, Any]` or `None`, *optional*, defaults to `None`):
            Extra arguments for the chat template, e.g. ShieldGemma's `{"guideline": ...}`.
        batch_size (`int`, *optional*, defaults to `8`):
            Number of samples per forward pass.
        device (`str`, [`torch.device`] or `None`, *optional*, defaults to `None`):
            Device to run the guard on. Defaults to the loaded model's device, or to CUDA when available for a model
            loaded here.
        model_init_kwargs (`dict[str, Any]` or `None`, *optional*, defaults to `None`):
            Keyword arguments for `AutoModelForCausalLM.from_pretrained` (e.g. `{"dtype": torch.bfloat16}`).
    """

    def __init__(
        self,
        model: str | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        safe_token: str = "safe",
        unsafe_token: str = "unsafe",
        safe_reward: float = 0.0,
        unsafe_reward: float = -1.0,
        include_prompt: bool = True,
        answer_prefix: str = "",
        chat_template_kwargs: dict[str, Any] | None = None,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        model_init_kwargs: dict[str, Any] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
        if isinstance(model, str):
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model)
            model = AutoModelForCausalLM.from_pretrained(model, **(model_init_kwargs or {}))
            device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        elif tokenizer is None:
            raise ValueError("A loaded guard model needs its tokenizer: pass `tokenizer=` as well.")
        if device is not None:
            model = model.to(device)
        if tokenizer.pad_token is None:
            # Llama-family tokenizers have no pad token; its id is irrelevant since padded positions are masked out.
            tokenizer.pad_token = tokenizer.eos_token
        self.__name__ = "local_guard_reward"
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.safe_token_id = self._first_token_id(safe_token)
        self.unsafe_token_id = self._first_token_id(unsafe_token)
        if self.safe_token_id == self.unsafe_token_id:
            raise ValueError(
                f"`safe_token={safe_token!r}` and `unsafe_token={unsafe_token!r}` start with the same token "
                f"({self.safe_token_id}), so the guard's next-token distribution cannot tell them apart. Choose "
                "answer strings whose first tokens differ."
            )
        self.safe_reward = safe_reward
        self.unsafe_reward = unsafe_reward
        self.include_prompt = include_prompt
        self.answer_prefix = answer_prefix
        self.chat_template_kwargs = chat_template_kwargs or {}
        self.batch_size = batch_size

    def _first_token_id(self, text: str) -> int:
        token_ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not token_ids:
            raise ValueError(f"The answer token string {text!r} encodes to no token.")
        return token_ids[0]

    @torch.no_grad()
    def unsafe_probabilities(self, prompts: list[Prompt], completions: list[Completion]) -> list[float]:
        """
        Probability that the guard answers unsafe rather than safe, for each prompt-response pair.

        Args:
            prompts (`list[str]` or `list[list[dict[str, str]]]`):
                The prompts, rendered before each response unless `include_prompt=False`; standard or conversational.
            completions (`list[str]` or `list[list[dict[str, str]]]`):
                The responses to score, in the prompts' format.

        Returns:
            `list[float]`: `p_unsafe` in [0, 1] for each pair, in input order.
        """
        texts = [
            self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True, **self.chat_template_kwargs
            )
            + self.answer_prefix
            for conversation in guard_conversations(prompts, completions, self.include_prompt)
        ]
        answer_token_ids = torch.tensor([self.safe_token_id, self.unsafe_token_id], device=self.model.device)
        probabilities = []
        for start in range(0, len(texts), self.batch_size):
            # The template already holds any special tokens; left padding puts every last real token at position -1.
            inputs = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                padding_side="left",
                add_special_tokens=False,
            ).to(self.model.device)
            # Positions count real tokens only: models with absolute position embeddings then ignore the padding.
            position_ids = (inputs["attention_mask"].cumsum(dim=-1) - 1).clamp(min=0)
            logits = self.model(**inputs, position_ids=position_ids, logits_to_keep=1).logits[:, -1]
            answer_logits = logits.index_select(dim=-1, index=answer_token_ids).float()
            probabilities.extend(answer_logits.softmax(dim=-1)[:, 1].tolist())
        return probabilities

    def __call__(self, prompts: list[Prompt], completions: list[Completion], **kwargs) -> list[float]:
        return [
            self.unsafe_reward * p_unsafe + self.safe_reward * (1.0 - p_unsafe)
            for p_unsafe in self.unsafe_probabilities(prompts, completions)
        ]
