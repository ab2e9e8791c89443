"""Calibration: the inputs each constrained linear layer sees on general-task data, turned into null-space projectors.

This is the only module that knows about forward hooks and attention masks (which modules are constrained, and how
adapters are switched off, is [`~targets`]'s). The steps follow PEFT's data-driven LoRA initialisations (EVA, CorDA):
collect statistics with hooks (padding removed with the attention mask) → find layers that read the same input and
compute their statistics once → sum them across processes (accelerate's `reduce`) → eigendecompose → keep the smaller
basis. The token sequences come from [`~calibration_data.calibration_token_sequences`], the file's fingerprints from
[`~fingerprints`].
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch
from accelerate import PartialState
from accelerate.utils import reduce
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

from .calibration_data import (
    CalibrationSettings,
    calibration_token_sequences,
    eval_mode,
    pad_token_id,
    right_padded_batches,
)
from .fingerprints import calibration_record, model_fingerprint, projectors_calibration_record
from .null_space import CovarianceAccumulator, InputStatistics, NullSpaceError, NullSpaceRule
from .projectors import NullSpaceProjectors, ProjectorGroup
from .targets import adapters_disabled, find_constrained_modules

logger = logging.getLogger(__name__)


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _shared_input_groups(
    model: nn.Module, modules: dict[str, nn.Module], input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> list[list[str]]:
    """Groups modules that receive identical inputs (q/k/v, gate/up), found on one batch as PEFT's EVA does."""
    seen: dict[str, torch.Tensor] = {}

    def remember(name: str):
        def hook(module, args, kwargs):
            seen[name] = _layer_input(args, kwargs)

        return hook

    handles = [m.register_forward_pre_hook(remember(n), with_kwargs=True) for n, m in modules.items()]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    for name in modules:
        if name not in seen:
            raise NullSpaceError(f"Module {name} was not called in a forward pass, so it cannot be calibrated.")
        current = seen[name]
        for group in groups:
            first = seen[group[0]]
            if first is current or (first.shape == current.shape and torch.equal(first, current)):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


