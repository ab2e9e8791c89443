"""NSPO with several processes: DDP (supported, exact), FSDP and DeepSpeed (refused; FSDP2 is studied in
`tests/test_fsdp2.py`).

Everything runs on CPU with two real processes (gloo). `accelerate launch --cpu --num_processes 2` silently starts a
single process on a CPU-only machine, so the ranks are started with `torch.distributed.run`, and every rank reports
the world size it saw.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from test_trainer import CALIBRATION, TRAIN, config, length_reward, lora, output_change_on_calibration_inputs
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_nspo import NSPOConfig, NSPOTrainer, NullSpaceProjectors, UnsupportedSetupError, compute_projectors

TESTS_DIR = Path(__file__).parent
WORLD_SIZE = 2


def projection_matrices(projectors: NullSpaceProjectors) -> dict[str, torch.Tensor]:
    """P for every group: the projection of the identity's rows, whichever basis the group stores."""
    return {
        key: group.basis.project_rows(torch.eye(group.basis.input_dim, dtype=torch.float32))
        for key, group in projectors.groups.items()
    }


def launch_on_two_processes(
    worker: str, model_dir: Path, output_dir: Path, *worker_args: str, launcher: list[str] | None = None
) -> subprocess.CompletedProcess:
    """Runs `tests/<worker> model_dir output_dir *worker_args` on `WORLD_SIZE` CPU processes, started by `launcher`
    (default: `torch.distributed.run`)."""
    # One thread per rank: the ranks share the machine's cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if launcher is None:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}"]
    command = [*launcher, str(TESTS_DIR / worker), str(model_dir), str(output_dir), *worker_args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def run_on_two_processes(
    worker: str, model_dir: Path, output_dir: Path, *worker_args: str, launcher: list[str] | None = None
) -> Path:
    """`launch_on_two_processes`, which must succeed; returns `output_dir`, where each rank wrote its results."""
    result = launch_on_two_processes(worker, model_dir, output_dir, *worker_args, launcher=launcher)
    assert result.returncode == 0, f"{worker} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return output_dir


@pytest.fixture(scope="module")
def ddp_run(tiny_model_dir, tmp_path_factory) -> Path:
    """Output folder of a DDP run of NSPOTrainer (`ddp_worker.py`): projectors, parameters and reports per rank."""
    return run_on_two_processes("ddp_worker.py", tiny_model_dir, tmp_path_factory.mktemp("ddp"))


def reports(output_dir: Path) -> list[dict]:
    return [json.loads((output_dir / f"report-rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


@pytest.mark.slow
class TestDDP:
    def test_two_ranks_really_ran_ddp_on_different_data(self, ddp_run):
        first, second = reports(ddp_run)
        assert [first["rank"], second["rank"]] == [0, 1]
        assert first["world_size"] == second["world_size"] == WORLD_SIZE
        assert first["wrapped_in_ddp"] == "DistributedDataParallel"
        assert first["global_step"] == second["global_step"] == 4
        # Different completions on each rank: identical parameters below need the gradient all-reduce.
        assert first["completions_seen"] != second["completions_seen"]

    def test_projectors_are_identical_on_every_rank_and_match_one_process(self, ddp_run, tiny_model_dir, tmp_path):
        first, second = (NullSpaceProjectors.load(ddp_run / f"projectors-rank{r}.safetensors") for r in (0, 1))
        assert first.metadata() == second.metadata()
        for key, group in first.groups.items():
            assert torch.equal(group.basis.basis, second.groups[key].basis.basis)
            assert torch.equal(group.input_sketch, second.groups[key].input_sketch)

        # Each rank calibrated on half the rows; the all-reduced covariance must be that of all rows.
        args = NSPOConfig(**config(tmp_path))
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora())
        single = compute_projectors(
            model,
            AutoTokenizer.from_pretrained(tiny_model_dir),
            CALIBRATION,
            settings=args.calibration_settings(),
            rule=args.null_space_rule_config(),
            show_progress=False,
        )
        assert first.null_dims() == single.null_dims()
        assert first.calibration.token_count == single.calibration.token_count
        assert {k: g.token_count for k, g in first.groups.items()} == {
            k: g.token_count for k, g in single.groups.items()
        }
        distributed, reference = projection_matrices(first), projection_matrices(single)
        for key in reference:
            torch.testing.assert_close(distributed[key], reference[key], atol=1e-5, rtol=0)

    def test_parameters_are_identical_on_every_rank_and_outputs_preserved(self, ddp_run, tiny_model_dir):
        first, second = (load_file(ddp_run / f"parameters-rank{r}.safetensors") for r in (0, 1))
        assert first.keys() == second.keys()
        for name in first:
            assert torch.equal(first[name], second[name]), name
        assert min(p.abs().max().item() for n, p in first.items() if "lora_B" in n) > 0

        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora())
        incompatible = model.load_state_dict(first, strict=False)
        assert not incompatible.unexpected_keys
        assert not [key for key in incompatible.missing_keys if "lora_" in key]
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        trained = SimpleNamespace(model=model, processing_class=tokenizer, args=None)
        assert output_change_on_calibration_inputs(trained) <= 1e-6

    def test_every_rank_logged_the_guarantee(self, ddp_run):
        for report in reports(ddp_run):
            steps = [entry for entry in report["log_history"] if "loss" in entry]
            assert len(steps) == 4
            assert max(entry["nspo/preservation_error"] for entry in steps) <= 1e-5
            assert any("nspo/kept_gradient_fraction" in entry for entry in steps)


class TestRefusedEngines:
    def test_fsdp1_arguments_are_refused_before_loading_anything(self, tmp_path):
        args = NSPOConfig(**config(tmp_path, fsdp="full_shard", fsdp_config={"version": 1}))
        with pytest.raises(UnsupportedSetupError, match="does not support FSDP1"):
            NSPOTrainer("/does/not/exist", length_reward, args, train_dataset=TRAIN, calibration_dataset=CALIBRATION)

    def test_lora_with_fsdp2_sharded_checkpoints_and_activation_checkpointing_is_refused_before_loading(
        self, tmp_path
    ):
        fsdp_config = {"version": 2, "activation_checkpointing": True, "state_dict_type": "SHARDED_STATE_DICT"}
        args = NSPOConfig(**config(tmp_path, fsdp="full_shard", fsdp_config=fsdp_config))
        with pytest.raises(UnsupportedSetupError, match="hold no adapter"):
            NSPOTrainer(
                "/does/not/exist",
                length_reward,
                args,
                train_dataset=TRAIN,
                calibration_dataset=CALIBRATION,
                peft_config=lora(),
            )

    def test_fsdp_from_accelerate_launch_is_refused(self, tmp_path, monkeypatch):
        args = NSPOConfig(**config(tmp_path))
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # Accelerate's default `FSDP_VERSION` is 1
        with pytest.raises(UnsupportedSetupError, match="does not support FSDP1"):
            NSPOTrainer("/does/not/exist", length_reward, args, train_dataset=TRAIN, calibration_dataset=CALIBRATION)
