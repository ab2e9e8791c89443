import importlib
import logging
import math
import os
import textwrap
import warnings
from pathlib import Path

import torch
from datasets import Dataset
from huggingface_hub import ModelCard
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints
from trl import GRPOConfig, GRPOTrainer

from .calibration import compute_projectors
from .constraint import PROJECTED_DRIFT_TOLERANCE, NullSpaceConstraint, check_training_engine
from .fingerprints import calibration_record, model_fingerprint
from .model_card import NSPO_PAPER, render_model_card
from .nspo_config import NSPOConfig
from .null_space import NullSpaceError
from .projectors import (
    PROJECTORS_FILE_NAME,
    PROJECTORS_REFERENCE_NAME,
    ModelFingerprint,
    NullSpaceProjectors,
    ProjectorFileError,
    copy_projectors_file,
    existing_projectors_file,
    file_megabytes,
    file_sha256,
    projectors_file_path,
    read_projectors_reference,
    write_projectors_reference,
)
from .targets import (
    UnsupportedSetupError,
    check_peft_config,
    check_peft_model,
    constrained_input_dim,
    find_constrained_modules,
    is_lora_model,
    recorded_base_model,
    requires_grad_kept,
)

logger = logging.getLogger(__name__)
# Below this share of the gradient in the null spaces, the constrained update is much smaller than GRPO's at the same
# learning rate; SmolLM2-135M's was about 0.1 at the default rule (BENCHMARKS.md section 4).
SMALL_KEPT_GRADIENT_FRACTION = 0.25
# Warn when general inputs the null spaces never saw put more than this many times the rule's budget into them.
HELDOUT_NULL_ENERGY_WARNING = 2.0


class HubUnreachableError(ConnectionError):
    """The Hugging Face Hub could not be reached to create the repository `push_to_hub` pushes to."""


