import pytest
import torch
from datasets import Dataset

from trl_nspo.calibration_data import CalibrationSettings, calibration_token_sequences
from trl_nspo.null_space import NullSpaceError

CHAT_PROMPTS = [
    [{"role": "user", "content": "What is 12 times 7?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves falling on a quiet river."}],
]
NO_COMPLETIONS = CalibrationSettings(generate_completions=False, batch_size=2, sketch_dim=0)


def chat_ids(tokenizer, messages, add_generation_prompt=True) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)["input_ids"])


class TestSequences:
    def test_each_dataset_format_is_rendered_as_trl_does(self, tiny_model, tiny_tokenizer):
        settings = CalibrationSettings(generate_completions=False)
        conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        cases = {
            "prompt": (CHAT_PROMPTS[:1], chat_ids(tiny_tokenizer, CHAT_PROMPTS[0])),
            "messages": ([conversation], chat_ids(tiny_tokenizer, conversation, add_generation_prompt=False)),
            "text": (["Plain text."], tiny_tokenizer("Plain text.")["input_ids"]),
        }
        for column, (values, expected) in cases.items():
            dataset = Dataset.from_dict({column: values})
            sequences, counts = calibration_token_sequences(tiny_model, tiny_tokenizer, dataset, settings, False)
            assert sequences == [list(expected)], column
            assert counts["rows"] == 1

    def test_greedy_completions_match_unbatched_generation(self, tiny_model, tiny_tokenizer):
        settings = CalibrationSettings(completion_length=6, batch_size=2)
        dataset = Dataset.from_dict({"prompt": CHAT_PROMPTS})
        sequences, counts = calibration_token_sequences(tiny_model, tiny_tokenizer, dataset, settings, False)
        for prompt, sequence in zip(CHAT_PROMPTS, sequences, strict=True):
            ids = torch.tensor([chat_ids(tiny_tokenizer, prompt)])
            alone = tiny_model.generate(ids, max_new_tokens=6, do_sample=False)[0].tolist()
            assert sequence == alone
        assert counts["generated_tokens"] == sum(len(s) for s in sequences) - sum(
            len(chat_ids(tiny_tokenizer, p)) for p in CHAT_PROMPTS
        )

    def test_truncation_is_applied_and_counted(self, tiny_model, tiny_tokenizer):
        dataset = Dataset.from_dict({"text": ["short", "a much longer text that will not fit in eight tokens at all"]})
        settings = CalibrationSettings(generate_completions=False, max_length=8)
        sequences, counts = calibration_token_sequences(tiny_model, tiny_tokenizer, dataset, settings, False)
        assert max(len(s) for s in sequences) == 8 and counts["truncated_rows"] == 1

    def test_num_samples_takes_the_first_rows(self, tiny_model, tiny_tokenizer):
        dataset = Dataset.from_dict({"text": ["one", "two", "three"]})
        settings = CalibrationSettings(generate_completions=False, num_samples=2)
        sequences, _ = calibration_token_sequences(tiny_model, tiny_tokenizer, dataset, settings, False)
        assert sequences == [tiny_tokenizer(t)["input_ids"] for t in ("one", "two")]

    @pytest.mark.parametrize(
        "data, message",
        [
            ({"text": []}, "calibration dataset is empty"),
            ({"question": ["What?"]}, "needs one of 'prompt'"),
            ({"text": ["", ""]}, "tokenized to nothing"),
        ],
    )
    def test_bad_datasets_are_refused(self, tiny_model, tiny_tokenizer, data, message):
        with pytest.raises(NullSpaceError, match=message):
            calibration_token_sequences(tiny_model, tiny_tokenizer, Dataset.from_dict(data), NO_COMPLETIONS, False)


def test_a_prompt_ending_with_an_assistant_message_is_continued_as_trl_does(tiny_model, tiny_tokenizer):
    prompt = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]
    dataset = Dataset.from_dict({"prompt": [prompt]})
    settings = CalibrationSettings(generate_completions=False)
    sequences, _ = calibration_token_sequences(tiny_model, tiny_tokenizer, dataset, settings, False)
    continued = tiny_tokenizer.apply_chat_template(prompt, continue_final_message=True)["input_ids"]
    assert sequences == [list(continued)]
    assert tiny_tokenizer.decode(sequences[0]).rstrip().endswith("The colour is")


def test_sampled_user_prompts_are_complete_distinct_user_turns(tiny_model, tiny_tokenizer):
    from trl_nspo.calibration_data import sampled_user_prompts, user_turn_prefix

    assert user_turn_prefix(tiny_tokenizer) == "<|user|>"
    # Make the end-of-turn token likely after any text, so that some samples end within the limit: its output
    # embedding along the mean final hidden state gives it a logit of about 3.
    end = tiny_tokenizer.convert_tokens_to_ids("<|end|>")
    tiny_model.generation_config.eos_token_id = end
    with torch.no_grad():
        ids = torch.tensor([tiny_tokenizer("<|user|>What is 12 times 7?")["input_ids"]])
        hidden = tiny_model.model(input_ids=ids).last_hidden_state[0].mean(dim=0)
        tiny_model.lm_head.weight[end] = 3.0 * hidden / hidden.square().sum()
    state = torch.random.get_rng_state()
    prompts = sampled_user_prompts(tiny_model, tiny_tokenizer, 32, max_new_tokens=12, batch_size=16, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is left as it was
    assert prompts and len(prompts) == len(set(prompts)) < 32
    assert all(prompt and "<|end|>" not in prompt for prompt in prompts)
    assert prompts == sampled_user_prompts(tiny_model, tiny_tokenizer, 32, max_new_tokens=12, batch_size=16, seed=3)


def test_user_turn_prefix_needs_a_chat_template(tiny_tokenizer):
    from trl_nspo.calibration_data import user_turn_prefix

    tiny_tokenizer.chat_template = None
    with pytest.raises(NullSpaceError, match="no chat template"):
        user_turn_prefix(tiny_tokenizer)
