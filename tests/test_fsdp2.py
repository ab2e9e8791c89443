"""FSDP2 with two real processes on CPU (gloo): what a GRPO-family trainer sees under Accelerate's FSDP2 path, and the
projection NSPO needs there, checked under `fully_shard` by hand. Findings: docs/fsdp2_findings.md.

`TestAccelerateFSDP2` launches `examples/accelerate/fsdp2.yaml` itself (`accelerate launch`, 2 processes, float32)
on `tests/fsdp2_worker.py`: NSPOTrainer (`NSPO`), which binds its constraint after `accelerator.prepare` and projects
each rank's row shards, must keep the output change on the calibration inputs ≤ 1e-6 for LoRA and full fine-tuning,
while the same runs with plain `GRPOTrainer` (`GRPO`) are the control that moves it by ≥ 1e-3.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import WORLD_SIZE, launch_on_two_processes, reports, run_on_two_processes

GRPO = "trl.GRPOTrainer"
NSPO = "trl_nspo.NSPOTrainer"
FSDP2_EXAMPLE = Path(__file__).parents[1] / "examples" / "accelerate" / "fsdp2.yaml"
# Full fine-tuning resumes from the example's SHARDED_STATE_DICT checkpoints. LoRA resumes from FULL_STATE_DICT ones
# (as in fsdp2_qlora.yaml): with activation checkpointing, a sharded checkpoint of a PEFT model holds no adapter.
STATE_DICT_TYPE = {"lora": "FULL_STATE_DICT", "full": "SHARDED_STATE_DICT"}


def accelerate_fsdp2(state_dict_type: str) -> list[str]:
    """`accelerate launch` with the example FSDP2 configuration, on 2 CPU processes in float32."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(FSDP2_EXAMPLE),
        "--num_processes",
        str(WORLD_SIZE),
        "--mixed_precision",
        "no",
        "--fsdp_state_dict_type",
        state_dict_type,
    ]


def run_fsdp2_worker(
    model_dir: Path, output_dir: Path, mode: str, *worker_args: str, state_dict_type=None, trainer=NSPO
) -> Path:
    launcher = accelerate_fsdp2(state_dict_type or STATE_DICT_TYPE[mode])
    args = ("--mode", mode, "--trainer", trainer, *worker_args)
    return run_on_two_processes("fsdp2_worker.py", model_dir, output_dir, *args, launcher=launcher)


