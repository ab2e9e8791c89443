"""`trl-nspo demo` end to end on the tiny local model (the real demo runs SmolLM2-135M-Instruct the same way)."""

import json
from unittest import mock

import pytest

from trl_nspo import NullSpaceProjectors
from trl_nspo.cli import main
from trl_nspo.demo import METRIC_LABELS
from trl_nspo.projectors import PROJECTORS_FILE_NAME
from trl_nspo.smollm2 import SMOLLM2_HUB_ID

# The demo's run at the tiny model's size.
TINY_RUN = [
    "--max_steps", "2",
    "--prompts_per_step", "1",
    "--num_generations", "2",
    "--max_completion_length", "4",
    "--calibration_completion_length", "4",
    "--eval_max_new_tokens", "4",
    "--lora_r", "2",
    # The tiny random model spreads its inputs' energy evenly: ε = 1e-3 leaves some inputs no null space.
    "--null_space_energy", "0.05",
]  # fmt: skip


@pytest.mark.slow
def test_demo_trains_evaluates_and_writes_everything(tiny_model_dir, tmp_path, capsys):
    output_dir = tmp_path / "demo"
    main(
        [
            "demo",
            "--model_name_or_path", str(tiny_model_dir),
            "--output_dir", str(output_dir),
            *TINY_RUN,
            "--compare_grpo", "true",
        ]
    )  # fmt: skip
    results = json.loads((output_dir / "demo_results.json").read_text())
    metrics = results["metrics"]
    assert set(metrics) == {"base", "NSPO", "GRPO"}
    # The base column is the reference the drift is measured against.
    assert metrics["base"]["general_kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["base"]["greedy_agreement"] == 1.0
    for column in metrics.values():
        for key in ("refusal_rate_harmful", "over_refusal_rate_benign", "greedy_agreement"):
            assert 0.0 <= column[key] <= 1.0
    # Both runs trained from the same start with the same seed; only NSPO is held to the general inputs.
    assert results["preservation_error"]["max"] <= 1e-5
    assert set(results["training_wall_time_s"]) == {"NSPO", "GRPO"}

    projectors = NullSpaceProjectors.load(output_dir)
    assert projectors.rule.rule == "energy" and projectors.rule.energy == 0.05
    assert (output_dir / "adapter_model.safetensors").is_file()
    # The baseline is kept for the user's own evaluation.
    assert (output_dir / "grpo-baseline" / "adapter_model.safetensors").is_file()
    card = (output_dir / "README.md").read_text()
    assert METRIC_LABELS["refusal_rate_harmful"] in card
    # Another local model: no Hub id is known, and the card says so instead of showing a placeholder.
    assert "no Hub id was recorded" in card and "]()" not in card and "BASE_MODEL" not in card
    printed = capsys.readouterr().out
    assert "[4/4] Results" in printed and METRIC_LABELS["general_kl"] in printed


@pytest.mark.slow
def test_demo_adapter_and_card_name_the_hub_model_the_local_copy_was_converted_from(tiny_model_dir, tmp_path, capsys):
    output_dir = tmp_path / "demo"
    # The tiny model stands in for the converted SmolLM2 checkpoint in the cache.
    with mock.patch("trl_nspo.demo.prepare_smollm2", return_value=tiny_model_dir):
        main(["demo", "--output_dir", str(output_dir), *TINY_RUN])
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == SMOLLM2_HUB_ID
    card = (output_dir / "README.md").read_text()
    assert f"base_model: {SMOLLM2_HUB_ID}" in card
    assert f'AutoModelForCausalLM.from_pretrained("{SMOLLM2_HUB_ID}")' in card
    assert "]()" not in card and "BASE_MODEL" not in card
    # One number for the file on disk, in the card and in what the demo prints.
    size = f"{(output_dir / PROJECTORS_FILE_NAME).stat().st_size / 2**20:.1f} MB"
    assert f"projector file {size}." in card
    printed = capsys.readouterr().out
    assert f"{PROJECTORS_FILE_NAME} ({size})" in printed and f"Saved NSPO projectors ({size})" in printed
