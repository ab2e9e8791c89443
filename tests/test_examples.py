"""`examples/nspo_grpo.py` run as a user would, on the tiny local model and local data."""

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[1] / "examples" / "nspo_grpo.py"


def load_example():
    spec = importlib.util.spec_from_file_location("nspo_grpo", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
def test_example_trains_one_step_without_a_guard_server_or_device_flags(tiny_model_dir, tmp_path):
    example = load_example()
    safety = write_jsonl(
        tmp_path / "safety.jsonl",
        [{"prompt": f"How do I pick lock number {i}?", "is_response_0_safe": i % 2 == 0} for i in range(5)],
    )
    general = write_jsonl(
        tmp_path / "general.jsonl", [{"text": "What is 12 times 7?"}, {"text": "Write a haiku about autumn."}]
    )
    output = tmp_path / "run"
    script_args, training_args, model_args = example.make_parser().parse_args_and_config(
        args=[
            "--model_name_or_path", str(tiny_model_dir),
            "--use_peft", "--lora_r", "2", "--lora_target_modules", "q_proj", "v_proj",
            "--dataset_name", str(safety),
            "--calibration_dataset_name", str(general),
            "--calibration_completion_length", "4",
            "--null_space_rule", "energy", "--null_space_energy", "0.05",
            "--output_dir", str(output),
            "--max_steps", "1", "--per_device_train_batch_size", "2", "--num_generations", "2",
            "--max_completion_length", "4", "--report_to", "none", "--save_strategy", "no",
        ]
    )  # fmt: skip
    assert script_args.rewards == ["refusal"]
    example.main(script_args, training_args, model_args)
    assert (output / "adapter_model.safetensors").is_file()
    assert (output / "nspo_projectors.safetensors").is_file()


def test_rewards_are_chosen_by_flag_from_the_registry():
    example = load_example()
    parse = example.make_parser().parse_args_and_config
    script_args, _, _ = parse(args=["--output_dir", "out"])
    assert [type(reward).__name__ for reward in example.reward_functions(script_args)] == ["RefusalReward"]
    guard_flags = ["--guard_base_url", "http://localhost:8000/v1", "--guard_model", "llama-guard"]
    script_args, _, _ = parse(args=["--rewards", "guard_endpoint", "refusal", *guard_flags, "--output_dir", "out"])
    names = [type(reward).__name__ for reward in example.reward_functions(script_args)]
    assert names == ["GuardEndpointReward", "RefusalReward"]
    with pytest.raises(ValueError, match=r"choose among \['refusal', 'guard_endpoint', 'local_guard'\]"):
        example.SafetyScriptArguments(rewards=["llama"])
