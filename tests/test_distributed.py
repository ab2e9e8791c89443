"""NSPO with several processes: DDP (supported, exact), FSDP2 (refused; the projection it would need is checked
here at the torch level), FSDP1 and DeepSpeed (refused).

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


def run_on_two_processes(worker: str, model_dir: Path, output_dir: Path) -> Path:
    """Runs `tests/<worker>` on `WORLD_SIZE` CPU processes; returns `output_dir`, where each rank wrote its results."""
    # One thread per rank: the ranks share the machine's cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}"]
    command += [str(TESTS_DIR / worker), str(model_dir), str(output_dir)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{worker} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return output_dir


@pytest.fixture(scope="module")
def ddp_run(tiny_model_dir, tmp_path_factory) -> Path:
    """Output folder of a DDP run of NSPOTrainer (`ddp_worker.py`): projectors, parameters and reports per rank."""
    return run_on_two_processes("ddp_worker.py", tiny_model_dir, tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def fsdp2_reports(tiny_model_dir, tmp_path_factory) -> list[dict]:
    """Reports of `fsdp2_worker.py`: LoRA training under `fully_shard`, projected two ways, one per rank."""
    return reports(run_on_two_processes("fsdp2_worker.py", tiny_model_dir, tmp_path_factory.mktemp("fsdp2")))


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


@pytest.mark.slow
class TestFSDP2:
    def test_projecting_each_ranks_rows_is_projecting_the_whole_matrix(self, fsdp2_reports):
        first, second = (report["local_row_shards"] for report in fsdp2_reports)
        # FSDP2 shards lora_A by rows, unevenly here (rank 3 over 2 processes).
        assert first["placements"] == ["(Shard(dim=0),)"]
        assert set(first["local_rows"]) == {2} and set(second["local_rows"]) == {1}
        for report in (first, second):
            assert report["gradient_projection_error"] <= 1e-6
            assert report["parameter_projection_error"] <= 1e-6
            assert report["range_residual"] <= 1e-6
            assert report["output_change"] <= 1e-6
            assert report["least_moved_lora_b"] > 0

    def test_a_constraint_bound_before_sharding_silently_does_nothing(self, fsdp2_reports):
        # `fully_shard` replaces every parameter: a constraint bound before sharding and never bound again projects
        # stale tensors. NSPOTrainer binds again after `prepare`; FSDP stays refused until it projects local shards.
        for report in fsdp2_reports:
            stale = report["bound_before_sharding"]
            assert stale["bound_parameters_in_model"] == 0
            assert stale["kept_gradient_fraction"] == [None] * len(stale["kept_gradient_fraction"])
            assert stale["output_change"] >= 1e-3

    def test_a_model_sharded_at_load_time_is_refused(self, fsdp2_reports):
        for report in fsdp2_reports:
            assert report["sharded_at_load_time"]["error_type"] == "UnsupportedSetupError"
            assert "models sharded at load time" in report["sharded_at_load_time"]["message"]


class TestRefusedEngines:
    @pytest.mark.parametrize("version", [1, 2])
    def test_fsdp_arguments_are_refused_before_loading_anything(self, tmp_path, version):
        args = NSPOConfig(**config(tmp_path, fsdp="full_shard", fsdp_config={"version": version}))
        with pytest.raises(UnsupportedSetupError, match="does not support DeepSpeed, FSDP"):
            NSPOTrainer("/does/not/exist", length_reward, args, train_dataset=TRAIN, calibration_dataset=CALIBRATION)

    def test_fsdp_from_accelerate_launch_is_refused(self, tmp_path, monkeypatch):
        args = NSPOConfig(**config(tmp_path))
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        with pytest.raises(UnsupportedSetupError, match="does not support DeepSpeed, FSDP"):
            NSPOTrainer("/does/not/exist", length_reward, args, train_dataset=TRAIN, calibration_dataset=CALIBRATION)
