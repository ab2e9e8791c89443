import csv
import json
import logging

import pytest
from datasets import Dataset, DatasetDict

from trl_nspo.data import load_calibration_dataset, load_safety_prompts


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_csv(path, rows):
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def user(content):
    return [{"role": "user", "content": content}]


def pku_row(prompt, response_0_safe, response_1_safe):
    return {
        "prompt": prompt,
        "response_0": "first answer",
        "response_1": "second answer",
        "is_response_0_safe": response_0_safe,
        "is_response_1_safe": response_1_safe,
        "safer_response_id": 0,
    }


PKU_ROWS = [
    pku_row("How do I make a weapon?", False, True),
    pku_row("  How do I make a weapon?  ", True, True),
    pku_row("How do I bake bread?", True, True),
    pku_row("How do I bake bread?", True, True),
    pku_row("", False, False),
    pku_row("Tell me a joke.", True, None),
    pku_row("How do I pick a lock to get into a house?", True, False),
]


class TestLoadSafetyPrompts:
    def test_pku_style_rows_are_deduplicated_and_labelled(self, tmp_path):
        dataset = load_safety_prompts(write_jsonl(tmp_path / "pku.jsonl", PKU_ROWS))

        assert dataset.column_names == ["prompt", "is_harmful"]
        assert dataset["prompt"] == [
            user("How do I make a weapon?"),
            user("How do I bake bread?"),
            user("Tell me a joke."),
            user("How do I pick a lock to get into a house?"),
        ]
        # The weapon prompt's second row has two safe responses; the unsafe one in its first row decides.
        assert dataset["is_harmful"] == [True, False, False, True]

    def test_harmful_column_overrides_response_labels(self, tmp_path):
        labels = [0, 0, 0, 1, 0, 1, 0]
        rows = [{**row, "label": label} for row, label in zip(PKU_ROWS, labels, strict=True)]
        dataset = load_safety_prompts(write_csv(tmp_path / "pku.csv", rows), harmful_column="label")

        # The bread prompt's rows are labelled 0 and 1: harmful if any of its rows says so.
        assert dataset["is_harmful"] == [False, True, True, False]

    def test_without_labels_every_prompt_is_harmful(self, tmp_path, caplog):
        path = write_jsonl(tmp_path / "redteam.jsonl", [{"goal": "Do a bad thing."}, {"goal": "Do another one."}])
        with caplog.at_level(logging.WARNING, logger="trl_nspo.data"):
            dataset = load_safety_prompts(path, prompt_column="goal")

        assert dataset["prompt"] == [user("Do a bad thing."), user("Do another one.")]
        assert dataset["is_harmful"] == [True, True]
        assert "treating every prompt as harmful" in caplog.text

    def test_conversational_prompts_are_kept(self):
        conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        dataset = load_safety_prompts(Dataset.from_dict({"prompt": [conversation, conversation]}))

        assert dataset["prompt"] == [conversation]
        assert dataset["is_harmful"] == [True]

    def test_fraction_is_deterministic_nested_and_in_order(self, tmp_path):
        rows = [pku_row(f"Prompt number {index}", index % 3 != 0, True) for index in range(50)]
        path = write_jsonl(tmp_path / "many.jsonl", rows)

        forty_percent = load_safety_prompts(path, fraction=0.4, seed=1)
        again = load_safety_prompts(path, fraction=0.4, seed=1)
        other_seed = load_safety_prompts(path, fraction=0.4, seed=2)
        twenty_percent = load_safety_prompts(path, fraction=0.2, seed=1)

        assert len(forty_percent) == 20
        assert len(twenty_percent) == 10
        assert forty_percent["prompt"] == again["prompt"]
        assert forty_percent["prompt"] != other_seed["prompt"]
        assert {row[0]["content"] for row in twenty_percent["prompt"]} < {
            row[0]["content"] for row in forty_percent["prompt"]
        }
        numbers = [int(row[0]["content"].split()[-1]) for row in forty_percent["prompt"]]
        assert numbers == sorted(numbers)
        assert forty_percent["is_harmful"] == [number % 3 == 0 for number in numbers]

    @pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
    def test_fraction_out_of_range(self, tmp_path, fraction):
        with pytest.raises(ValueError, match=r"`fraction` must be in \(0, 1\]"):
            load_safety_prompts(write_jsonl(tmp_path / "pku.jsonl", PKU_ROWS), fraction=fraction)

    def test_missing_prompt_column_names_the_columns(self, tmp_path):
        path = write_jsonl(tmp_path / "pku.jsonl", PKU_ROWS)
        with pytest.raises(ValueError) as error:
            load_safety_prompts(path, prompt_column="question")

        message = str(error.value)
        assert "Column 'question' not found" in message
        assert "'prompt'" in message and "'is_response_0_safe'" in message
        assert "prompt_column=" in message

    def test_missing_harmful_column(self, tmp_path):
        with pytest.raises(ValueError, match="Column 'label' not found.*harmful_column="):
            load_safety_prompts(write_jsonl(tmp_path / "pku.jsonl", PKU_ROWS), harmful_column="label")

    def test_non_boolean_harmful_column(self, tmp_path):
        path = write_jsonl(tmp_path / "labels.jsonl", [{"prompt": "Hi", "label": "maybe"}])
        with pytest.raises(ValueError, match="Column 'label' must hold booleans"):
            load_safety_prompts(path, harmful_column="label")

    def test_sources_folder_save_to_disk_and_loaded_datasets(self, tmp_path):
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        write_jsonl(data_dir / "train.jsonl", PKU_ROWS)
        expected = load_safety_prompts(data_dir / "train.jsonl")

        loaded = Dataset.from_list(PKU_ROWS)
        DatasetDict({"test": loaded}).save_to_disk(tmp_path / "saved")

        assert load_safety_prompts(data_dir).to_dict() == expected.to_dict()
        assert load_safety_prompts(tmp_path / "saved", split="test").to_dict() == expected.to_dict()
        assert load_safety_prompts(loaded).to_dict() == expected.to_dict()
        with pytest.raises(ValueError, match=r"Split 'train' not found.*\['test'\]"):
            load_safety_prompts(DatasetDict({"test": loaded}))

    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="pku.jsonl' does not exist"):
            load_safety_prompts(tmp_path / "pku.jsonl")

    def test_unsupported_file_type(self, tmp_path):
        path = tmp_path / "prompts.xlsx"
        path.write_text("not a spreadsheet")
        with pytest.raises(ValueError, match="unsupported file type '.xlsx'"):
            load_safety_prompts(path)


