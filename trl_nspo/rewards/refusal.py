"""A rule-based, graded refusal reward with an over-refusal penalty on benign prompts: no model, no server."""

import re

from .completions import Completion, Prompt, completion_text

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
