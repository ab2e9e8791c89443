"""The rewards `trl-nspo train` knows by name, the options they read, and user rewards loaded by dotted import path
(as TRL's `trl/scripts/grpo.py` loads `--reward_funcs`).

A new reward is its module in this package, one entry of [`REWARDS`] and, if it reads options, fields of
[`RewardArguments`]: the command line's choices, help, checks and construction all come from here.
"""

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from .guard_endpoint import GuardEndpointReward
from .local_guard import LocalGuardReward
from .refusal import RefusalReward

RewardFunction = Callable[..., list[float | None]]


class RewardLoadingError(ValueError):
    """A reward named on the command line is neither registered nor importable as a reward function."""


@dataclass(frozen=True)
class RegisteredReward:
    """
    A reward the command line knows by name.

    Args:
        description (`str`):
            What it rewards and what it needs, in one line of `--help`.
        build (`Callable[[RewardArguments], RewardFunction]`):
            Makes the reward function from the parsed arguments.
        required_options (`tuple[str, ...]`, *optional*, defaults to `()`):
            Fields of [`RewardArguments`] that must be set when this reward is chosen.
    """

    description: str
    build: Callable[["RewardArguments"], RewardFunction]
    required_options: tuple[str, ...] = ()


REWARDS: dict[str, RegisteredReward] = {
    "refusal": RegisteredReward(
        "rule-based, graded refusal score with a penalty for refusing benign prompts (`--over_refusal_penalty`)",
        lambda arguments: RefusalReward(over_refusal_penalty=arguments.over_refusal_penalty),
    ),
    "guard_endpoint": RegisteredReward(
        "a guard model's verdict (Llama Guard behind an OpenAI-compatible server such as vLLM)",
        lambda arguments: GuardEndpointReward(arguments.guard_base_url, arguments.guard_model),
        required_options=("guard_base_url", "guard_model"),
    ),
    "local_guard": RegisteredReward(
        "a guard model loaded with transformers, scored from its probability of answering unsafe",
        lambda arguments: LocalGuardReward(arguments.guard_model),
        required_options=("guard_model",),
    ),
}

_DOTTED_PATH_ADVICE = (
    "Name a reward function by its dotted import path, `module.function` or `package.module.function`, importable "
    "from the current folder or from an installed package."
)


def import_reward_function(path: str) -> RewardFunction:
    """
    Import a reward function by its dotted path, as TRL's GRPO script does for `--reward_funcs`. Modules in the current
    folder are importable without installing them.

    Args:
        path (`str`):
            The function's dotted import path, e.g. `"my_package.rewards.my_reward"` or `"my_rewards.length_reward"`
            for a file `my_rewards.py` in the current folder.

    Returns:
        `Callable`: The reward function, `reward(prompts, completions, **kwargs) -> list[float | None]`.

    Raises:
        [`RewardLoadingError`]: If the module cannot be found, does not define the name, or the name is not a function.
    """
    module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise RewardLoadingError(f"{path!r} is not a dotted import path. {_DOTTED_PATH_ADVICE}")
    # As in TRL's script: `trl-nspo` is a console script, whose `sys.path` does not hold the folder it runs in.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is None or not (module_name == error.name or module_name.startswith(error.name + ".")):
            raise  # the module exists, and an import inside it failed: its own traceback says where
        raise RewardLoadingError(
            f"Cannot load the reward {path!r}: there is no module {error.name!r} in the current folder "
            f"({os.getcwd()}) or among the installed packages. {_DOTTED_PATH_ADVICE}"
        ) from error
    if not hasattr(module, attribute):
        functions = sorted(
            name for name, value in vars(module).items() if callable(value) and not name.startswith("_")
        )
        raise RewardLoadingError(
            f"Cannot load the reward {path!r}: module {module_name!r} ({module.__file__}) has no {attribute!r}; it "
            f"defines {functions}. Check the spelling of the last part of the path."
        )
    reward = getattr(module, attribute)
    if isinstance(reward, type) or not callable(reward):
        kind = "a class" if isinstance(reward, type) else f"a {type(reward).__name__}"
        raise RewardLoadingError(
            f"{path!r} is {kind}, not a reward function. Point to a function `reward(prompts, completions, "
            "**kwargs) -> list[float | None]`, or, for a class like `RefusalReward`, to an instance of it defined in "
            "the module (e.g. `my_reward = MyReward()`)."
        )
    return reward


@dataclass
class RewardArguments:
    """
    The rewards of `trl-nspo train` and the options they read.

    Args:
        rewards (`list[str]`, *optional*, defaults to `["refusal"]`):
            Reward functions, each a name of [`REWARDS`] (`refusal`, `guard_endpoint`, `local_guard`) or the dotted
            import path of a reward function of yours (e.g. `my_package.rewards.my_reward`); weight them with
            `reward_weights`. Also spelled `--reward`.
        guard_base_url (`str`, *optional*):
            OpenAI-compatible endpoint of the guard model (e.g. `http://localhost:8000/v1`), for `guard_endpoint`.
        guard_model (`str`, *optional*):
            Model name served at `guard_base_url`, or the local guard model for `local_guard`.
        over_refusal_penalty (`float`, *optional*, defaults to `1.0`):
            Penalty scale of the refusal reward for refusing benign prompts.
    """

    rewards: list[str] = field(
        default_factory=lambda: ["refusal"],
        metadata={
            "help": "Reward functions: "
            + "; ".join(f"`{name}`: {reward.description}" for name, reward in REWARDS.items())
            + "; or the dotted import path of your own (e.g. `my_package.rewards.my_reward`, importable from the "
            "current folder). Weight them with `reward_weights`.",
            "aliases": ["--reward"],
        },
    )
    guard_base_url: str | None = field(
        default=None, metadata={"help": "OpenAI-compatible endpoint of the guard model, for `guard_endpoint`."}
    )
    guard_model: str | None = field(
        default=None, metadata={"help": "Guard model served at `guard_base_url`, or loaded locally for `local_guard`."}
    )
    over_refusal_penalty: float = field(
        default=1.0, metadata={"help": "Penalty scale for refusing benign prompts (refusal reward)."}
    )

    def __post_init__(self):
        unknown = [name for name in self.rewards if name not in REWARDS and "." not in name]
        if unknown:
            raise RewardLoadingError(
                f"Unknown reward(s) {unknown}; choose among {list(REWARDS)}. {_DOTTED_PATH_ADVICE}"
            )
        for name in self.rewards:
            required = REWARDS[name].required_options if name in REWARDS else ()
            if not all(getattr(self, option) for option in required):
                raise ValueError(
                    f"The `{name}` reward needs " + " and ".join(f"`--{option}`" for option in required) + "."
                )


def reward_functions(arguments: RewardArguments) -> list[RewardFunction]:
    """
    The reward functions named by `arguments.rewards`, in order: registered ones built from `arguments`, the others
    imported by their dotted path.

    Args:
        arguments ([`RewardArguments`]):
            The parsed reward arguments.

    Returns:
        `list[Callable]`: Reward functions for `GRPOTrainer`'s `reward_funcs`.
    """
    return [
        REWARDS[name].build(arguments) if name in REWARDS else import_reward_function(name)
        for name in arguments.rewards
    ]
