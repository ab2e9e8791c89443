"""Reliability of long NSPO runs: projector files survive restarts and crashes, checkpoints resume to the adapter an
uninterrupted run ends with, and bad data or settings fail early with errors that say what to change.

Every scenario is compared against one uninterrupted run (`resume_worker.build_trainer`: 4 steps, a checkpoint every
2), trained once per module.
"""

import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from unittest import mock

import pytest
import torch
from datasets import Dataset
from resume_worker import MAX_STEPS, SAVE_STEPS, TRAIN, build_trainer
from safetensors.torch import load_file, save_file
from test_trainer import CALIBRATION, config, length_reward, lora, output_change_on_calibration_inputs

from trl_nspo import NSPOConfig, NSPOTrainer, NullSpaceBasis, NullSpaceError, NullSpaceProjectors, ProjectorFileError
from trl_nspo.projectors import PROJECTORS_FILE_NAME, PROJECTORS_REFERENCE_NAME, file_sha256

FIRST_CHECKPOINT = f"checkpoint-{SAVE_STEPS}"
LAST_CHECKPOINT = f"checkpoint-{MAX_STEPS}"
# A resumed run in this process is bitwise equal to the uninterrupted one (`test_resume_is_bitwise_exact`); a resumed
# process may pick other float32 kernels, so comparisons across processes allow rounding.
RESUME_TOLERANCE = 1e-6
OTHER_CALIBRATION = Dataset.from_dict(
    {"prompt": [[{"role": "user", "content": "Explain photosynthesis in one sentence."}]]}
)


@dataclass
class Run:
    trainer: NSPOTrainer
    output_dir: Path
    projectors_saved_before_training: bool = False


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory) -> Run:
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "out"
    trainer = build_trainer(tiny_model_dir, output_dir)
    saved_before_training = (output_dir / PROJECTORS_FILE_NAME).is_file()
    trainer.train()
    return Run(trainer, output_dir, saved_before_training)


def restart_dir(directory: Path, run: Run, checkpoint: str | None = None) -> Path:
    """An output directory as a restarted run finds it: the run's projector file, and optionally one checkpoint."""
    output_dir = directory / "out"
    output_dir.mkdir(parents=True)
    shutil.copy(run.output_dir / PROJECTORS_FILE_NAME, output_dir)
    if checkpoint is not None:
        shutil.copytree(run.output_dir / checkpoint, output_dir / checkpoint)
    return output_dir


@pytest.fixture(scope="module")
def resumed(uninterrupted, tiny_model_dir, tmp_path_factory) -> Run:
    output_dir = restart_dir(tmp_path_factory.mktemp("resumed"), uninterrupted, FIRST_CHECKPOINT)
    trainer = build_trainer(tiny_model_dir, output_dir)
    trainer.train(resume_from_checkpoint=True)
    return Run(trainer, output_dir)


def adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max((first[name] - second[name]).abs().max().item() for name in first)


def step_rewards(trainer: NSPOTrainer) -> list[float]:
    return [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]


def counting(calls: list):
    def length_reward_counted(completions, **kwargs):
        calls.append(len(completions))
        return length_reward(completions, **kwargs)

    return length_reward_counted


def projector_files(directory: Path) -> list[str]:
    """Every projector file, temporary ones included, in `directory`."""
    return sorted(p.name for p in directory.iterdir() if "nspo_projectors" in p.name) if directory.exists() else []


def save_file_that_dies_half_way(tensors, filename, metadata=None):
    """`safetensors.torch.save_file` on a disk that fills up: half a file is on disk when the error comes."""
    save_file(tensors, filename, metadata=metadata)
    path = Path(filename)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    raise OSError(28, "No space left on device")


