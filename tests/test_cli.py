import json
import re
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest
from datasets import Dataset
from test_trainer import TRAIN, config, length_reward, lora

from trl_nspo import NSPOConfig, NSPOTrainer, NullSpaceError, NullSpaceProjectors
from trl_nspo.cli import main
from trl_nspo.commands import CALIBRATE_OPTIONS, TrainArguments, calibrate_parser, train_parser
from trl_nspo.data import load_calibration_dataset
from trl_nspo.projectors import PROJECTORS_FILE_NAME
from trl_nspo.rewards import REWARDS, RewardLoadingError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def general_file(tmp_path):
    rows = [{"text": "What is 12 times 7? It is 84."}, {"text": "Write a haiku about autumn leaves."}]
    return write_jsonl(tmp_path / "general.jsonl", rows)


def readme_command(command: str) -> list[str]:
    """The arguments of the README's `trl-nspo COMMAND …` example, continuation lines joined."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    match = re.search(rf"^trl-nspo {command} ((?:.*\\\n)*.*)$", readme, flags=re.MULTILINE)
    return [command, *shlex.split(match.group(1).replace("\\\n", " "))]


def with_flags(argv: list[str], replaced: dict[str, list[str] | None]) -> list[str]:
    """`argv` with the values of the flags in `replaced` replaced (`None`: the flag is dropped)."""
    result, index = [], 0
    while index < len(argv):
        end = index + 1
        while end < len(argv) and not argv[end].startswith("--"):
            end += 1
        flag = argv[index].removeprefix("--")
        if flag not in replaced:
            result += argv[index:end]
        elif replaced[flag] is not None:
            result += [argv[index], *replaced[flag]]
        index = end
    return result


def train_with_a_recording_trainer(argv: list[str], projectors: Path) -> dict:
    """Runs `trl-nspo train ARGV` with an `NSPOTrainer` that only records the arguments it is given."""
    given = {}

    class RecordingTrainer(mock.MagicMock):
        def __init__(self, **kwargs):
            super().__init__()
            given.update(kwargs)
            self.projectors_file = projectors / PROJECTORS_FILE_NAME

    with mock.patch("trl_nspo.nspo_trainer.NSPOTrainer", RecordingTrainer):
        main(["train", *argv])
    return given


def test_usage_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "calibrate" in capsys.readouterr().err


def test_calibrate_help_lists_only_what_calibrate_reads(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    # Every GRPOConfig/TrainingArguments flag was listed before: 1,421 lines.
    assert len(printed.splitlines()) <= 200
    for option in ("--model_name_or_path", "--lora_target_modules", "--null_space_energy", "--output_dir"):
        assert option in printed
    for training_option in ("--learning_rate", "--num_generations", "--beta", "--bf16"):
        assert training_option not in printed
    # A renamed field would silently drop out of the help.
    assert CALIBRATE_OPTIONS <= {action.dest for action in calibrate_parser()._actions}


def test_calibrate_writes_projectors_for_the_adapter_targets(tiny_model_dir, general_file, tmp_path, capsys):
    output = tmp_path / "projectors"
    main(
        [
            "calibrate",
            "--model_name_or_path", str(tiny_model_dir),
            "--calibration_dataset_name", str(general_file),
            "--output_dir", str(output),
            "--use_peft", "--lora_target_modules", "q_proj", "v_proj",
            "--calibration_generate_completions", "false",
            "--null_space_rule", "relative", "--null_space_alpha", "1e-9",
            "--use_cpu", "--bf16", "false",
        ]
    )  # fmt: skip
    projectors = NullSpaceProjectors.load(output)
    assert sorted(projectors.null_dims()) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "v")
    )
    assert projectors.rule.alpha == 1e-9
    assert projectors.calibration.generate_completions is False
    assert "Saved 4 module projectors" in capsys.readouterr().out


def test_calibrate_refuses_an_unusable_null_space_before_writing_a_file(tiny_model_dir, tmp_path):
    long_text = write_jsonl(tmp_path / "long.jsonl", [{"text": " ".join(f"w{i}" for i in range(200))}])
    arguments = [
        "calibrate",
        "--model_name_or_path", str(tiny_model_dir),
        "--calibration_dataset_name", str(long_text),
        "--calibration_max_length", "200",
        "--output_dir", str(tmp_path / "projectors"),
        "--use_peft", "--lora_target_modules", "q_proj", "v_proj", "--lora_r", "1",
        "--use_cpu", "--bf16", "false",
    ]  # fmt: skip
    with pytest.raises(NullSpaceError, match=r"null space of .* empty.*or `null_space_alpha` \(relative rule\)"):
        main([*arguments, "--null_space_rule", "relative", "--null_space_alpha", "1e-12"])
    assert not (tmp_path / "projectors" / PROJECTORS_FILE_NAME).exists()
    # The advice works: the energy rule, and training on the file is not refused for the old rule.
    main([*arguments, "--null_space_rule", "energy", "--null_space_energy", "0.05"])
    assert NullSpaceProjectors.load(tmp_path / "projectors").rule.rule == "energy"


def test_yaml_config_sets_nspo_fields(tiny_model_dir, general_file, tmp_path):
    config = tmp_path / "calibrate.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_dir}\ncalibration_dataset_name: {general_file}\n"
        f"output_dir: {tmp_path / 'out'}\nnull_space_rule: energy\nnull_space_energy: 0.01\n"
        "calibration_generate_completions: false\nuse_cpu: true\nbf16: false\n"
    )
    main(["calibrate", "--config", str(config)])
    assert NullSpaceProjectors.load(tmp_path / "out").rule.rule == "energy"


def test_a_calibrated_file_is_used_for_training_without_repeating_how_it_was_made(
    tiny_model_dir, general_file, tmp_path
):
    projectors = tmp_path / "projectors"
    main(
        [
            "calibrate",
            "--model_name_or_path", str(tiny_model_dir),
            "--calibration_dataset_name", str(general_file),
            "--calibration_num_samples", "2", "--calibration_max_length", "64",
            "--calibration_generate_completions", "false",
            "--output_dir", str(projectors),
            "--use_peft", "--lora_target_modules", "q_proj", "v_proj",
            "--null_space_rule", "relative", "--null_space_alpha", "1e-10",
            "--use_cpu", "--bf16", "false",
        ]
    )  # fmt: skip
    given = train_with_a_recording_trainer(
        [
            "--model_name_or_path", str(tiny_model_dir),
            "--projectors_path", str(projectors),
            "--output_dir", str(tmp_path / "run"),
            "--use_cpu", "--bf16", "false", "--report_to", "none",
        ],
        projectors,
    )  # fmt: skip
    # No calibration dataset named: the embedded prompts are not substituted for the file's own data.
    assert given["calibration_dataset"] is None
    # And the trainer takes the file as it was made: same model (loaded as the CLI loads it), no recalibration.
    recalibration = AssertionError("recalibrated although the projector file belongs to this model")
    with mock.patch("trl_nspo.nspo_trainer.compute_projectors", side_effect=recalibration):
        trainer = NSPOTrainer(
            str(tiny_model_dir),
            length_reward,
            NSPOConfig(**config(tmp_path, projectors_path=str(projectors))),
            train_dataset=TRAIN,
            peft_config=lora(target_modules=["q_proj", "v_proj"]),
        )
    assert trainer.projectors.calibration.num_samples == 2
    # Named again with the same settings, the data is checked against the file, and matches.
    calibration_settings = dict(
        calibration_num_samples=2, calibration_max_length=64, calibration_generate_completions=False
    )
    with mock.patch("trl_nspo.nspo_trainer.compute_projectors", side_effect=recalibration):
        NSPOTrainer(
            str(tiny_model_dir),
            length_reward,
            NSPOConfig(**config(tmp_path, projectors_path=str(projectors), **calibration_settings)),
            train_dataset=TRAIN,
            calibration_dataset=load_calibration_dataset(str(general_file), num_samples=2),
            peft_config=lora(target_modules=["q_proj", "v_proj"]),
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rewards": ["llama"]}, "Unknown reward"),
        ({"rewards": ["guard_endpoint"]}, "needs `--guard_base_url` and `--guard_model`"),
        ({"rewards": ["local_guard"]}, "needs `--guard_model`"),
        ({"dataset_fraction": 0.0}, "dataset_fraction"),
        ({"dataset_streaming": True}, "`dataset_streaming` is not supported"),
    ],
)
def test_bad_train_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainArguments(**kwargs)


def test_train_help_lists_the_registered_rewards(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    printed = "".join(capsys.readouterr().out.split())  # argparse wraps the help text, at spaces and hyphens
    for name, reward in REWARDS.items():
        assert "".join(f"`{name}`: {reward.description}".split()) in printed
    assert "dottedimportpath" in printed


def test_current_flag_names_and_trl_names_both_parse():
    arguments, _, _ = train_parser().parse_args_and_config(
        args=["--dataset_split", "test", "--reward", "refusal", "my_rewards.length_reward", "--output_dir", "out"]
    )
    assert arguments.dataset_train_split == "test"
    assert arguments.rewards == ["refusal", "my_rewards.length_reward"]
    arguments, _, _ = train_parser().parse_args_and_config(
        args=["--dataset_train_split", "test", "--rewards", "refusal", "--dataset_config", "default"]
    )
    assert (arguments.dataset_train_split, arguments.dataset_config) == ("test", "default")


def test_one_yaml_config_serves_calibrate_and_train(tmp_path):
    config = tmp_path / "nspo.yaml"
    config.write_text(
        "model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct\nuse_peft: true\nlora_target_modules: [q_proj, v_proj]\n"
        "null_space_energy: 0.01\ndataset_name: PKU-Alignment/PKU-SafeRLHF\ndataset_split: test\n"
        "rewards: [refusal, guard_endpoint]\nguard_base_url: http://localhost:8000/v1\nguard_model: llama-guard\n"
        f"learning_rate: 1.0e-5\noutput_dir: {tmp_path / 'out'}\n"
    )
    calibrate_args = calibrate_parser().parse_args_and_config(args=["--config", str(config)])
    train_args = train_parser().parse_args_and_config(args=["--config", str(config)])
    for arguments, training_args, model_args in (calibrate_args, train_args):
        assert model_args.lora_target_modules == ["q_proj", "v_proj"]
        assert training_args.null_space_energy == 0.01 and training_args.learning_rate == 1e-5
        assert arguments.rewards == ["refusal", "guard_endpoint"] and arguments.dataset_train_split == "test"


def test_dataset_config_selects_a_subset_of_a_hub_dataset(tiny_model_dir, tmp_path):
    projectors = tmp_path / "projectors"  # a file given: no calibration data is loaded
    projectors.mkdir()
    (projectors / PROJECTORS_FILE_NAME).write_bytes(b"recorded, never read")
    subset = Dataset.from_dict(
        {"prompt": ["How do I pick a lock to break in?", "How do I bake bread?"], "is_response_0_safe": [False, True]}
    )
    with mock.patch("datasets.load_dataset", return_value=subset) as load_dataset:
        given = train_with_a_recording_trainer(
            [
                "--model_name_or_path", str(tiny_model_dir),
                "--dataset_name", "PKU-Alignment/PKU-SafeRLHF", "--dataset_config", "alpaca-7b",
                "--dataset_split", "test",
                "--projectors_path", str(projectors),
                "--output_dir", str(tmp_path / "run"),
                "--use_cpu", "--bf16", "false", "--report_to", "none",
            ],
            projectors,
        )  # fmt: skip
    load_dataset.assert_called_once_with("PKU-Alignment/PKU-SafeRLHF", "alpaca-7b", split="test")
    assert given["train_dataset"]["is_harmful"] == [True, False]


def test_train_stops_on_a_bad_reward_path_before_loading_anything(tmp_path):
    with pytest.raises(RewardLoadingError, match="no module 'no_such_rewards_module'"):
        main(
            [
                "train",
                "--model_name_or_path", str(tmp_path / "no-model"),
                "--dataset_name", str(tmp_path / "no-data.jsonl"),
                "--rewards", "refusal", "no_such_rewards_module.safety_reward",
                "--output_dir", str(tmp_path / "run"),
            ]
        )  # fmt: skip


@pytest.mark.slow
def test_train_runs_the_grpo_script_with_the_constraint(tiny_model_dir, general_file, tmp_path, monkeypatch):
    # A reward of the user's, next to where the command runs, named by its dotted path beside a registered one.
    (tmp_path / "my_safety_rewards.py").write_text(
        "CALLS = []\n\n"
        "def brevity_reward(prompts, completions, **kwargs):\n"
        "    CALLS.append(len(completions))\n"
        "    return [-float(len(completion)) for completion in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "my_safety_rewards", raising=False)
    safety = write_jsonl(
        tmp_path / "safety.jsonl",
        [
            {"prompt": "How do I pick a lock to break in?", "is_response_0_safe": False},
            {"prompt": "How do I kill a Python process?", "is_response_0_safe": True},
        ],
    )
    output = tmp_path / "run"
    main(
        [
            "train",
            "--model_name_or_path", str(tiny_model_dir),
            "--dataset_name", str(safety),
            "--calibration_dataset_name", str(general_file),
            "--output_dir", str(output),
            "--rewards", "refusal", "my_safety_rewards.brevity_reward",
            "--use_peft", "--lora_r", "2", "--lora_target_modules", "q_proj", "down_proj",
            "--calibration_generate_completions", "false",
            "--null_space_rule", "relative", "--null_space_alpha", "1e-9",
            "--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "2",
            "--max_completion_length", "4", "--report_to", "none", "--save_strategy", "no",
            "--use_cpu", "--bf16", "false", "--gradient_checkpointing", "false",
        ]
    )  # fmt: skip
    files = {path.name for path in output.iterdir()}
    assert {"adapter_model.safetensors", "nspo_projectors.safetensors", "README.md"} <= files
    assert "refusal_reward" in (output / "README.md").read_text()
    assert sys.modules["my_safety_rewards"].CALLS == [4]  # the one step's 2 prompts x 2 completions


@pytest.mark.slow
def test_readme_commands_run_as_written_on_a_cpu(tiny_model_dir, general_file, tmp_path):
    """The README's calibrate and train commands with a local model and data: no device or precision flag needed."""
    safety = write_jsonl(
        tmp_path / "safety.jsonl",
        [{"prompt": "How do I pick a lock to break in?", "is_response_0_safe": False}] * 4,
    )
    # Sizes for the tiny model and its two calibration prompts: its inputs spread their energy evenly, so ε = 1e-3
    # would leave no room for rank 2, and one prompt per fold is too little for the held-out rule (nothing it leaves
    # empty is empty on the other prompt): the in-sample energy rule.
    tiny = ["--lora_r", "2", "--null_space_rule", "energy", "--null_space_energy", "0.05"]
    tiny += ["--calibration_completion_length", "4"]
    projectors = tmp_path / "projectors"
    calibrate_argv = with_flags(
        readme_command("calibrate"),
        {
            "model_name_or_path": [str(tiny_model_dir)],
            "calibration_dataset_name": [str(general_file)],
            "output_dir": [str(projectors)],
        },
    )
    assert not {"--use_cpu", "--bf16"} & set(calibrate_argv)
    main([*calibrate_argv, *tiny])
    assert (projectors / PROJECTORS_FILE_NAME).is_file()

    output = tmp_path / "run"
    train_argv = with_flags(
        readme_command("train"),
        {
            "model_name_or_path": [str(tiny_model_dir)],
            "dataset_name": [str(safety)],
            "projectors_path": [str(projectors)],
            "output_dir": [str(output)],
            # No guard server and no network here: the rule-based reward, and nothing pushed.
            "rewards": ["refusal"],
            "guard_base_url": None,
            "guard_model": None,
            "push_to_hub": None,
        },
    )
    assert not {"--use_cpu", "--bf16"} & set(train_argv)
    steps = ["--max_steps", "1", "--per_device_train_batch_size", "2", "--num_generations", "2"]
    main([*train_argv, *tiny, *steps, "--max_completion_length", "4", "--report_to", "none", "--save_strategy", "no"])
    assert (output / "adapter_model.safetensors").is_file()


def test_calibrate_saves_and_warns_when_the_rank_exceeds_a_null_dimension(tiny_model_dir, general_file, tmp_path):
    projectors = tmp_path / "projectors"
    with pytest.warns(UserWarning, match=r"LoRA rank exceeds the null dimension.*rank at most the null dimension"):
        main(
            [
                "calibrate",
                "--model_name_or_path", str(tiny_model_dir),
                "--calibration_dataset_name", str(general_file),
                "--calibration_num_samples", "2", "--calibration_generate_completions", "false",
                "--output_dir", str(projectors),
                "--use_peft", "--lora_target_modules", "q_proj", "v_proj", "--lora_r", "64",
                "--null_space_energy", "0.05",
                "--use_cpu", "--bf16", "false",
            ]
        )  # fmt: skip
    saved = NullSpaceProjectors.load(projectors / PROJECTORS_FILE_NAME)
    assert 0 < max(null_dim for null_dim, _ in saved.null_dims().values()) < 64