class _NullSpaceCallback(TrainerCallback):
    """
    Binds the constraint to the model `accelerator.prepare` returned, once training begins (HF Trainer calls
    `on_train_begin` after preparing), and puts the constrained parameters back into their null space after every
    optimizer step (Adam drifts out), unless only gradients are projected.
    """

    def __init__(self, trainer: "NSPOTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._bind_constraint(self.trainer.model_wrapped)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if args.gradient_projection_only:
            return
        drift = self.trainer.constraint.project_parameters()
        self.trainer._metrics["train"]["nspo/optimizer_drift"].append(drift)


class NSPOTrainer(GRPOTrainer):
    """
    Null-Space constrained Policy Optimization: [`~trl.GRPOTrainer`] whose updates to the constrained linear layers
    cannot change their outputs on general-task inputs.

    Before training, the trainer runs the (PEFT-wrapped) model with adapters disabled on `calibration_dataset`,
    collects every constrained layer's uncentred input covariance K·Kᵀ, and keeps the eigen-directions with
    negligible eigenvalues as that layer's null space. This calibration runs inside `__init__`, and with `prompt`
    data it first calls `model.generate` there, to append the model's greedy answer to every prompt
    (`calibration_generate_completions=False` skips that, preserving the prompts' behaviour alone).

    During training, the LoRA `lora_A` weights (or, in full fine-tuning, the change of each constrained weight) are
    kept exactly in the null space: projected at the start, their gradients projected on every gradient-sync step (so
    clipping and `grad_norm` see what is kept), and projected again after every optimizer step. B·A·K = 0 then holds:
    the layers' general-task outputs stay unchanged.

    Args:
        model, reward_funcs, args, *grpo_args, **grpo_kwargs:
            Exactly as for [`~trl.GRPOTrainer`]; `args` must be an [`NSPOConfig`]. A [`~peft.PeftModel`] passed as
            `model` must carry a fresh adapter (B = 0): a trained one is refused, since the guarantee is about an
            update that starts at zero. In full fine-tuning, the constrained layers are the `nn.Linear` and
            GPT-2-style `Conv1D` layers except the LM head.
        calibration_dataset ([`~datasets.Dataset`], *optional*):
            General-task data (`prompt`, `messages` or `text` column) whose outputs must be preserved. Required
            unless `args.projectors_path` points to an existing projector file.

    Logged metrics: `nspo/kept_gradient_fraction` (‖g·P‖/‖g‖), `nspo/optimizer_drift` (share of the constrained
    weights the optimizer moved out of the null space before re-projection), `nspo/preservation_error` and
    `nspo/preservation_error_max` (‖ΔW·K‖/‖W·K‖ on a sketch of the calibration inputs, in float32), when the forward
    runs in bf16 or fp16 (autocast, or low-precision weights) `nspo/preservation_error_in_compute_dtype` (the same
    ratio as that forward computes it: the rounding floor float32 cannot see), and at the first log
    `nspo/null_dim_min`, `nspo/null_dim_fraction`, `nspo/calibration_null_energy` (median share of the calibration
    inputs' energy inside the null spaces) and `nspo/heldout_null_energy` (the same on calibration folds each null
    space was not computed from: what it lets an update reach of general inputs it never saw). The trainer warns when
    the latter is more than twice the rule's budget.
    """

    _tag_names = ["trl", "grpo", "nspo"]
    _name = "NSPO"
    _paper = NSPO_PAPER

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: NSPOConfig | None = None,
        *grpo_args,
        calibration_dataset: Dataset | None = None,
        **grpo_kwargs,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = NSPOConfig(f"{str(model_name).split('/')[-1]}-NSPO")
        elif not isinstance(args, NSPOConfig):
            kind = "a GRPOConfig" if isinstance(args, GRPOConfig) else type(args).__name__
            raise TypeError(
                f"NSPOTrainer needs an `NSPOConfig` as `args`, got {kind}. Replace GRPOConfig by NSPOConfig."
            )
        peft_config = grpo_kwargs.get("peft_config")
        check_training_engine(
            args, peft=peft_config is not None or (isinstance(model, torch.nn.Module) and is_lora_model(model))
        )
        if peft_config is not None:
            messages = check_peft_config(peft_config, args.allow_unconstrained_parameters)
        else:
            messages = check_peft_model(model, args.allow_unconstrained_parameters)
        for message in messages:
            warnings.warn(message, stacklevel=2)
        location = args.projectors_path or args.output_dir
        if calibration_dataset is None and existing_projectors_file(location) is None:
            raise ValueError(
                "NSPOTrainer needs general-task data to preserve: pass `calibration_dataset=` (a Dataset with a "
                "'prompt', 'messages' or 'text' column), or set `projectors_path` to a saved projector file."
            )

        super().__init__(model, reward_funcs, args, *grpo_args, **grpo_kwargs)

        check_training_engine(args, self.accelerator, self.model)
        # Hashed once per run (O(model bytes)), when a projector file has to be checked against this model.
        self._model_fingerprint: ModelFingerprint | None = None
        self.projectors_file = existing_projectors_file(location)
        if self.projectors_file is not None:
            self.projectors = self._validated(
                NullSpaceProjectors.load(self.projectors_file), str(self.projectors_file), calibration_dataset
            )
            logger.info("Reusing NSPO projectors from %s.", self.projectors_file)
        else:
            self.projectors = compute_projectors(
                self.model,
                self.processing_class,
                calibration_dataset,
                settings=args.calibration_settings(),
                rule=args.null_space_rule_config(),
                target_modules=args.nspo_target_modules,
                task_dataset=self._task_dataset(),
            )
            self._model_fingerprint = self.projectors.model_fingerprint
        self.constraint = NullSpaceConstraint(
            self.model, self.projectors, args.nspo_target_modules, autocast_dtype=_autocast_dtype(self.accelerator)
        )
        # An empty null space is the rule's fault: refused before any file is written, so that the advised rule or
        # threshold recalibrates.
        self.constraint.check_null_spaces()
        rank_warning = self.constraint.rank_warning()
        if rank_warning is not None:
            warnings.warn(rank_warning, stacklevel=2)
        self._check_unconstrained_parameters()
        if self.projectors_file is None:
            # Saved only once every check passed: a refused run must not leave a file that would then refuse the
            # change its error message advises.
            self.projectors_file = self._save_new_projectors(location)
        # Checkpoints reference the run's file by this content hash instead of holding a copy.
        self._projectors_sha256 = file_sha256(self.projectors_file)
        # Bound now, so that the constraint can be read before training (and the adapter that TRL's generation reads
        # is already projected); bound again to the prepared model when training begins.
        self._bind_constraint(self.model)
        self.add_callback(_NullSpaceCallback(self))
        self._warned_small_kept_fraction = False
        null_dims = self.projectors.null_dims()
        self._nspo_start_logs = {
            "nspo/null_dim_min": min(null for null, _ in null_dims.values()),
            "nspo/null_dim_fraction": sum(n for n, _ in null_dims.values()) / sum(d for _, d in null_dims.values()),
            **self.projectors.null_energy_logs(),
        }
        self._warn_if_heldout_null_energy_is_large()
        logger.info("NSPO null spaces:\n%s", self.projectors.summary())

    def _task_dataset(self) -> Dataset | None:
        """The training prompts, for a null-space rule that selects from the task's inputs (else `None`)."""
        if not self.args.null_space_rule_config().selection.needs_task_inputs:
            return None
        if not isinstance(self.train_dataset, Dataset):
            raise NullSpaceError(
                f"The {self.args.null_space_rule!r} null-space rule reads the training prompts' layer inputs, which "
                f"needs a `datasets.Dataset` as `train_dataset` (got {type(self.train_dataset).__name__}); pass one, "
                "or choose the 'heldout' rule."
            )
        return self.train_dataset

    def _warn_if_heldout_null_energy_is_large(self) -> None:
        logs = self._nspo_start_logs
        heldout = logs.get("nspo/heldout_null_energy")
        if heldout is None:
            return
        rule = self.args.null_space_rule_config()
        # The budget an update was meant to keep to: ε where the rule has one, else what it holds in-sample.
        budget = rule.energy if rule.selection.parameter == "energy" else logs["nspo/calibration_null_energy"]
        if heldout > HELDOUT_NULL_ENERGY_WARNING * budget:
            warnings.warn(
                f"The null spaces hold {heldout:.2e} of the energy of calibration data they were not computed from "
                f"(median over inputs), {heldout / budget:.1f}x the budget of {budget:.1e}: on general prompts it "
                "never saw, an update confined to them reaches general behaviour that much more than the rule "
                "promises. Calibrate on more and more varied general data (BENCHMARKS.md section 6 gives the curve), "
                "or use `null_space_rule='heldout'`, which enforces the budget on held-out data.",
                stacklevel=3,
            )

    def _save_new_projectors(self, location: str) -> Path:
        """Writes the run's projector file (on the main process) and logs its size; returns its path on every rank."""
        path = projectors_file_path(location)
        if self.accelerator.is_main_process:
            self.projectors.save(path)
            message = f"Saved NSPO projectors ({file_megabytes(path)}) to {path}."
            logger.info(message)
            # Printed too (INFO logs are hidden by default): the file is published beside the adapter, and its size
            # should be seen before a push.
            print(message)
        self.accelerator.wait_for_everyone()
        return path

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Creates the Hub repository as [`~transformers.Trainer`] does; raises [`HubUnreachableError`], saying how to
        push later, when the Hub cannot be reached."""
        try:
            super().init_hf_repo(token, private)
        except _hub_connection_errors() as error:
            repo = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
            push_later = (
                f"`trainer.push_to_hub()`, or `hf upload {repo} {self.args.output_dir}` (the saved output folder)."
            )
            # Trainer.__init__ creates the repository before the training state exists.
            if getattr(self, "state", None) is None or self.state.global_step == 0:
                advice = (
                    "Nothing has been trained yet. Train now with `push_to_hub=False` (no `--push_to_hub`), then "
                    f"push once the Hub is reachable: {push_later}"
                )
            else:
                advice = (
                    "Nothing was pushed. Save the model (`trainer.save_model()`) and push once the Hub is reachable: "
                    f"{push_later}"
                )
            raise HubUnreachableError(
                f"The Hugging Face Hub is unreachable: the repository {repo!r} could not be created "
                f"({type(error).__name__}: {error}). {advice}"
            ) from error

    def _validated(
        self, projectors: NullSpaceProjectors, source: str, calibration_dataset: Dataset | None = None
    ) -> NullSpaceProjectors:
        """
        The part of `projectors` this run constrains, once [`NullSpaceProjectors.validated_for_run`] has shown they
        belong to this model, modules, rule and, when `calibration_dataset` is given, calibration. Without calibration
        data the file's own record of its data stands: a file given on purpose is used as it was made.
        """
        modules = find_constrained_modules(self.model, self.args.nspo_target_modules)
        if self._model_fingerprint is None:
            self._model_fingerprint = model_fingerprint(self.model)
        expected = None
        if calibration_dataset is not None:
            expected = calibration_record(
                self.model, self.processing_class, calibration_dataset, self.args.calibration_settings()
            )
            task_dataset = self._task_dataset()
            if task_dataset is not None:
                task = calibration_record(
                    self.model, self.processing_class, task_dataset, self.args.calibration_settings()
                )
                expected.task_rows_fingerprint = task.rows_fingerprint
                expected.task_prompt_fingerprint = task.prompt_fingerprint
        return projectors.validated_for_run(
            {name: constrained_input_dim(module) for name, module in modules.items()},
            self._model_fingerprint,
            self.args.null_space_rule_config(),
            expected,
            source,
        )

    def _bind_constraint(self, model: torch.nn.Module) -> float:
        """Binds the constraint to `model`, projecting its parameters unless only gradients are projected; returns
        their drift when bound."""
        return self.constraint.bind(model, project=not self.args.gradient_projection_only)

    def _check_unconstrained_parameters(self) -> None:
        unconstrained = self.constraint.unconstrained_trainable_parameters(self.model)
        if not unconstrained:
            return
        message = (
            f"{len(unconstrained)} trainable parameter(s) are outside the null-space constraint and will change "
            f"general-task outputs: {unconstrained[:6]}{' …' if len(unconstrained) > 6 else ''}."
        )
        if not self.args.allow_unconstrained_parameters:
            code = self.constraint.freezing_code(self.model)
            freeze = (
                f" Freeze them before creating the trainer:\n\n{textwrap.indent(code, '    ')}\n\nor"
                if code
                else " Freeze them (`requires_grad_(False)`),"
            )
            raise UnsupportedSetupError(
                f"{message}{freeze} constrain them (`nspo_target_modules`), or set "
                "`allow_unconstrained_parameters=True` to accept this (the original NSPO code trains them freely)."
            )
        warnings.warn(message, stacklevel=3)

    def _generate_and_score_completions(self, inputs):
        # With `beta` > 0, TRL's reference pass switches adapters off and on through PEFT, unfreezing frozen ones.
        with requires_grad_kept(self.model):
            return super()._generate_and_score_completions(inputs)

    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Only the summed gradient of an accumulation window is used, and projection is linear: project it once.
        if self.accelerator.sync_gradients:
            kept_fraction = self.constraint.project_gradients()
            if kept_fraction is None:
                return loss
            # fp16's gradient scaler skips steps with inf/NaN gradients itself; otherwise the optimizer would write
            # NaN into every constrained weight, and the next checkpoint would save it.
            if not math.isfinite(kept_fraction) and self.accelerator.scaler is None:
                raise NullSpaceError(
                    f"The gradient of the constrained weights is non-finite at step {self.state.global_step + 1} "
                    f"(loss {loss.item():.4g}); nothing was stepped. Resume from the last checkpoint with a lower "
                    "`learning_rate`, `max_grad_norm` set, or float32/bf16 instead of float16 weights."
                )
            self._metrics["train"]["nspo/kept_gradient_fraction"].append(kept_fraction)
            if kept_fraction > 0 and not self._warned_small_kept_fraction:
                self._warn_if_the_null_space_keeps_little(kept_fraction)
        return loss

    def _warn_if_the_null_space_keeps_little(self, kept_fraction: float) -> None:
        # Once per run, at the first step with a gradient (lora_A has none while lora_B is still zero).
        self._warned_small_kept_fraction = True
        if kept_fraction < SMALL_KEPT_GRADIENT_FRACTION:
            logger.warning(
                "Only %.0f%% of the gradient of the constrained weights lies in their null spaces (step %d), so at "
                "this learning rate NSPO's constrained update is about that share of what GRPO's would be. On "
                "SmolLM2-135M NSPO learned no refusal at GRPO's learning rate and needed about 10x (README, 'Is it as "
                "safe as GRPO?'): raise `learning_rate` if the reward does not move, and watch "
                "`nspo/kept_gradient_fraction`.",
                100 * kept_fraction,
                self.state.global_step + 1,
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # GRPOTrainer logs the metrics of the model's mode, but the summary log ending `train()` fires after any
        # evaluation at the last step, in eval mode: the training metrics of steps since the last log would be lost.
        training_log = self.model.training or "train_runtime" in logs
        if training_log:
            logs.update(self._nspo_start_logs)
            self._nspo_start_logs = {}
            errors = self.constraint.preservation_error()
            if errors:
                logs["nspo/preservation_error"] = errors["mean"]
                logs["nspo/preservation_error_max"] = errors["max"]
            # Only when the forward does not compute in float32 (bf16/fp16 autocast or weights): its rounding floor.
            errors = self.constraint.preservation_error_in_compute_dtype()
            if errors:
                logs["nspo/preservation_error_in_compute_dtype"] = errors["mean"]
        was_training = self.model.training
        self.model.train(training_log)
        try:
            super().log(logs, start_time)
        finally:
            self.model.train(was_training)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """
        Trains as [`~trl.GRPOTrainer.train`] does. With `resume_from_checkpoint=True`, resumes from the newest
        *complete* checkpoint in `output_dir`: one a crash cut short (no `trainer_state.json`, which is written
        last) is skipped with a warning instead of failing the resume.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = _last_complete_checkpoint(self.args.output_dir)
        return super().train(resume_from_checkpoint, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # A checkpoint is only a valid resume point for the null spaces it was trained in.
        reference = read_projectors_reference(resume_from_checkpoint)
        checkpoint_file = projectors_file_path(resume_from_checkpoint)
        if reference is not None:
            if reference.sha256 != self._projectors_sha256:
                raise ProjectorFileError(
                    f"Checkpoint {resume_from_checkpoint} was trained with the projector file {reference.path} "
                    f"(SHA-256 {reference.sha256[:12]}…), but this run uses {self.projectors_file} (SHA-256 "
                    f"{self._projectors_sha256[:12]}…): other null spaces or another calibration. Resume with "
                    "`projectors_path` set to the checkpoint's projector file."
                )
        elif checkpoint_file.is_file():
            # A checkpoint holding its own copy (written by trl-nspo before checkpoints referenced the run's file).
            saved = self._validated(NullSpaceProjectors.load(checkpoint_file), str(checkpoint_file))
            if not saved.same_bases(self.projectors):
                raise ProjectorFileError(
                    f"Checkpoint {resume_from_checkpoint} was trained with other null spaces than this run computed "
                    f"(calibration tokens {(saved.calibration.data_fingerprint or '?')[:12]}…). Resume with the "
                    "run's original calibration data and settings, or set `projectors_path` to the checkpoint."
                )
        else:
            raise ProjectorFileError(
                f"Checkpoint {resume_from_checkpoint} has no NSPO projector file or reference "
                f"({PROJECTORS_REFERENCE_NAME}), so it cannot be shown to belong to this constrained run. Resume from "
                "a checkpoint written by NSPOTrainer."
            )
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # HF Trainer loads into the unprepared model, or (FSDP) into the prepared one it passes. A checkpoint
        # NSPOTrainer wrote is in the null space up to float32 rounding, and binding leaves it bitwise as it is, so
        # the resumed run equals an uninterrupted one; only an adapter edited since is projected.
        drift = self._bind_constraint(self.model if model is None else model)
        if drift > PROJECTED_DRIFT_TOLERANCE and not self.args.gradient_projection_only:
            warnings.warn(
                f"The constrained weights in {resume_from_checkpoint} were {drift:.2e} outside their null space "
                "(edited after saving?); projected them back.",
                stacklevel=2,
            )

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        evaluation: dict[str, tuple[float | str, float | str]] | None = None,
        calibration_description: str = "general-task prompts",
    ) -> None:
        """
        Writes the NSPO model card (`README.md`) to the output directory: TRL's card for the run (tags, links to the
        run in Weights & Biases, Trackio or Comet, the NSPO paper, framework versions, citations) under NSPO's head:
        how to load the adapter, training data and rewards, the null-space summary with the projector file's size on
        disk and, if given, an evaluation table.

        The base model is named by its Hub id as the adapter records it (`base_model_name_or_path` of the PEFT
        config, also written to `adapter_config.json`), else as the model was loaded. A model loaded from a local
        copy of a Hub model can record the Hub id before saving:
        `trainer.model.active_peft_config.base_model_name_or_path = "org/name"`.

        Args:
            model_name (`str`, *optional*):
                Name of the adapter; defaults to the output directory's name.
            dataset_name (`str`, *optional*):
                Hub id or description of the safety prompts.
            tags (`str` or `list[str]`, *optional*):
                Extra Hub tags.
            evaluation (`dict[str, tuple]`, *optional*):
                `{metric: (base model value, adapter value)}`.
            calibration_description (`str`, *optional*, defaults to `"general-task prompts"`):
                What the calibration data was.
        """
        if not self.is_world_process_zero():
            return
        model_name = model_name or Path(self.args.output_dir).name
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        readme = Path(self.args.output_dir) / "README.md"
        published_file = Path(self.args.output_dir) / PROJECTORS_FILE_NAME
        card = render_model_card(
            ModelCard.load(readme),
            self.projectors,
            model_name=model_name,
            base_model=self._base_model_hub_id(),
            hub_model_id=self.hub_model_id,
            dataset_name=dataset_name,
            calibration_description=calibration_description,
            reward_names=self.reward_func_names,
            training_steps=self.state.global_step,
            evaluation=evaluation,
            projectors_file=published_file if published_file.is_file() else self.projectors_file,
        )
        card.save(readme)

    def _base_model_hub_id(self) -> str | None:
        """The base model's Hub id as the adapter records it (PEFT's `base_model_name_or_path`), else as the model
        was loaded; `None` when that is a local folder."""
        name_or_path = recorded_base_model(self.model) or self.model.config._name_or_path
        return None if not name_or_path or os.path.isdir(name_or_path) else name_or_path

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """
        Saves the model (adapter) as [`~trl.GRPOTrainer`] does, with the projectors: a checkpoint gets a small
        reference to the run's projector file (path and content hash, checked on resume); any other folder gets the
        file itself, so it is self-contained and can be pushed or loaded elsewhere.
        """
        super().save_model(output_dir, _internal_call)
        if not self.args.should_save:
            return
        directory = Path(output_dir or self.args.output_dir)
        # FSDP's SHARDED_STATE_DICT saves no weights here (they go to the checkpoint's `pytorch_model_fsdp_0/` later),
        # so the folder may not exist yet.
        directory.mkdir(parents=True, exist_ok=True)
        if directory.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-"):
            write_projectors_reference(directory, self.projectors_file, self._projectors_sha256)
            return
        target = directory / PROJECTORS_FILE_NAME
        if file_sha256(self.projectors_file) != self._projectors_sha256:
            warnings.warn(
                f"{self.projectors_file} changed since this run loaded it; saving the projectors this run trained "
                f"with to {target} instead.",
                stacklevel=2,
            )
            self.projectors.save(target)
        elif target.is_file() and target.samefile(self.projectors_file):
            return  # the run's own file is already there (projectors_path defaults to output_dir)
        else:
            # A copy (a hard link where possible), not a reference: a final folder is pushed or moved on its own.
            copy_projectors_file(self.projectors_file, directory)
        logger.info("NSPO projector file (%s) saved to %s.", file_megabytes(target), target)


def _last_complete_checkpoint(output_dir: str) -> str:
    checkpoints = sort_checkpoints(output_dir) if os.path.isdir(output_dir) else []
    complete = [path for path in checkpoints if os.path.isfile(os.path.join(path, "trainer_state.json"))]
    for skipped in checkpoints[checkpoints.index(complete[-1]) + 1 :] if complete else checkpoints:
        warnings.warn(f"Skipping {skipped}: it has no trainer_state.json (a save cut short).", stacklevel=3)
    if not complete:
        raise ValueError(f"No complete checkpoint found in output directory ({output_dir}) to resume from.")
    return complete[-1]


def _hub_connection_errors() -> tuple[type[Exception], ...]:
    """What the Hub client raises when it cannot connect: its offline mode raises a `ConnectionError`, but the
    transport errors of its HTTP client (httpx2, httpx or requests, with the huggingface_hub version) are not ones."""
    errors: list[type[Exception]] = [ConnectionError, TimeoutError]
    for module_name, error_name in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests.exceptions", "ConnectionError"),
        ("requests.exceptions", "Timeout"),
    ):
        try:
            errors.append(getattr(importlib.import_module(module_name), error_name))
        except ImportError:
            continue
    return tuple(errors)


def _autocast_dtype(accelerator) -> torch.dtype | None:
    """The dtype accelerate autocasts the forward to (`bf16=True`, `fp16=True`), or `None` when it does not."""
    if not accelerator.native_amp:
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