class TestProjectorFiles:
    def test_written_once_and_referenced_by_every_checkpoint(self, uninterrupted, tmp_path):
        assert uninterrupted.projectors_saved_before_training
        run_file = uninterrupted.output_dir / PROJECTORS_FILE_NAME
        assert uninterrupted.trainer.projectors_file == run_file
        for directory in (uninterrupted.output_dir / FIRST_CHECKPOINT, uninterrupted.output_dir / LAST_CHECKPOINT):
            assert (directory / "adapter_model.safetensors").is_file()
            assert not (directory / PROJECTORS_FILE_NAME).exists()
            reference = json.loads((directory / PROJECTORS_REFERENCE_NAME).read_text())
            assert reference == {
                "path": str(run_file.resolve()),
                "sha256": file_sha256(run_file),
                "size_bytes": run_file.stat().st_size,
            }
        # The final save into the output directory finds the run's file there: nothing is written twice.
        written = run_file.stat().st_mtime_ns
        uninterrupted.trainer.save_model()
        assert run_file.stat().st_mtime_ns == written
        assert projector_files(uninterrupted.output_dir) == [PROJECTORS_FILE_NAME]

    def test_save_model_elsewhere_makes_a_self_contained_folder(self, uninterrupted, tmp_path, caplog):
        with caplog.at_level(logging.INFO, logger="trl_nspo"):
            uninterrupted.trainer.save_model(str(tmp_path / "final"))
        saved = tmp_path / "final" / PROJECTORS_FILE_NAME
        assert file_sha256(saved) == file_sha256(uninterrupted.output_dir / PROJECTORS_FILE_NAME)
        assert NullSpaceProjectors.load(saved).same_bases(uninterrupted.trainer.projectors)
        assert f"NSPO projector file ({saved.stat().st_size / 2**20:.1f} MB) saved to {saved}" in caplog.text

    def test_final_save_keeps_the_trained_projectors_if_the_run_file_was_replaced(
        self, uninterrupted, tiny_model_dir, tmp_path
    ):
        output_dir = restart_dir(tmp_path, uninterrupted)
        trainer = build_trainer(tiny_model_dir, output_dir)
        # Someone recalibrates into the run's projectors_path while it trains.
        other = NullSpaceProjectors.load(output_dir)
        other.calibration = replace(other.calibration, token_count=-1)
        other.save(output_dir)
        with pytest.warns(UserWarning, match="changed since this run loaded it"):
            trainer.save_model(str(tmp_path / "final"))
        saved = NullSpaceProjectors.load(tmp_path / "final")
        assert saved.calibration.token_count == trainer.projectors.calibration.token_count > 0

    def test_size_is_logged_when_the_file_is_written(self, tiny_model_dir, tmp_path, caplog):
        with caplog.at_level(logging.INFO, logger="trl_nspo"):
            trainer = build_trainer(tiny_model_dir, tmp_path / "out")
        size = trainer.projectors_file.stat().st_size
        assert f"Saved NSPO projectors ({size / 2**20:.1f} MB) to {trainer.projectors_file}" in caplog.text
        assert f"Projector file size: {trainer.projectors.stored_bytes / 2**20:.1f} MB" in caplog.text
        assert abs(size - trainer.projectors.stored_bytes) < 64 * 1024  # the rest is the JSON header

    def test_restart_reuses_them_without_recalibrating(self, uninterrupted, tiny_model_dir, tmp_path):
        output_dir = restart_dir(tmp_path, uninterrupted)
        recalibration = AssertionError("recalibrated although a matching projector file was there")
        with mock.patch("trl_nspo.nspo_trainer.compute_projectors", side_effect=recalibration):
            trainer = build_trainer(tiny_model_dir, output_dir)
        assert trainer.projectors.metadata() == uninterrupted.trainer.projectors.metadata()
        assert trainer.projectors.same_bases(uninterrupted.trainer.projectors)

    @pytest.mark.parametrize(
        "overrides, calibration, message",
        [
            ({"null_space_alpha": 0.5}, CALIBRATION, r"null_space_alpha: 1e-10 in the file, 0\.5 in this run"),
            ({"null_space_rule": "energy"}, CALIBRATION, r"null_space_rule: 'relative' in the file, 'energy' in this"),
            ({"null_space_max_dim": 8}, CALIBRATION, r"null_space_max_dim: 128 in the file, 8 in this run"),
            ({}, OTHER_CALIBRATION, r"calibration dataset rows \(fingerprint\): '[0-9a-f]+' in the file"),
            ({"calibration_num_samples": 1}, CALIBRATION, "calibration_num_samples: 1024 in the file, 1 in this run"),
            ({"calibration_max_length": 8}, CALIBRATION, "calibration_max_length: 256 in the file, 8 in this run"),
            (
                {"calibration_completion_length": 16},
                CALIBRATION,
                "calibration_completion_length: 8 in the file, 16 in",
            ),
            (
                {"calibration_generate_completions": False},
                CALIBRATION,
                "calibration_generate_completions: True in the file, False in this run",
            ),
        ],
    )
    def test_restart_with_another_rule_or_calibration_is_refused(
        self, uninterrupted, tiny_model_dir, tmp_path, overrides, calibration, message
    ):
        output_dir = restart_dir(tmp_path, uninterrupted)
        saved = (output_dir / PROJECTORS_FILE_NAME).read_bytes()
        args = NSPOConfig(**config(tmp_path, output_dir=str(output_dir), **overrides))
        with pytest.raises(ProjectorFileError, match=message) as refusal:
            NSPOTrainer(
                str(tiny_model_dir),
                length_reward,
                args,
                train_dataset=TRAIN,
                calibration_dataset=calibration,
                peft_config=lora(),
            )
        assert str(output_dir / PROJECTORS_FILE_NAME) in str(refusal.value)
        assert "Delete" in str(refusal.value)
        assert (output_dir / PROJECTORS_FILE_NAME).read_bytes() == saved

    def test_corrupt_file_is_refused_not_silently_replaced(self, uninterrupted, tiny_model_dir, tmp_path):
        output_dir = restart_dir(tmp_path, uninterrupted)
        path = output_dir / PROJECTORS_FILE_NAME
        path.write_bytes(path.read_bytes()[:-100])
        corrupt = path.read_bytes()
        with pytest.raises(ProjectorFileError, match=rf"{re.escape(str(path))}.*truncated or corrupt.*Delete it"):
            build_trainer(tiny_model_dir, output_dir)
        assert path.read_bytes() == corrupt


