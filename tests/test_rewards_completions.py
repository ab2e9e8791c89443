"""`trl_nspo/rewards/completions.py`: reading TRL's completion formats and building what a guard judges."""

import pytest

from trl_nspo.rewards.completions import completion_text, guard_conversations


def test_completion_text_reads_both_formats():
    assert completion_text("Paris.") == "Paris."
    assert completion_text([{"role": "assistant", "content": "Paris."}]) == "Paris."
    tool_turns = [
        {"role": "assistant", "content": "Let me check."},
        {"role": "tool", "content": "capital=Paris"},
        {"role": "assistant", "content": "Paris."},
    ]
    assert completion_text(tool_turns) == "Let me check.\nParis."
    with pytest.raises(TypeError, match="string or a list of message dicts"):
        completion_text(42)


def test_guard_conversations_keep_the_turns_a_guard_template_accepts():
    system = {"role": "system", "content": "You are helpful."}
    user = {"role": "user", "content": "Anything dangerous?"}
    answer = [{"role": "assistant", "content": "No."}]
    assert guard_conversations([[system, user], "Hi"], [answer, "Hello!"], include_prompt=True) == [
        [user, {"role": "assistant", "content": "No."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    ]
    # Without the prompt, the response is judged alone, as the user turn a guard template expects.
    assert guard_conversations(["Hi"], ["Hello!"], include_prompt=False) == [[{"role": "user", "content": "Hello!"}]]
    with pytest.raises(ValueError):  # one completion per prompt: a silent truncation would misalign rewards
        guard_conversations(["Hi", "Hey"], ["Hello!"], include_prompt=True)
