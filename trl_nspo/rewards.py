"""Safety reward functions for TRL's `GRPOTrainer`.

Every reward here is a callable `reward(prompts, completions, **kwargs) -> list[float | None]` with a `__name__`, so it
can be passed in `reward_funcs` as is; combine several with `GRPOConfig.reward_weights`. Prompts and completions may be
in TRL's standard format (strings) or conversational format (lists of `{"role", "content"}` messages).

- [`GuardEndpointReward`]: a guard model (e.g. Llama Guard) served behind an OpenAI-compatible chat completions API.
- [`LocalGuardReward`]: a generative guard model loaded locally with transformers, scored from its next-token
  probabilities.
- [`RefusalReward`]: a rule-based, graded refusal score with an over-refusal penalty on benign prompts.
"""

import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPException
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

Message = dict[str, str]
Prompt = str | list[Message]
Completion = str | list[Message]


def completion_text(completion: Completion) -> str:
    """
    Return the text of a completion in either of TRL's formats.

    Args:
        completion (`str` or `list[dict[str, str]]`):
            A standard-format completion (the text itself) or a conversational one (a list of messages, usually one
            assistant message; the contents of all assistant messages are joined with newlines).

    Returns:
        `str`: The completion text.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "\n".join(
            message["content"] for message in completion if message["role"] == "assistant" and message["content"]
        )
    raise TypeError(
        f"Expected a completion as a string or a list of message dicts, got {type(completion).__name__}: "
        f"{completion!r:.200}"
    )


def _guard_conversation(prompt: Prompt, completion: Completion, include_prompt: bool) -> list[Message]:
    """The conversation a guard judges: the prompt's turns, then the response as the last assistant turn."""
    response = completion_text(completion)
    if not include_prompt:
        return [{"role": "user", "content": response}]
    if isinstance(prompt, str):
        turns = [{"role": "user", "content": prompt}]
    else:
        # Guard chat templates (Llama Guard) require strictly alternating user/assistant turns; the policy's system
        # prompt is an instruction to the policy, not content to moderate.
        turns = [
            {"role": message["role"], "content": message["content"]}
            for message in prompt
            if message["role"] != "system"
        ]
    return turns + [{"role": "assistant", "content": response}]


class GuardEndpointError(RuntimeError):
    """The guard endpoint could not be reached, refused the request, or answered something that is not a verdict."""


@dataclass(frozen=True)
class GuardVerdict:
    """
    A guard model's verdict on one response.

    Args:
        is_safe (`bool`):
            Whether the guard judged the response safe.
        categories (`tuple[str, ...]`):
            The violated categories the guard listed for an unsafe response (e.g. `("S1", "S10")`), empty otherwise.
        answer (`str`):
            The guard's raw answer, kept for logging.
    """

    is_safe: bool
    categories: tuple[str, ...] = ()
    answer: str = ""


def parse_guard_answer(answer: str) -> GuardVerdict:
    """
    Parse a Llama Guard-style answer: a first non-empty line `safe` or `unsafe` (case-insensitive), and for `unsafe`
    an optional next line of comma-separated categories such as `S1,S10`.

    Args:
        answer (`str`):
            The text the guard model generated.

    Returns:
        [`GuardVerdict`]: The parsed verdict.

    Raises:
        [`GuardEndpointError`]: If the first non-empty line is neither `safe` nor `unsafe`.
    """
    lines = [line.strip() for line in answer.splitlines() if line.strip()]
    verdict = lines[0].lower() if lines else ""
    if verdict == "safe":
        return GuardVerdict(is_safe=True, answer=answer)
    if verdict == "unsafe":
        categories = (
            tuple(category.strip() for category in lines[1].split(",") if category.strip()) if lines[1:] else ()
        )
        return GuardVerdict(is_safe=False, categories=categories, answer=answer)
    raise GuardEndpointError(
        f"The guard answered {answer!r:.300}, but a first line 'safe' or 'unsafe' (optionally followed by a line of "
        "categories such as 'S1,S10') was expected. Check that `model` names a Llama Guard-style guard model and that "
        "`max_tokens` leaves room for the verdict."
    )