class TestResume:
    def test_checkpoint_without_projectors_is_refused_before_any_step(self, uninterrupted, tiny_model_dir, tmp_path):
        output_dir = restart_dir(tmp_path, uninterrupted, FIRST_CHECKPOINT)
        checkpoint = output_dir / FIRST_CHECKPOINT
        (checkpoint / PROJECTORS_REFERENCE_NAME).unlink()
        rewards = []
        trainer = build_trainer(tiny_model_dir, output_dir, counting(rewards))
        with pytest.raises(ProjectorFileError, match=rf"{re.escape(str(checkpoint))} has no NSPO projector file"):
            trainer.train(resume_from_checkpoint=str(checkpoint))
        assert rewards == [] and trainer.state.global_step == 0
        assert not (output_dir / LAST_CHECKPOINT).exists()

    def test_checkpoint_referencing_another_projector_file_is_refused(self, uninterrupted, tiny_model_dir, tmp_path):
        output_dir = restart_dir(tmp_path, uninterrupted, FIRST_CHECKPOINT)
        reference_path = output_dir / FIRST_CHECKPOINT / PROJECTORS_REFERENCE_NAME
        reference = json.loads(reference_path.read_text())
        reference_path.write_text(json.dumps({**reference, "sha256": "0" * 64}))
        rewards = []
        trainer = build_trainer(tiny_model_dir, output_dir, counting(rewards))
        with pytest.raises(ProjectorFileError, match=r"trained with the projector file .* \(SHA-256 000000000000…\)"):
            trainer.train(resume_from_checkpoint=True)
        assert rewards == [] and trainer.state.global_step == 0

    def test_checkpoint_trained_in_other_null_spaces_is_refused(self, uninterrupted, tiny_model_dir, tmp_path):
        output_dir = restart_dir(tmp_path, uninterrupted, FIRST_CHECKPOINT)
        checkpoint = output_dir / FIRST_CHECKPOINT
        # A checkpoint holding its own projector file (as trl-nspo wrote them before references): same modules,
        # dimensions, rule and model; one basis spans another subspace.
        (checkpoint / PROJECTORS_REFERENCE_NAME).unlink()
        other = NullSpaceProjectors.load(output_dir)
        group = next(iter(other.groups.values()))
        rotated, _ = torch.linalg.qr(torch.randn(group.basis.basis.shape, generator=torch.Generator().manual_seed(0)))
        group.basis = NullSpaceBasis(rotated, group.basis.stores_null)
        other.save(checkpoint)
        rewards = []
        trainer = build_trainer(tiny_model_dir, output_dir, counting(rewards))
        refusal = rf"{re.escape(str(checkpoint))} was trained with other null spaces"
        with pytest.raises(ProjectorFileError, match=refusal):
            trainer.train(resume_from_checkpoint=True)
        assert rewards == [] and trainer.state.global_step == 0

    def test_resumed_run_ends_with_the_uninterrupted_adapter(self, uninterrupted, resumed):
        expected = adapter(uninterrupted.output_dir / LAST_CHECKPOINT)
        actual = adapter(resumed.output_dir / LAST_CHECKPOINT)
        assert {"lora_A", "lora_B"} <= {part for name in expected for part in name.split(".")}
        assert resumed.trainer.state.global_step == MAX_STEPS
        # The restored RNG state samples the same completions, so every step sees the same rewards.
        assert step_rewards(resumed.trainer) == step_rewards(uninterrupted.trainer)
        moved = max_difference(expected, adapter(uninterrupted.output_dir / FIRST_CHECKPOINT))
        assert moved > 1e3 * RESUME_TOLERANCE
        assert max_difference(actual, expected) <= RESUME_TOLERANCE
        assert output_change_on_calibration_inputs(resumed.trainer) <= 1e-6

    def test_resume_is_bitwise_exact(self, uninterrupted, resumed):
        expected = adapter(uninterrupted.output_dir / LAST_CHECKPOINT)
        assert max_difference(adapter(resumed.output_dir / LAST_CHECKPOINT), expected) == 0.0

    def test_resume_skips_a_checkpoint_left_incomplete(self, uninterrupted, tiny_model_dir, tmp_path):
        output_dir = restart_dir(tmp_path, uninterrupted, FIRST_CHECKPOINT)
        # Killed while writing the next checkpoint: the adapter is on disk, the projectors and trainer state are not.
        incomplete = output_dir / LAST_CHECKPOINT
        incomplete.mkdir()
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy(uninterrupted.output_dir / LAST_CHECKPOINT / name, incomplete)
        trainer = build_trainer(tiny_model_dir, output_dir)
        with pytest.warns(UserWarning, match=rf"Skipping .*{LAST_CHECKPOINT}: it has no trainer_state.json"):
            trainer.train(resume_from_checkpoint=True)
        assert trainer.state.global_step == MAX_STEPS
        expected = adapter(uninterrupted.output_dir / LAST_CHECKPOINT)
        assert max_difference(adapter(incomplete), expected) <= RESUME_TOLERANCE

    @pytest.mark.slow
    def test_killed_process_resumes_to_the_uninterrupted_adapter(self, uninterrupted, tiny_model_dir, tmp_path):
        output_dir = tmp_path / "out"
        log_path = tmp_path / "worker.log"
        worker = [
            sys.executable,
            str(Path(__file__).with_name("resume_worker.py")),
            str(tiny_model_dir),
            str(output_dir),
        ]
        with log_path.open("w") as log:
            first = subprocess.Popen([*worker, "--hang-after-checkpoint"], stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_for(output_dir / "hanging", first, log_path)
            finally:
                first.kill()  # SIGKILL: no `finally`, no atexit, nothing of Python's cleanup runs.
                first.wait()
            assert first.returncode == -signal.SIGKILL
            assert (output_dir / FIRST_CHECKPOINT / "trainer_state.json").is_file()
            assert not (output_dir / LAST_CHECKPOINT).exists()
            second = subprocess.run([*worker, "--resume"], stdout=log, stderr=subprocess.STDOUT, timeout=300)
        assert second.returncode == 0, log_path.read_text()[-3000:]
        expected = adapter(uninterrupted.output_dir / LAST_CHECKPOINT)
        assert max_difference(adapter(output_dir / LAST_CHECKPOINT), expected) <= RESUME_TOLERANCE


def wait_for(path: Path, process: subprocess.Popen, log_path: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(
                f"The worker exited ({process.returncode}) before {path.name}:\n{log_path.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"No {path.name} after {timeout} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


class TestInterruptedWrites:
    def test_crash_during_calibration_leaves_nothing_and_the_next_run_recalibrates(
        self, uninterrupted, tiny_model_dir, tmp_path
    ):
        output_dir = tmp_path / "out"
        with mock.patch("trl_nspo.nspo_trainer.compute_projectors", side_effect=KeyboardInterrupt):
            with pytest.raises(KeyboardInterrupt):
                build_trainer(tiny_model_dir, output_dir)
        assert projector_files(output_dir) == []
        # What a save killed by SIGKILL leaves behind (no `finally` runs): part of a temporary file.
        output_dir.mkdir(parents=True, exist_ok=True)
        partial = (uninterrupted.output_dir / PROJECTORS_FILE_NAME).read_bytes()[:1000]
        (output_dir / f".{PROJECTORS_FILE_NAME}.killed.tmp").write_bytes(partial)
        calibrated = NullSpaceProjectors.load(uninterrupted.output_dir)
        with mock.patch("trl_nspo.nspo_trainer.compute_projectors", return_value=calibrated) as calibration:
            build_trainer(tiny_model_dir, output_dir)
        calibration.assert_called_once()
        assert NullSpaceProjectors.load(output_dir).metadata() == calibrated.metadata()

    def test_crash_while_writing_projectors_never_leaves_a_file_to_load(self, uninterrupted, tiny_model_dir, tmp_path):
        output_dir = tmp_path / "out"
        calibrated = NullSpaceProjectors.load(uninterrupted.output_dir)
        with mock.patch("trl_nspo.nspo_trainer.compute_projectors", return_value=calibrated):
            with mock.patch("trl_nspo.projectors.save_file", side_effect=save_file_that_dies_half_way):
                with pytest.raises(OSError, match="No space left"):
                    build_trainer(tiny_model_dir, output_dir)
            assert projector_files(output_dir) == []
            trainer = build_trainer(tiny_model_dir, output_dir)
        # A final save elsewhere that dies while copying the projectors leaves no file there to load.
        final = tmp_path / "final"
        with (
            mock.patch("trl_nspo.projectors.os.link", side_effect=OSError(18, "Invalid cross-device link")),
            mock.patch("trl_nspo.projectors.shutil.copyfile", side_effect=OSError(28, "No space left on device")),
        ):
            with pytest.raises(OSError, match="No space left"):
                trainer.save_model(str(final))
        assert projector_files(final) == []
        trainer.save_model(str(final))
        assert file_sha256(final / PROJECTORS_FILE_NAME) == file_sha256(output_dir / PROJECTORS_FILE_NAME)

    def test_non_finite_gradient_stops_training_before_the_adapter_is_corrupted(
        self, uninterrupted, tiny_model_dir, tmp_path
    ):
        output_dir = restart_dir(tmp_path, uninterrupted)
        trainer = build_trainer(tiny_model_dir, output_dir)
        compute_loss = trainer.compute_loss
        steps = []

        def loss_that_turns_nan_after_the_checkpoint(*args, **kwargs):
            steps.append(len(steps) + 1)  # one loss per step: no gradient accumulation
            loss = compute_loss(*args, **kwargs)
            return loss * float("nan") if steps[-1] == SAVE_STEPS + 1 else loss

        trainer.compute_loss = loss_that_turns_nan_after_the_checkpoint
        with pytest.raises(NullSpaceError, match="non-finite"):
            trainer.train()
        # Nothing non-finite in memory or on disk: the run resumes from the last checkpoint.
        assert all(torch.isfinite(p).all() for n, p in trainer.model.named_parameters() if "lora_" in n)
        assert not (output_dir / LAST_CHECKPOINT).exists()


class TestBadCalibrationData:
    @pytest.mark.parametrize(
        "rows, message",
        [
            ({"text": []}, "calibration dataset is empty"),
            ({"text": ["", ""]}, "tokenized to nothing"),
            ({"question": ["What?"]}, "needs one of 'prompt'"),
        ],
    )
    def test_unusable_data_is_refused_and_nothing_is_saved(self, tiny_model_dir, tmp_path, rows, message):
        with pytest.raises(NullSpaceError, match=message):
            NSPOTrainer(
                str(tiny_model_dir),
                length_reward,
                NSPOConfig(**config(tmp_path)),
                train_dataset=TRAIN,
                calibration_dataset=Dataset.from_dict(rows),
                peft_config=lora(),
            )
        assert projector_files(tmp_path / "out") == []

    def test_empty_and_long_rows_are_dropped_truncated_counted_and_saved(
        self, tiny_model_dir, tiny_tokenizer, tmp_path, caplog
    ):
        short = "What is 12 times 7?"
        long = "How do I bake bread at home? Mix flour, water, salt and yeast, then knead and let it rise."
        short_tokens = len(tiny_tokenizer(short)["input_ids"])
        assert short_tokens < 12 < len(tiny_tokenizer(long)["input_ids"])
        tokens = 12 + short_tokens
        with (
            caplog.at_level(logging.WARNING, logger="trl_nspo"),
            pytest.warns(UserWarning, match=rf"fewer tokens than the input size.*\({tokens} tokens < input size 64\)"),
        ):
            trainer = NSPOTrainer(
                str(tiny_model_dir),
                length_reward,
                NSPOConfig(**config(tmp_path, calibration_max_length=12)),
                train_dataset=TRAIN,
                calibration_dataset=Dataset.from_dict({"text": ["", long, short]}),
                peft_config=lora(),
            )
        counts = trainer.projectors.calibration
        assert (counts.rows, counts.empty_rows, counts.truncated_rows) == (3, 1, 1)
        assert counts.token_count == tokens
        assert "1 of 3 calibration rows were longer than calibration_max_length=12" in caplog.text
        assert NullSpaceProjectors.load(tmp_path / "out").calibration == counts

    def test_float16_overflow_names_the_module_and_the_fix(self, tiny_model_dir, tiny_tokenizer, tmp_path):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float16)
        with torch.no_grad():
            # 64 inputs of order one times 6e4 overflow float16 (largest finite value 65504).
            model.model.layers[0].mlp.up_proj.weight.fill_(6e4)
        with pytest.raises(NullSpaceError, match=r"input of model\.layers\.0\.mlp\.down_proj.*float16.*float32"):
            NSPOTrainer(
                model,
                length_reward,
                NSPOConfig(**config(tmp_path)),
                train_dataset=TRAIN,
                calibration_dataset=Dataset.from_dict({"text": ["What is 12 times 7?"]}),
                processing_class=tiny_tokenizer,
                peft_config=lora(),
            )
        assert projector_files(tmp_path / "out") == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"null_space_alpha": 0.0}, "alpha must be in"),
        ({"null_space_alpha": float("nan")}, "alpha must be in"),
        ({"null_space_rule": "energy", "null_space_energy": 1.0}, "energy must be in"),
        ({"null_space_energy": -1e-4}, "energy must be in"),
        ({"null_space_max_dim": 0}, "max_null_dim must be a positive integer"),
        ({"null_space_max_dim": -4}, "max_null_dim must be a positive integer"),
        ({"calibration_num_samples": 0}, "num_samples` must be a positive integer"),
        ({"calibration_max_length": -1}, "max_length` must be a positive integer"),
        ({"calibration_completion_length": 0}, "completion_length` must be a positive integer"),
        ({"calibration_groups_per_pass": 0}, "groups_per_pass` must be ≥ 1"),
        ({"preservation_sketch_dim": -1}, "sketch_dim` must be ≥ 0"),
    ],
)
def test_bad_settings_fail_at_config_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        NSPOConfig(**config(tmp_path, **overrides))
