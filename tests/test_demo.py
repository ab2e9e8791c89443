"""`trl-nspo demo` end to end on the tiny local model (the real demo runs SmolLM2-135M-Instruct the same way)."""

import json

import pytest

from trl_nspo import NullSpaceProjectors
from trl_nspo.cli import main
from trl_nspo.demo import METRIC_LABELS


@pytest.mark.slow
def test_demo_trains_evaluates_and_writes_everything(tiny_model_dir, tmp_path, capsys):
    output_dir = tmp_path / "demo"
    main(
        [
            "demo",
            "--model_name_or_path", str(tiny_model_dir),
            "--output_dir", str(output_dir),
            "--max_steps", "2",
            "--prompts_per_step", "1",
            "--num_generations", "2",
            "--max_completion_length", "4",
            "--calibration_completion_length", "4",
            "--eval_max_new_tokens", "4",
            "--lora_r", "2",
            # The tiny random model spreads its inputs' energy evenly: ε = 1e-3 leaves some inputs no null space.
            "--null_space_energy", "0.05",
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
    card = (output_dir / "README.md").read_text()
    assert METRIC_LABELS["refusal_rate_harmful"] in card
    printed = capsys.readouterr().out
    assert "[4/4] Results" in printed and METRIC_LABELS["general_kl"] in printed
