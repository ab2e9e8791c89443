"""Reward from a guard model (e.g. Llama Guard) served behind an OpenAI-compatible chat completions API.

The client is the standard library's `urllib`, not `huggingface_hub.InferenceClient`: the Hub client's shared session
refuses every request, local ones included, when `HF_HUB_OFFLINE=1`, and a training job next to a self-hosted guard
often runs offline. `openai` is not a dependency.
"""

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPException

from .completions import Completion, Message, Prompt, guard_conversations


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
        conversations = guard_conversations(prompts, completions, self.include_prompt)
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
