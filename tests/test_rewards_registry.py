"""`trl_nspo/rewards/registry.py`: the rewards known by name, their checks, and user rewards by dotted import path."""

import sys
import uuid

import pytest

import trl_nspo.rewards
from trl_nspo.rewards import REWARDS, RewardArguments, RewardLoadingError, import_reward_function, reward_functions


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Writes a module of the user's into a fresh current folder; returns its (unique) name."""
    name = f"my_rewards_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "def length_reward(prompts, completions, **kwargs):\n"
        "    return [float(len(completion)) for completion in completions]\n\n"
        "class LengthReward:\n"
        "    def __call__(self, prompts, completions, **kwargs):\n"
        "        return [0.0] * len(completions)\n\n"
        "THRESHOLD = 3\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the loader adds the current folder, as TRL's script does
    yield name
    sys.modules.pop(name, None)


def test_every_reward_class_is_registered_under_its_name(tiny_model_dir):
    arguments = RewardArguments(
        rewards=list(REWARDS), guard_base_url="http://localhost:8000/v1", guard_model=str(tiny_model_dir)
    )
    built = reward_functions(arguments)
    # Each registered name builds the reward whose `__name__` GRPOTrainer logs it under...
    assert [reward.__name__ for reward in built] == [f"{name}_reward" for name in REWARDS]
    # ...and no reward class of the package is missing from the registry.
    reward_classes = {name for name in trl_nspo.rewards.__all__ if name.endswith("Reward")}
    assert {type(reward).__name__ for reward in built} == reward_classes


def test_registered_rewards_read_their_options():
    options = dict(rewards=["refusal", "guard_endpoint"], over_refusal_penalty=0.25, guard_model="guard")
    with pytest.raises(ValueError, match="`guard_endpoint` reward needs `--guard_base_url` and `--guard_model`"):
        RewardArguments(**options)
    refusal, guard = reward_functions(RewardArguments(**options, guard_base_url="http://localhost:8000/v1/"))
    assert refusal.over_refusal_penalty == 0.25
    assert (guard.url, guard.model) == ("http://localhost:8000/v1/chat/completions", "guard")


def test_unknown_name_lists_the_registry_and_the_dotted_path_form():
    with pytest.raises(RewardLoadingError, match=r"Unknown reward\(s\) \['llama'\]; choose among \['refusal', "):
        RewardArguments(rewards=["llama"])
    with pytest.raises(ValueError, match="dotted import path"):
        RewardArguments(rewards=["refusal", "llama"])


def test_dotted_path_loads_a_function_from_the_current_folder(user_module):
    arguments = RewardArguments(rewards=["refusal", f"{user_module}.length_reward"])
    refusal, length_reward = reward_functions(arguments)
    assert refusal.__name__ == "refusal_reward"
    assert length_reward.__name__ == "length_reward"
    assert length_reward(["Hi"], ["Hello", "Hi"]) == [5.0, 2.0]


def test_dotted_path_loads_installed_functions():
    assert import_reward_function("trl_nspo.rewards.refusal_score") is trl_nspo.rewards.refusal_score


@pytest.mark.parametrize(
    "path, message",
    [
        ("not_a_module_anywhere.reward", r"no module 'not_a_module_anywhere' in the current folder .*dotted import"),
        ("{module}.lenght_reward", r"has no 'lenght_reward'; it defines \['LengthReward', 'length_reward'\]"),
        ("{module}.THRESHOLD", r"is a int, not a reward function\. Point to a function `reward\(prompts, "),
        ("{module}.LengthReward", r"is a class, not a reward function.*an instance of it"),
        ("trl_nspo.", r"not a dotted import path"),
    ],
)
def test_bad_dotted_path_names_the_problem_and_the_fix(user_module, path, message):
    with pytest.raises(RewardLoadingError, match=message):
        import_reward_function(path.format(module=user_module))


def test_a_failing_import_inside_the_user_module_is_not_hidden(user_module, tmp_path):
    (tmp_path / f"{user_module}_broken.py").write_text("import a_dependency_that_is_not_installed\n")
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_not_installed") as error:
        import_reward_function(f"{user_module}_broken.reward")
    assert not isinstance(error.value, RewardLoadingError)
