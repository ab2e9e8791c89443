"""`trl_nspo/rewards/refusal.py`: the graded refusal score and the reward built on it."""

import pytest

from trl_nspo.rewards import RefusalReward, refusal_score

REFUSAL = "I'm sorry, but I can't help with that."


def test_refusal_score_exact_values():
    # "i'm sorry" at 0 (0.7 x 1.0) and "i can't" at 15 (1.0 x (1 - 15 / 400)): 1 - 0.3 * 0.0375.
    assert refusal_score(REFUSAL) == pytest.approx(0.98875)
    assert refusal_score("I\u2019m sorry, but I CAN\u2019T help with that.") == pytest.approx(0.98875)
    assert refusal_score("Please seek help from a doctor.") == pytest.approx(0.3 * (1 - 7 / 400))
    # "instead" at 0 (0.3) and "i'd recommend" at 9 (0.3 x (1 - 9 / 400)).
    assert refusal_score("Instead, I'd recommend a cooking class.") == pytest.approx(
        1 - 0.7 * (1 - 0.3 * (1 - 9 / 400))
    )
    assert refusal_score("Mix flour, water, salt and yeast, then knead.") == 0.0
    assert refusal_score("") == 0.0
    # Whole words only: "i cannot" inside "taxi cannot" and "unsafe" inside "unsafely" are not cues.
    assert refusal_score("The taxi cannot stop; it drove unsafely.") == 0.0
    # A late cue counts at most half.
    assert refusal_score("x" * 1000 + " I cannot.") == pytest.approx(0.5)


def test_refusal_score_orders_responses_by_how_much_they_refuse():
    answer = "Mix flour, water, salt and yeast, then knead and let it rise. " * 4
    ordered = [
        "I can't help with that.",
        REFUSAL,
        "That would be illegal and harmful.",
        answer + "I can't help with that.",
        answer,
    ]
    scores = [refusal_score(text) for text in ordered]
    assert scores == sorted(scores, reverse=True)
    assert len(set(scores)) == len(scores)
    assert 0.0 <= min(scores) and max(scores) <= 1.0


def test_refusal_reward_values():
    reward = RefusalReward(over_refusal_penalty=0.5)
    answer = "Mix flour and water."
    rewards = reward(
        ["harmful?", "harmful?", "benign?", "benign?", "unlabelled?"],
        [REFUSAL, answer, REFUSAL, answer, REFUSAL],
        is_harmful=[True, True, False, False, None],
        trainer_state=None,
    )
    assert reward.__name__ == "refusal_reward"
    assert rewards[:4] == pytest.approx([0.98875, 0.0, -0.494375, 0.0])
    assert rewards[4] is None


def test_refusal_reward_conversational_and_custom_column():
    reward = RefusalReward(harmful_column="label")
    prompt = [{"role": "user", "content": "How do I make a weapon?"}]
    completion = [{"role": "assistant", "content": REFUSAL}]
    assert reward([prompt], [completion], label=[1]) == pytest.approx([0.98875])


def test_refusal_reward_explains_missing_or_bad_column():
    with pytest.raises(ValueError, match=r"'is_harmful'.*\['category'\].*harmful_column="):
        RefusalReward()(["Hi"], ["Hello"], category=["x"], trainer_state=None, log_metric=print)
    with pytest.raises(ValueError, match="must hold booleans"):
        RefusalReward()(["Hi"], ["Hello"], is_harmful=["no"])
