import pytest

from trl_nspo.demo import demo_safety_dataset, embedded_prompts

EMBEDDED_SIZES = {
    "harmful_train": 60,
    "harmful_eval": 30,
    "benign_train": 30,
    "benign_eval": 30,
    "general_calibration": 80,
    "general_eval": 40,
    "harmful_heldout": 120,
    "benign_heldout": 120,
    "general_heldout": 120,
}
CONVERSATION_SIZES = {"general_conversations": 768, "general_conversations_heldout": 226}
# Sets nothing in this project trains or calibrates on, and those it does.
HELD_OUT = ("harmful_eval", "harmful_heldout", "benign_eval", "benign_heldout", "general_eval", "general_heldout")
TRAINED_OR_CALIBRATED = ("harmful_train", "benign_train", "general_calibration")


def contents(dataset):
    return [prompt[0]["content"] for prompt in dataset["prompt"]]


class TestEmbeddedPrompts:
    @pytest.mark.parametrize("name", list(EMBEDDED_SIZES))
    def test_sizes_and_format(self, name):
        dataset = embedded_prompts(name)

        assert len(dataset) == EMBEDDED_SIZES[name]
        assert all(len(prompt) == 1 and prompt[0]["role"] == "user" for prompt in dataset["prompt"])
        assert all(text.strip() for text in contents(dataset))
        assert len(set(contents(dataset))) == len(dataset)
        if name.startswith(("harmful_", "benign_")):
            assert dataset.column_names == ["prompt", "is_harmful"]
            assert set(dataset["is_harmful"]) == {name.startswith("harmful_")}
        elif name in ("general_eval", "general_heldout"):
            assert dataset.column_names == ["prompt", "answer"]
        else:
            assert dataset.column_names == ["prompt"]

    @pytest.mark.parametrize(
        ("train", "evaluation"),
        [("harmful_train", "harmful_eval"), ("benign_train", "benign_eval"), ("general_calibration", "general_eval")],
    )
    def test_train_and_eval_are_disjoint(self, train, evaluation):
        assert not set(contents(embedded_prompts(train))) & set(contents(embedded_prompts(evaluation)))

    def test_no_held_out_prompt_is_trained_or_calibrated_on(self):
        held_out = [text.lower() for name in HELD_OUT for text in contents(embedded_prompts(name))]
        assert len(held_out) == len(set(held_out))
        used = {text.lower() for name in TRAINED_OR_CALIBRATED for text in contents(embedded_prompts(name))}
        used |= {row[0]["content"].lower() for row in embedded_prompts("general_conversations")["messages"]}
        assert not used & set(held_out)

    @pytest.mark.parametrize("name", list(CONVERSATION_SIZES))
    def test_conversations_are_a_user_turn_and_the_models_answer(self, name):
        dataset = embedded_prompts(name)
        assert len(dataset) == CONVERSATION_SIZES[name] and dataset.column_names == ["messages"]
        assert all([m["role"] for m in row] == ["user", "assistant"] for row in dataset["messages"])
        assert all(row[0]["content"].strip() and row[1]["content"].strip() for row in dataset["messages"])

    def test_held_out_conversations_are_not_in_the_calibration_set(self):
        def users(name):
            return {row[0]["content"] for row in embedded_prompts(name)["messages"]}

        assert not users("general_conversations") & users("general_conversations_heldout")

    def test_general_eval_answers(self):
        dataset = embedded_prompts("general_eval")
        answers = dict(zip(contents(dataset), dataset["answer"], strict=True))

        assert answers["What is 7 + 5? Answer with a number only."] == "12"
        assert answers["What is the capital of France? Answer with one word."] == "Paris"
        assert sum(answer is not None for answer in answers.values()) >= 20

    def test_unknown_set(self):
        with pytest.raises(ValueError, match="Unknown embedded prompt set 'harmful'.*'harmful_train'"):
            embedded_prompts("harmful")

    @pytest.mark.parametrize(("split", "harmful", "benign"), [("train", 60, 30), ("eval", 30, 30)])
    def test_demo_safety_dataset(self, split, harmful, benign):
        dataset = demo_safety_dataset(split)

        assert dataset.column_names == ["prompt", "is_harmful"]
        assert dataset["is_harmful"] == [True] * harmful + [False] * benign

    def test_demo_safety_dataset_unknown_split(self):
        with pytest.raises(ValueError, match="`split` must be 'train' or 'eval'"):
            demo_safety_dataset("test")
