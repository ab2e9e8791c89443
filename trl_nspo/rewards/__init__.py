"""Safety reward functions for TRL's `GRPOTrainer`, one module per family, and the registry `trl-nspo train` reads.

Every reward here is a callable `reward(prompts, completions, **kwargs) -> list[float | None]` with a `__name__`, so it
can be passed in `reward_funcs` as is; combine several with `GRPOConfig.reward_weights`. Prompts and completions may be
in TRL's standard format (strings) or conversational format (lists of `{"role", "content"}` messages).

- [`GuardEndpointReward`] (`guard_endpoint.py`): a guard model (e.g. Llama Guard) served behind an OpenAI-compatible
  chat completions API.
- [`LocalGuardReward`] (`local_guard.py`): a generative guard model loaded locally with transformers, scored from its
  next-token probabilities.
- [`RefusalReward`] (`refusal.py`): a rule-based, graded refusal score with an over-refusal penalty on benign prompts.

`registry.py` names them for the command line (`trl-nspo train --rewards NAME ...`), which also takes the dotted import
path of any reward function of the user's.
"""

from .completions import completion_text
from .guard_endpoint import GuardEndpointError, GuardEndpointReward, GuardVerdict, parse_guard_answer
from .local_guard import LocalGuardReward
from .refusal import REFUSAL_PHRASE_WEIGHTS, RefusalReward, refusal_score
from .registry import REWARDS, RewardArguments, RewardLoadingError, import_reward_function, reward_functions

__all__ = [
    "REFUSAL_PHRASE_WEIGHTS",
    "REWARDS",
    "GuardEndpointError",
    "GuardEndpointReward",
    "GuardVerdict",
    "LocalGuardReward",
    "RefusalReward",
    "RewardArguments",
    "RewardLoadingError",
    "completion_text",
    "import_reward_function",
    "parse_guard_answer",
    "refusal_score",
    "reward_functions",
]