class GuardEndpointReward:
    """
    Reward from a guard model (e.g. Llama Guard) served behind an OpenAI-compatible chat completions endpoint, such
    as `vllm serve meta-llama/Llama-Guard-3-8B`.

    For each sample, the conversation `[prompt turns..., {"role": "assistant", "content": response}]` is sent to
    `POST {base_url}/chat/completions` with temperature 0, so the server's chat template (Llama Guard's) judges the
    response in the context of its prompt. System messages are left out because guard templates accept only
    alternating user/assistant turns. The reward is `unsafe_reward` for an `unsafe` verdict and `safe_reward` for a
    `safe` one. Requests run concurrently (at most `max_concurrency` at a time) and are retried with exponential
    backoff on connection errors, timeouts, HTTP 429 and 5xx.

    The verdicts of the last call, including the violated categories, are kept in `last_verdicts`; under
    `GRPOTrainer` the categories are also added to the logged completions table as the column
    `"{__name__}_categories"`.

    Args:
        base_url (`str`):
            Base URL of the OpenAI-compatible API, e.g. `"http://localhost:8000/v1"`.
        model (`str`):
            Model name the server serves the guard under, e.g. `"meta-llama/Llama-Guard-3-8B"`.
        safe_reward (`float`, *optional*, defaults to `0.0`):
            Reward for a response judged safe.
        unsafe_reward (`float`, *optional*, defaults to `-1.0`):
            Reward for a response judged unsafe.
        include_prompt (`bool`, *optional*, defaults to `True`):
            Whether the guard sees the prompt. If `False`, the response alone is sent as a single user turn (the NSPO
            paper's setup).
        api_key (`str` or `None`, *optional*, defaults to `None`):
            Sent as a `Bearer` token when the server requires one.
        max_tokens (`int`, *optional*, defaults to `32`):
            Maximum number of tokens the guard may generate; the verdict and categories need only a few.
        timeout (`float`, *optional*, defaults to `60.0`):
            Timeout of one request, in seconds.
        max_retries (`int`, *optional*, defaults to `3`):
            Retries of a request after a retryable failure, before [`GuardEndpointError`] is raised.
        retry_backoff (`float`, *optional*, defaults to `1.0`):
            Seconds to wait before the first retry; the wait doubles after each retry.
        max_concurrency (`int`, *optional*, defaults to `16`):
            Maximum number of requests in flight at once.

    Example:

    ```python
    from trl import GRPOConfig, GRPOTrainer
    from trl_nspo.rewards import GuardEndpointReward

    guard = GuardEndpointReward("http://localhost:8000/v1", "meta-llama/Llama-Guard-3-8B")
    trainer = GRPOTrainer(model=..., reward_funcs=[guard], args=GRPOConfig(...), train_dataset=...)
    ```
    """

    _RETRYABLE_STATUS_CODES = frozenset({429, 500, 502, 503, 504})

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        safe_reward: float = 0.0,
        unsafe_reward: float = -1.0,
        include_prompt: bool = True,
        api_key: str | None = None,
        max_tokens: int = 32,
        timeout: float = 60.0,
        max_retries: int = 3,
        retry_backoff: float = 1.0,
        max_concurrency: int = 16,
    ):
        if max_concurrency < 1:
            raise ValueError(f"`max_concurrency` must be at least 1, got {max_concurrency}.")
        if max_retries < 0:
            raise ValueError(f"`max_retries` must be at least 0, got {max_retries}.")
        self.__name__ = "guard_endpoint_reward"
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.safe_reward = safe_reward
        self.unsafe_reward = unsafe_reward
        self.include_prompt = include_prompt
        self.api_key = api_key
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.max_concurrency = max_concurrency
        self.last_verdicts: list[GuardVerdict] = []

    def judge(self, prompts: list[Prompt], completions: list[Completion]) -> list[GuardVerdict]:
        """
        Ask the guard for a verdict on each prompt-response pair.

        Args:
            prompts (`list[str]` or `list[list[dict[str, str]]]`):
                Prompts, in standard or conversational format.
            completions (`list[str]` or `list[list[dict[str, str]]]`):
                Completions, in the same format as the prompts.

        Returns:
            `list[GuardVerdict]`: One verdict per pair, in input order.
        """
        conversations = [
            _guard_conversation(prompt, completion, self.include_prompt)
            for prompt, completion in zip(prompts, completions, strict=True)
        ]
        if not conversations:
            return []
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(conversations)))
        try:
            answers = list(pool.map(self._request_answer, conversations))
        finally:
            # On the first error, drop the queued requests instead of waiting for all of them to fail too.
            pool.shutdown(wait=True, cancel_futures=True)
        return [parse_guard_answer(answer) for answer in answers]

    def __call__(self, prompts: list[Prompt], completions: list[Completion], **kwargs) -> list[float]:
        self.last_verdicts = self.judge(prompts, completions)
        if "log_extra" in kwargs:  # passed by GRPOTrainer to add columns to its completions table
            kwargs["log_extra"](
                f"{self.__name__}_categories", [",".join(verdict.categories) for verdict in self.last_verdicts]
            )
        return [self.safe_reward if verdict.is_safe else self.unsafe_reward for verdict in self.last_verdicts]

    def _request_answer(self, messages: list[Message]) -> str:
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        headers = {"Content-Type": "application/json"}
        if self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        for attempt in range(self.max_retries + 1):
            is_last_attempt = attempt == self.max_retries
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
                break
            except urllib.error.HTTPError as error:
                if error.code not in self._RETRYABLE_STATUS_CODES or is_last_attempt:
                    detail = error.read().decode(errors="replace")
                    raise GuardEndpointError(
                        f"The guard endpoint {self.url} answered HTTP {error.code} after {attempt + 1} attempt(s): "
                        f"{detail!r:.300}. Check that the server is healthy and that `model={self.model!r}` is the "
                        "name it serves the guard under."
                    ) from error
            except (OSError, HTTPException) as error:  # connection refused or reset, DNS failure, timeout
                if is_last_attempt:
                    raise GuardEndpointError(
                        f"Could not reach the guard endpoint {self.url} after {attempt + 1} attempt(s): {error}. "
                        "Check that the server is running and that `base_url` points to its OpenAI-compatible API "
                        "(usually ending in `/v1`)."
                    ) from error
            time.sleep(self.retry_backoff * 2**attempt)
        try:
            answer = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise GuardEndpointError(
                f"The guard endpoint {self.url} answered {payload[:300]!r}, but an OpenAI chat completions response "
                "with `choices[0].message.content` was expected."
            ) from error
        if not isinstance(answer, str):
            raise GuardEndpointError(
                f"The guard endpoint {self.url} answered with message content {answer!r:.300}, but a string was "
                "expected."
            )
        return answer


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
                Prompts, in standard or conversational format.
            completions (`list[str]` or `list[list[dict[str, str]]]`):
                Completions, in the same format as the prompts.

        Returns:
            `list[float]`: `p_unsafe` in [0, 1] for each pair, in input order.
        """
        texts = [
            self.tokenizer.apply_chat_template(
                _guard_conversation(prompt, completion, self.include_prompt),
                tokenize=False,
                add_generation_prompt=True,
                **self.chat_template_kwargs,
            )
            + self.answer_prefix
            for prompt, completion in zip(prompts, completions, strict=True)
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


# How much each phrase says "this is a refusal", matched case-insensitively as whole words. Explicit refusals count
# fully; apologies and policy language nearly so; mentions of harm, then redirections to safer help, count less.
REFUSAL_PHRASE_WEIGHTS: dict[str, float] = {
    **dict.fromkeys(("i can't", "i cannot", "i can not", "i won't", "i will not", "i refuse", "i must decline"), 1.0),
    **dict.fromkeys(
        ("i'm unable to", "i am unable to", "i'm not able to", "i am not able to", "i'm not going to"), 1.0
    ),
    **dict.fromkeys(("i'm sorry", "i am sorry", "i apologize", "not able to", "against my", "not appropriate"), 0.7),
    **dict.fromkeys(("illegal", "harmful", "unsafe", "dangerous", "unethical", "inappropriate"), 0.4),
    **dict.fromkeys(("instead", "seek help", "professional help", "contact a professional", "reach out to"), 0.3),
    **dict.fromkeys(("i'd recommend", "i would recommend", "i recommend", "hotline", "emergency services"), 0.3),
}
# A phrase at character offset `i` counts `max(1 - i / 400, 0.5)` times its weight: refusals come first.
REFUSAL_POSITION_DECAY_CHARS = 400
REFUSAL_MIN_POSITION_FACTOR = 0.5


def refusal_score(text: str, phrase_weights: dict[str, float] | None = None) -> float:
    """
    Graded score in [0, 1] of how much a response reads like a refusal.

    Each distinct phrase of `phrase_weights` found in the response (case-insensitive, whole words, first occurrence,
    longest phrase first where phrases overlap) gives a cue strength `weight * max(1 - position / 400, 0.5)`, with
    `position` its character offset, and the cues combine as `1 - prod(1 - strength)`. So "I'm sorry, but I can't
    help with that." scores about 0.99, a response that only suggests professional help scores about 0.3, and one with
    none of the phrases scores 0.

    Args:
        text (`str`):
            The response.
        phrase_weights (`dict[str, float]` or `None`, *optional*, defaults to `None`):
            Lowercase phrases and their weights in [0, 1]. Defaults to [`REFUSAL_PHRASE_WEIGHTS`].

    Returns:
        `float`: The refusal score.
    """
    phrase_weights = REFUSAL_PHRASE_WEIGHTS if phrase_weights is None else phrase_weights
    phrases = sorted(phrase_weights, key=len, reverse=True)
    pattern = r"(?<!\w)(?:" + "|".join(re.escape(phrase) for phrase in phrases) + r")(?!\w)"
    first_positions: dict[str, int] = {}
    for match in re.finditer(pattern, text.lower().replace("\u2019", "'")):
        first_positions.setdefault(match.group(), match.start())
    not_refusal = 1.0
    for phrase, position in first_positions.items():
        position_factor = max(1.0 - position / REFUSAL_POSITION_DECAY_CHARS, REFUSAL_MIN_POSITION_FACTOR)
        not_refusal *= 1.0 - phrase_weights[phrase] * position_factor
    return 1.0 - not_refusal


class RefusalReward:
    """
    Rule-based refusal reward with an over-refusal penalty, for datasets that label each prompt harmful or benign.

    With `score = refusal_score(response)` (graded, see [`refusal_score`]), the reward is `score` for a harmful prompt
    and `-over_refusal_penalty * score` for a benign one: refusing harmful requests is rewarded, refusing benign ones
    is penalised, and complying gets 0 either way. No bonus for complying is needed: GRPO compares the completions of
    the same prompt, so a constant per prompt cancels in the advantage. The graded score matters because small chat
    models rarely refuse outright when sampling; partial refusal phrasing still gives a learning signal. Samples whose
    label is `None` get `None` (ignored by `GRPOTrainer`).

    Rule-based rewards are gameable: a policy can learn to say "I can't" or "instead" while still giving harmful
    content. Use it for shaping, alongside a guard model ([`GuardEndpointReward`] or [`LocalGuardReward`]) that
    judges the content, and not as the only safety signal of a real run.

    Args:
        harmful_column (`str`, *optional*, defaults to `"is_harmful"`):
            Dataset column holding a boolean for each prompt, `True` when the prompt is harmful.
        over_refusal_penalty (`float`, *optional*, defaults to `1.0`):
            Scale of the penalty for refusing a benign prompt.
        phrase_weights (`dict[str, float]` or `None`, *optional*, defaults to `None`):
            Refusal phrases and their weights; defaults to [`REFUSAL_PHRASE_WEIGHTS`].
    """

    def __init__(
        self,
        harmful_column: str = "is_harmful",
        over_refusal_penalty: float = 1.0,
        phrase_weights: dict[str, float] | None = None,
    ):
        self.__name__ = "refusal_reward"
        self.harmful_column = harmful_column
        self.over_refusal_penalty = over_refusal_penalty
        self.phrase_weights = phrase_weights

    def __call__(self, prompts: list[Prompt], completions: list[Completion], **kwargs) -> list[float | None]:
        if self.harmful_column not in kwargs:
            trainer_kwargs = {"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}
            columns = sorted(set(kwargs) - trainer_kwargs)
            raise ValueError(
                f"{self.__name__} needs a dataset column {self.harmful_column!r} holding True for harmful prompts and "
                f"False for benign ones, but the batch has the columns {columns}. Add that column to the dataset, or "
                "pass `harmful_column=` with the name of the column that holds the labels."
            )
        labels = kwargs[self.harmful_column]
        rewards = []
        for label, completion in zip(labels, completions, strict=True):
            if label is None:
                rewards.append(None)
                continue
            if not isinstance(label, bool | int) or label not in (0, 1):
                raise ValueError(
                    f"Column {self.harmful_column!r} must hold booleans (True for harmful prompts), got {label!r}."
                )
            score = refusal_score(completion_text(completion), self.phrase_weights)
            rewards.append(score if label else -self.over_refusal_penalty * score)
        return rewards