def parameters(output_dir: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(output_dir / f"parameters-rank{rank}.safetensors")


@pytest.fixture(scope="module")
def fully_shard_reports(tiny_model_dir, tmp_path_factory) -> list[dict]:
    """Reports of `fully_shard_worker.py`: LoRA training under `fully_shard`, projected two ways, one per rank."""
    return reports(run_on_two_processes("fully_shard_worker.py", tiny_model_dir, tmp_path_factory.mktemp("fsdp2")))


@pytest.fixture(scope="module", params=["lora", "full"])
def fsdp2_runs(request, tiny_model_dir, tmp_path_factory) -> tuple[str, Path, Path]:
    """An uninterrupted 4-step run (checkpoints at steps 2 and 4) and a run resumed from its step-2 checkpoint."""
    mode = request.param
    uninterrupted = run_fsdp2_worker(tiny_model_dir, tmp_path_factory.mktemp(f"fsdp2-{mode}"), mode)
    resumed = run_fsdp2_worker(
        tiny_model_dir,
        tmp_path_factory.mktemp(f"fsdp2-{mode}-resumed"),
        mode,
        "--resume-from",
        str(uninterrupted / "checkpoint-2"),
    )
    return mode, uninterrupted, resumed


@pytest.fixture(scope="module", params=["lora", "full"])
def grpo_control_run(request, tiny_model_dir, tmp_path_factory) -> Path:
    """The same uninterrupted 4-step run with plain GRPOTrainer: nothing keeps the general outputs."""
    return run_fsdp2_worker(
        tiny_model_dir, tmp_path_factory.mktemp(f"grpo-{request.param}"), request.param, trainer=GRPO
    )


@pytest.mark.slow
class TestFullyShardByHand:
    def test_projecting_each_ranks_rows_is_projecting_the_whole_matrix(self, fully_shard_reports):
        first, second = (report["local_row_shards"] for report in fully_shard_reports)
        # FSDP2 shards lora_A by rows, unevenly here (rank 3 over 2 processes).
        assert first["placements"] == ["(Shard(dim=0),)"]
        assert set(first["local_rows"]) == {2} and set(second["local_rows"]) == {1}
        for report in (first, second):
            assert report["gradient_projection_error"] <= 1e-6
            assert report["parameter_projection_error"] <= 1e-6
            assert report["range_residual"] <= 1e-6
            assert report["output_change"] <= 1e-6
            assert report["least_moved_lora_b"] > 0

    def test_a_constraint_bound_before_sharding_silently_does_nothing(self, fully_shard_reports):
        # `fully_shard` replaces every parameter: a constraint bound before sharding and never bound again projects
        # stale tensors. NSPOTrainer binds again after `prepare` (`on_train_begin`) and projects the local shards.
        for report in fully_shard_reports:
            stale = report["bound_before_sharding"]
            assert stale["bound_parameters_in_model"] == 0
            assert stale["kept_gradient_fraction"] == [None] * len(stale["kept_gradient_fraction"])
            assert stale["output_change"] >= 1e-3

    def test_a_model_sharded_at_load_time_is_refused(self, fully_shard_reports):
        for report in fully_shard_reports:
            assert report["sharded_at_load_time"]["error_type"] == "UnsupportedSetupError"
            assert "models sharded at load time" in report["sharded_at_load_time"]["message"]


@pytest.mark.slow
class TestAccelerateFSDP2:
    def test_the_example_configuration_runs_fsdp2_on_two_ranks(self, fsdp2_runs):
        _, uninterrupted, _ = fsdp2_runs
        first, second = reports(uninterrupted)
        assert [first["rank"], second["rank"]] == [0, 1]
        for report in (first, second):
            assert report["world_size"] == WORLD_SIZE
            assert report["distributed_type"] == "DistributedType.FSDP"
            assert report["fsdp_version"] == 2
            assert report["cpu_ram_efficient_loading"] and report["activation_checkpointing"]
            # FSDP2's activation checkpointing renames the parameters: names must be canonicalised.
            assert report["checkpoint_wrapped_names"]
            assert report["wrapped_model"].startswith("FSDP")
            assert report["global_step"] == 4
            assert report["checkpoints"] == ["checkpoint-2", "checkpoint-4"]

    def test_without_the_cpu_switch_accelerate_silently_trains_with_ddp(self, tiny_model_dir, tmp_path):
        # Why the worker switches the CPU state: Accelerate keeps FSDP only for accelerator process groups and drops
        # the plugin for `MULTI_CPU`, without a warning. If this fails, Accelerate runs FSDP on CPU by itself and the
        # worker's switch can go.
        run_fsdp2_worker(tiny_model_dir, tmp_path, "lora", "--max-steps", "1", "--without-fsdp-on-cpu", trainer=GRPO)
        for report in reports(tmp_path):
            assert report["world_size"] == WORLD_SIZE
            assert report["distributed_type"] == "DistributedType.MULTI_CPU"
            assert report["fsdp_version"] is None
            assert report["wrapped_model"] == "DistributedDataParallel"
            assert report["after_prepare"]["parameter"]["type"] == "Tensor"

    def test_constrained_weights_and_gradients_are_row_shards_at_every_hook(self, fsdp2_runs):
        mode, uninterrupted, _ = fsdp2_runs
        # LoRA rank 3 over 2 ranks: uneven shards. Full fine-tuning: the MLP's 128-row and 64-row weights, halved.
        local_rows = {"lora": ([2], [1]), "full": ([32, 64], [32, 64])}[mode]
        for report, rows in zip(reports(uninterrupted), local_rows, strict=True):
            for hook in ("after_prepare", "before_optimizer_step", "on_optimizer_step"):
                seen = report[hook]
                assert seen["parameter"]["type"] == "DTensor"
                assert seen["parameter"]["placements"] == "(Shard(dim=0),)"
                assert seen["parameter"]["dtype"] == "torch.float32"
                assert seen["local_rows"] == rows
            assert report["after_prepare"]["gradient"] is None
            for hook in ("before_optimizer_step", "on_optimizer_step"):
                gradient, parameter = report[hook]["gradient"], report[hook]["parameter"]
                assert gradient["placements"] == parameter["placements"]
                assert gradient["local_shape"] == parameter["local_shape"]

    def test_ranks_agree_and_nspo_keeps_general_outputs(self, fsdp2_runs):
        _, uninterrupted, _ = fsdp2_runs
        first, second = parameters(uninterrupted, 0), parameters(uninterrupted, 1)
        assert first.keys() == second.keys()
        for name in first:
            assert torch.equal(first[name], second[name]), name
        first_report, second_report = reports(uninterrupted)
        assert first_report["output_change"] == second_report["output_change"]
        assert first_report["output_change"] <= 1e-6
        # The logged measurements sum squares over the ranks' shards: every rank logs the same, global values.
        metrics = [
            [{k: v for k, v in h.items() if k.startswith("nspo/")} for h in r["log_history"]]
            for r in reports(uninterrupted)
        ]
        assert metrics[0] == metrics[1]
        logged = [h for h in metrics[0] if "nspo/kept_gradient_fraction" in h]
        assert logged and all(0 < h["nspo/kept_gradient_fraction"] < 1 for h in logged)
        assert all(h["nspo/preservation_error"] <= 1e-6 for h in metrics[0] if "nspo/preservation_error" in h)

    def test_unconstrained_grpo_changes_general_outputs(self, grpo_control_run):
        # The control: the same run with plain GRPOTrainer moves the outputs on the calibration inputs.
        first, second = reports(grpo_control_run)
        assert first["fsdp_version"] == 2 and first["global_step"] == 4
        assert first["output_change"] == second["output_change"]
        assert first["output_change"] >= 1e-3

    def test_resume_is_bitwise_equal_to_the_uninterrupted_run(self, fsdp2_runs):
        _, uninterrupted, resumed = fsdp2_runs
        first_report, resumed_report = reports(uninterrupted)[0], reports(resumed)[0]
        assert resumed_report["global_step"] == 4
        # The resumed run started from the checkpoint's weights, not from the initial ones.
        assert resumed_report["trainable_norm_at_train_begin"] != first_report["trainable_norm_at_train_begin"]
        end, resumed_end = parameters(uninterrupted), parameters(resumed)
        assert end.keys() == resumed_end.keys()
        for name in end:
            assert torch.equal(end[name], resumed_end[name]), name

    def test_a_sharded_checkpoint_with_activation_checkpointing_resumes_a_fresh_adapter(
        self, tiny_model_dir, tmp_path
    ):
        # With SHARDED_STATE_DICT, Accelerate saves and loads a PEFT model's adapter through PEFT's
        # `get_peft_model_state_dict`, which finds nothing once FSDP's activation checkpointing has wrapped the decoder
        # layers: the checkpoint holds no adapter, and the run resumes from B = 0, silently.
        trained = run_fsdp2_worker(
            tiny_model_dir,
            tmp_path / "trained",
            "lora",
            "--max-steps",
            "2",
            state_dict_type="SHARDED_STATE_DICT",
            trainer=GRPO,
        )
        resumed = run_fsdp2_worker(
            tiny_model_dir,
            tmp_path / "resumed",
            "lora",
            "--max-steps",
            "3",
            "--resume-from",
            str(trained / "checkpoint-2"),
            state_dict_type="SHARDED_STATE_DICT",
            trainer=GRPO,
        )
        fresh = reports(trained)[0]["trainable_norm_at_train_begin"]
        assert reports(trained)[0]["trainable_norm_at_train_end"] != fresh
        assert reports(resumed)[0]["trainable_norm_at_train_begin"] == fresh

    def test_nspo_refuses_lora_with_sharded_checkpoints_and_activation_checkpointing(self, tiny_model_dir, tmp_path):
        launcher = accelerate_fsdp2("SHARDED_STATE_DICT")
        worker_args = ("--mode", "lora", "--trainer", NSPO, "--max-steps", "1")
        result = launch_on_two_processes("fsdp2_worker.py", tiny_model_dir, tmp_path, *worker_args, launcher=launcher)
        assert result.returncode != 0
        assert "UnsupportedSetupError" in result.stderr
        assert "hold no adapter" in result.stderr and "FULL_STATE_DICT" in result.stderr

    def test_generate_without_fsdp_registration_fails_as_trl_4550(self, tiny_model_dir, tmp_path):
        # TRL #4550: GRPO's `unwrapped_model.generate` under FSDP2 + PEFT calls the inner model's forward, which
        # bypasses the root FSDP module's unshard hook. transformers' Trainer registers `generate` as an FSDP forward
        # method after `prepare` (huggingface/transformers#42436); without it, plain GRPOTrainer fails at once.
        launcher = accelerate_fsdp2(STATE_DICT_TYPE["lora"])
        worker_args = ("--mode", "lora", "--trainer", GRPO, "--max-steps", "1", "--without-generate-registration")
        result = launch_on_two_processes("fsdp2_worker.py", tiny_model_dir, tmp_path, *worker_args, launcher=launcher)
        assert result.returncode != 0
        error = json.loads((tmp_path / "report-rank0.json").read_text())["error"]
        assert "got mixed torch.Tensor and DTensor" in error
