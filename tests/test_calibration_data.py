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
