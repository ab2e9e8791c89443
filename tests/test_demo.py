"""`trl-nspo demo` end to end on the tiny local model (the real demo runs SmolLM2-135M-Instruct the same way), and
the line between the demo kit and the library."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from trl_nspo import NullSpaceProjectors
from trl_nspo.cli import main
from trl_nspo.demo import METRIC_LABELS, SMOLLM2_HUB_ID
from trl_nspo.projectors import PROJECTORS_FILE_NAME

PACKAGE_DIR = Path(__file__).parents[1] / "trl_nspo"
DEMO_KIT = "trl_nspo.demo"
# The CLI's commands offer `trl-nspo demo` (and the embedded prompts as default data): it may import the kit, lazily.
COMMAND_LINE = "trl_nspo.commands"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_modules() -> dict[str, Path]:
    """Every module of the library outside the demo kit, by name."""
    modules = {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}
    return {name: path for name, path in modules.items() if not (name + ".").startswith(DEMO_KIT + ".")}


def demo_kit_imports(name: str, path: Path) -> list[tuple[int, bool]]:
    """`(line, inside a function)` of every import of the demo kit in a module, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    in_function = {
        id(node)
        for function in ast.walk(tree)
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(function)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        if any(target == DEMO_KIT or target.startswith(DEMO_KIT + ".") for target in targets):
            found.append((node.lineno, id(node) in in_function))
    return found


def test_the_library_imports_the_demo_kit_only_lazily_from_the_command_line():
    assert COMMAND_LINE in core_modules() and "trl_nspo.nspo_trainer" in core_modules()
    for name, path in core_modules().items():
        imports = demo_kit_imports(name, path)
        if name == COMMAND_LINE:
            assert imports and all(inside_function for _, inside_function in imports), name
        else:
            assert not imports, f"{path} imports {DEMO_KIT} at lines {[line for line, _ in imports]}"


def test_importing_every_library_module_loads_no_demo_module():
    script = (
        "import importlib, sys\n"
        f"for name in {sorted(core_modules())!r}:\n    importlib.import_module(name)\n"
        f"print(sorted(name for name in sys.modules if name.startswith({DEMO_KIT!r})))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


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
    with mock.patch("trl_nspo.demo.run.prepare_smollm2", return_value=tiny_model_dir):
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