@torch.no_grad()
def _accumulate_covariances(
    model: nn.Module,
    modules: dict[str, nn.Module],
    groups: list[list[str]],
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    settings: CalibrationSettings,
    show_progress: bool,
    description: str,
    float32_products: bool,
) -> dict[str, list[CovarianceAccumulator]]:
    device = next(model.parameters()).device
    # Each process sketches with its own seed: the summed sketch then has independent columns on every token.
    state = PartialState()
    accumulators: dict[str, list[CovarianceAccumulator]] = {}
    current: dict[str, torch.Tensor | int] = {}

    def accumulate(name: str):
        def hook(module, args, kwargs):
            inputs = _layer_input(args, kwargs)
            real_tokens = inputs[current["mask"]]
            if not torch.isfinite(real_tokens).all():
                raise NullSpaceError(
                    f"Non-finite activations at the input of {name} during calibration (float16 overflow?). Load the "
                    "model in float32 or bfloat16 for calibration."
                )
            if name not in accumulators:
                accumulators[name] = [
                    CovarianceAccumulator(
                        inputs.shape[-1],
                        settings.sketch_dim,
                        device=device,
                        seed=settings.seed + state.process_index + fold * state.num_processes,
                        float32_products=float32_products,
                    )
                    for fold in range(settings.folds)
                ]
            accumulators[name][current["fold"]].update(real_tokens)

        return hook

    handles = [modules[group[0]].register_forward_pre_hook(accumulate(group[0]), with_kwargs=True) for group in groups]
    # Fold f holds every `folds`-th sequence from the f-th: each fold's batches run on their own.
    fold_sequences = [sequences[fold :: settings.folds] for fold in range(settings.folds)]
    total = sum((len(part) + settings.batch_size - 1) // settings.batch_size for part in fold_sequences)
    try:
        with tqdm(total=total, desc=description, disable=not show_progress) as progress:
            for fold, part in enumerate(fold_sequences):
                current["fold"] = fold
                for input_ids, attention_mask in right_padded_batches(part, settings.batch_size, pad_id, device):
                    current["mask"] = attention_mask.bool()
                    model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                    progress.update()
    finally:
        for handle in handles:
            handle.remove()
    for folds in accumulators.values():
        for accumulator in folds:
            accumulator.sum = reduce(accumulator.sum, reduction="sum")
            accumulator.sketch = reduce(accumulator.sketch, reduction="sum")
            token_count = reduce(torch.tensor(accumulator.token_count, device=device), reduction="sum")
            accumulator.token_count = int(token_count.item())
    return accumulators


def layer_input_fold_covariances(
    model: nn.Module,
    modules: dict[str, nn.Module],
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    settings: CalibrationSettings,
    show_progress: bool = True,
    float32_products: bool = False,
) -> Iterator[tuple[list[str], list[CovarianceAccumulator]]]:
    """
    Runs token sequences through the model (adapters disabled, eval mode) and yields, for each set of modules that
    read the same input, that input's statistics in `settings.folds` folds (every `folds`-th sequence; summed across
    ranks under `torch.distributed`).

    Yields one group at a time, doing one forward pass over the data per `settings.groups_per_pass` groups, so at
    most that many groups' d × d covariances (one per fold) are alive at once.

    Args:
        model (`nn.Module`):
            The model, plain or PEFT-wrapped.
        modules (`dict[str, nn.Module]`):
            The modules whose inputs to collect (see [`find_constrained_modules`]).
        sequences (`Sequence[Sequence[int]]`):
            Token ids of this rank's sequences (see [`~calibration_data.calibration_token_sequences`]).
        pad_id (`int`):
            Token id used for (right) padding; padded positions are masked out.
        settings ([`CalibrationSettings`]):
            Batch size, sketch size, folds, groups per pass and seed.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar.
        float32_products (`bool`, *optional*, defaults to `False`):
            Multiply in float32 (see [`~null_space.CovarianceAccumulator`]): for null spaces selected with an energy
            budget, not for an exact kernel or an exact measurement.

    Yields:
        `tuple[list[str], list[CovarianceAccumulator]]`: the module names sharing the input, and its statistics per
        fold.
    """
    device = next(model.parameters()).device
    with eval_mode(model), adapters_disabled(model):
        first_ids, first_mask = next(right_padded_batches(sequences, settings.batch_size, pad_id, device))
        groups = _shared_input_groups(model, modules, first_ids, first_mask)
        groups_per_pass = settings.groups_per_pass or len(groups)
        passes = [groups[i : i + groups_per_pass] for i in range(0, len(groups), groups_per_pass)]
        for index, pass_groups in enumerate(passes):
            description = "NSPO calibration: layer inputs"
            if len(passes) > 1:
                description += f" (pass {index + 1}/{len(passes)})"
            accumulators = _accumulate_covariances(
                model, modules, pass_groups, sequences, pad_id, settings, show_progress, description, float32_products
            )
            # The caller decomposes each covariance between two yields: this bar shows that work.
            for group in tqdm(pass_groups, desc="NSPO calibration: null spaces", disable=not show_progress):
                yield group, accumulators.pop(group[0])


def layer_input_covariances(
    model: nn.Module,
    modules: dict[str, nn.Module],
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    settings: CalibrationSettings,
    show_progress: bool = True,
    float32_products: bool = False,
) -> Iterator[tuple[list[str], CovarianceAccumulator]]:
    """
    As [`layer_input_fold_covariances`], with the folds merged: each shared input's statistics over every sequence.
    """
    for group, folds in layer_input_fold_covariances(
        model, modules, sequences, pad_id, settings, show_progress, float32_products
    ):
        yield group, CovarianceAccumulator.merged(folds)


def compute_projectors(
    model: nn.Module,
    processing_class,
    dataset: Dataset,
    settings: CalibrationSettings | None = None,
    rule: NullSpaceRule | None = None,
    target_modules: str | Sequence[str] | None = None,
    show_progress: bool = True,
    task_dataset: Dataset | None = None,
) -> NullSpaceProjectors:
    """
    Calibrates a model on general-task data and returns the null-space projectors of its constrained layers.

    With several processes (as accelerate's `PartialState` sees them), each calibrates on its share of the rows, the
    covariances are summed across processes, and every process decomposes the same summed covariance, so the
    projectors are identical everywhere.

    Args:
        model (`nn.Module`):
            The model (plain or PEFT-wrapped). Calibration runs with adapters disabled, in eval mode, without
            gradients.
        processing_class ([`~transformers.PreTrainedTokenizerBase`] or processor):
            Tokenizer (with a chat template for conversational data).
        dataset ([`~datasets.Dataset`]):
            General-task data with a `prompt`, `messages` or `text` column.
        settings ([`CalibrationSettings`], *optional*):
            What to feed the model; defaults follow the paper.
        rule ([`NullSpaceRule`], *optional*):
            How to select each null space; defaults to α = 5e-5 of the largest eigenvalue.
        target_modules (`str` or `Sequence[str]`, *optional*):
            Restricts the constrained modules (see [`find_constrained_modules`]).
        show_progress (`bool`, *optional*, defaults to `True`):
            Show progress bars (on the main rank).
        task_dataset ([`~datasets.Dataset`], *optional*):
            The training prompts, for a rule that reads the task's inputs (`rule="task"`): their layer inputs, each
            prompt followed by the model's greedy answer as `settings` asks, give the task covariance.

    Returns:
        [`NullSpaceProjectors`]
    """
    settings = settings or CalibrationSettings()
    rule = rule or NullSpaceRule()
    state = PartialState()
    show_progress = show_progress and state.is_main_process
    modules = find_constrained_modules(model, target_modules)
    fingerprint = model_fingerprint(model)
    pad_id = pad_token_id(processing_class)
    # Twice as fast on a CPU, and its rounding is far below any energy budget (not an exact kernel's threshold).
    float32_products = not rule.selection.exact_kernel
    task_covariances: dict[str, torch.Tensor] = {}
    task_record = None
    if rule.selection.needs_task_inputs:
        if task_dataset is None:
            raise NullSpaceError(
                f"The {rule.rule!r} null-space rule selects directions from the training prompts' inputs: pass the "
                "training prompts (`NSPOTrainer` passes its `train_dataset`), or choose another rule."
            )
        task_sequences, _ = calibration_token_sequences(model, processing_class, task_dataset, settings, show_progress)
        task_settings = replace(settings, folds=1, sketch_dim=0)
        task_sequences = _local_share(task_sequences, "training")
        for names, accumulator in layer_input_covariances(
            model, modules, task_sequences, pad_id, task_settings, show_progress, float32_products
        ):
            task_covariances[names[0]] = accumulator.sum
        task_record = calibration_record(model, processing_class, task_dataset, settings)
    sequences, counts = calibration_token_sequences(model, processing_class, dataset, settings, show_progress)
    local_sequences = _local_share(sequences, "calibration")
    if settings.folds > 1 and len(local_sequences) < settings.folds and rule.selection.needs_folds:
        raise NullSpaceError(
            f"The {rule.rule!r} rule needs calibration sequences in each of the {settings.folds} folds on every "
            f"process, and this process has {len(local_sequences)}; pass more calibration rows."
        )
    groups: dict[str, ProjectorGroup] = {}
    for names, folds in layer_input_fold_covariances(
        model, modules, local_sequences, pad_id, settings, show_progress, float32_products
    ):
        statistics = InputStatistics([fold.sum for fold in folds], task=task_covariances.pop(names[0], None))
        try:
            selection = rule.select(statistics)
        except NullSpaceError as error:
            raise NullSpaceError(f"{names[0]}: {error}") from error
        merged = CovarianceAccumulator.merged(folds)
        groups[names[0]] = ProjectorGroup(
            names,
            selection.basis.to(device="cpu", dtype=torch.float32),
            merged.token_count,
            merged.sketch.float().cpu() if settings.sketch_dim else None,
            selection.eigenvalues.cpu(),
            calibration_share=selection.basis.energy_share(merged.sum),
            heldout_share=selection.heldout_share,
        )
    calibration = projectors_calibration_record(model, processing_class, dataset, settings, sequences, counts)
    if task_record is not None:
        calibration.task_rows_fingerprint = task_record.rows_fingerprint
        calibration.task_prompt_fingerprint = task_record.prompt_fingerprint
    projectors = NullSpaceProjectors(groups=groups, rule=rule, model_fingerprint=fingerprint, calibration=calibration)
    _warn_about_thin_calibration(projectors)
    return projectors


def _local_share(sequences: list[list[int]], what: str) -> list[list[int]]:
    """This process's share of the sequences (every `num_processes`-th)."""
    state = PartialState()
    local = sequences[state.process_index :: state.num_processes]
    if not local:
        raise NullSpaceError(
            f"{len(sequences)} {what} sequences cannot be shared among {state.num_processes} processes; pass at "
            "least one row per process."
        )
    return local


def _warn_about_thin_calibration(projectors: NullSpaceProjectors) -> None:
    thin = [
        f"{key} ({group.token_count} tokens < input size {group.basis.input_dim})"
        for key, group in projectors.groups.items()
        if group.token_count < group.basis.input_dim
    ]
    if thin:
        warnings.warn(
            "Calibration saw fewer tokens than the input size of some layers, so their null space is (in part) an "
            f"artefact of too little data rather than a property of general-task inputs: {'; '.join(thin[:4])}"
            f"{' …' if len(thin) > 4 else ''}. Use more calibration samples or longer completions.",
            stacklevel=2,
        )