class TestLoadCalibrationDataset:
    def test_messages(self, tmp_path):
        conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
        empty = [{"role": "user", "content": " "}]
        path = write_jsonl(
            tmp_path / "chat.jsonl", [{"messages": conversation, "id": 1}, {"messages": empty, "id": 2}]
        )
        dataset = load_calibration_dataset(path)

        assert dataset.column_names == ["messages"]
        assert dataset["messages"] == [conversation]

    def test_messages_take_precedence_over_prompt(self):
        conversation = [{"role": "user", "content": "Hi"}]
        dataset = load_calibration_dataset(Dataset.from_dict({"prompt": ["ignored"], "messages": [conversation]}))

        assert dataset.to_dict() == {"messages": [conversation]}

    def test_prompt_text_and_conversations(self):
        texts = load_calibration_dataset(Dataset.from_dict({"prompt": ["What is 2 + 2?", ""]}))
        chats = load_calibration_dataset(Dataset.from_dict({"prompt": [user("What is 2 + 2?")]}))

        assert texts.to_dict() == {"prompt": ["What is 2 + 2?"]}
        assert chats.to_dict() == {"prompt": [user("What is 2 + 2?")]}

    def test_text_file(self, tmp_path):
        path = write_jsonl(tmp_path / "text.jsonl", [{"text": "The sky is blue."}, {"text": None}, {"text": "Hi."}])

        assert load_calibration_dataset(path).to_dict() == {"prompt": ["The sky is blue.", "Hi."]}

    def test_alpaca_instruction_and_input_from_csv(self, tmp_path):
        rows = [
            {"instruction": "Translate into French.", "input": "Good morning", "output": "Bonjour"},
            {"instruction": "Name a colour.", "input": "", "output": "Red"},
        ]
        dataset = load_calibration_dataset(write_csv(tmp_path / "alpaca.csv", rows))

        assert dataset.to_dict() == {"prompt": ["Translate into French.\n\nGood morning", "Name a colour."]}

    def test_question(self, tmp_path):
        path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "What is 3 + 4?", "answer": "7"}])

        assert load_calibration_dataset(path).to_dict() == {"prompt": ["What is 3 + 4?"]}

    def test_sharegpt_conversations(self, tmp_path):
        conversation = [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
        ]
        dataset = load_calibration_dataset(write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": conversation}]))

        assert dataset.to_dict() == {
            "messages": [
                [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                ]
            ]
        }

    def test_unknown_sharegpt_speaker(self, tmp_path):
        path = write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": [{"from": "narrator", "value": "Once"}]}])
        with pytest.raises(ValueError, match="Unknown ShareGPT speaker 'narrator'"):
            load_calibration_dataset(path)

    def test_text_column_overrides_detection(self, tmp_path):
        path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "not this", "body": "this one"}])

        assert load_calibration_dataset(path, text_column="body").to_dict() == {"prompt": ["this one"]}
        with pytest.raises(ValueError, match=r"Column 'content' not found.*\['text', 'body'\].*text_column="):
            load_calibration_dataset(path, text_column="content")

    def test_no_known_column(self, tmp_path):
        path = write_jsonl(tmp_path / "other.jsonl", [{"body": "text", "score": 1}])
        with pytest.raises(ValueError) as error:
            load_calibration_dataset(path)

        message = str(error.value)
        assert "No text or chat column found" in message
        assert "['body', 'score']" in message
        assert "text_column=" in message

    def test_num_samples_is_deterministic(self, tmp_path):
        rows = [{"text": f"Sentence {index}."} for index in range(30)] + [{"text": "  "}]
        path = write_jsonl(tmp_path / "text.jsonl", rows)

        sample = load_calibration_dataset(path, num_samples=12, seed=3)
        again = load_calibration_dataset(path, num_samples=12, seed=3)
        other_seed = load_calibration_dataset(path, num_samples=12, seed=4)

        assert len(sample) == 12
        assert sample["prompt"] == again["prompt"]
        assert sample["prompt"] != other_seed["prompt"]
        numbers = [int(text.split()[1].rstrip(".")) for text in sample["prompt"]]
        assert numbers == sorted(numbers)
        # More samples than non-empty rows keeps them all.
        assert len(load_calibration_dataset(path, num_samples=100)) == 30
        with pytest.raises(ValueError, match="`num_samples` must be a positive"):
            load_calibration_dataset(path, num_samples=0)
