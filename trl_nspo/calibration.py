"""Calibration: the inputs each constrained linear layer sees on general-task data, turned into null-space projectors.

This is the only module that knows about forward hooks, attention masks, PEFT layer types and adapters-off forward
passes. The steps follow PEFT's data-driven LoRA initialisations (EVA, CorDA): collect statistics with hooks (padding
removed with the attention mask) → find layers that read the same input and compute their statistics once → sum them
across processes (accelerate's `reduce`) → eigendecompose → keep the smaller basis. The token sequences come from
[`~calibration_data.calibration_token_sequences`], the file's fingerprints from [`~fingerprints`].
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator, Sequence

import torch
from accelerate import PartialState
from accelerate.utils import is_peft_model, reduce
from datasets import Dataset
from peft.tuners.lora import LoraLayer
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .calibration_data import (
    CalibrationSettings,
    calibration_token_sequences,
    eval_mode,
    pad_token_id,
    right_padded_batches,
)
from .fingerprints import model_fingerprint, projectors_calibration_record
from .null_space import CovarianceAccumulator, NullSpaceBasis, NullSpaceError, NullSpaceRule, decompose_covariance
from .projectors import NullSpaceProjectors, ProjectorGroup

logger = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("module.", "base_model.model.", "_orig_mod.")


def canonical_module_name(name: str) -> str:
    """A module name without DDP/PEFT/compile wrapper prefixes, so projector files work with and without PEFT."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def _name_matches(name: str, targets: str | Sequence[str]) -> bool:
    # Same convention as PEFT's `target_modules`: a string is a full-match regex, a list matches name suffixes.
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith(f".{target}") for target in targets)


def find_constrained_modules(
    model: nn.Module, target_modules: str | Sequence[str] | None = None
) -> dict[str, nn.Module]:
    """
    The linear modules whose updates NSPO keeps in the null space, by canonical name.

    With a PEFT model, these are the LoRA-adapted linear layers (the update is B·A, and A is projected); otherwise the
    `nn.Linear` layers (including bitsandbytes ones) and GPT-2-style `Conv1D` layers (linear, with the weight stored
    transposed), except the output embedding.

    Args:
        model (`nn.Module`):
            The model, plain or PEFT-wrapped.
        target_modules (`str` or `Sequence[str]`, *optional*):
            Restricts the set: a full-match regex, or module-name suffixes (PEFT's convention). `None` keeps all.

    Returns:
        `dict[str, nn.Module]`: the LoRA layers (PEFT) or linear layers, in model order.
    """
    candidates: dict[str, nn.Module] = {}
    not_linear: list[str] = []
    if is_peft_model(model):
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                adapters = [a for a in module.active_adapters if a in module.lora_A]
                if adapters and isinstance(module.lora_A[adapters[0]], nn.Linear):
                    candidates[canonical_module_name(name)] = module
                elif module.active_adapters:
                    not_linear.append(canonical_module_name(name))
    else:
        output_embeddings = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, Conv1D)) and module is not output_embeddings:
                candidates[canonical_module_name(name)] = module
            elif target_modules is not None and _name_matches(canonical_module_name(name), target_modules):
                if len(list(module.children())) == 0 and any(p.requires_grad for p in module.parameters()):
                    if module is output_embeddings:
                        raise NullSpaceError(_output_embedding_message(model, canonical_module_name(name)))
                    not_linear.append(canonical_module_name(name))
    if target_modules is not None:
        candidates = {name: module for name, module in candidates.items() if _name_matches(name, target_modules)}
        not_linear = [name for name in not_linear if _name_matches(name, target_modules)]
    if not_linear:
        raise NullSpaceError(
            f"NSPO can only constrain linear layers, but these targeted modules are not: {not_linear[:6]}. Remove "
            "them from the LoRA `target_modules` / `nspo_target_modules`."
        )
    if not candidates:
        raise NullSpaceError(
            f"No linear layer to constrain was found (target modules: {target_modules!r}). With LoRA, check the "
            "adapter's `target_modules`; otherwise check `nspo_target_modules` against `model.named_modules()`."
        )
    return candidates


def _output_embedding_message(model: PreTrainedModel, name: str) -> str:
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        reason = (
            "its weight is tied to the input embeddings (`tie_word_embeddings=True`), so changing it would also move "
            "the embedding of every input token, which no null space of layer inputs can constrain"
        )
    else:
        reason = (
            "like the original method, NSPO leaves the output embedding out, and constraining it is not implemented"
        )
    return (
        f"`{name}` is the output embedding (an `nn.Linear`), which NSPO does not constrain in full fine-tuning: "
        f"{reason}. Remove it from `nspo_target_modules`, then freeze it "
        "(`model.get_output_embeddings().requires_grad_(False)`) or let it train unconstrained "
        "(`allow_unconstrained_parameters=True`)."
    )


def base_linear(module: nn.Module) -> nn.Module:
    """The frozen base layer of a LoRA layer, or the layer itself."""
    return module.get_base_layer() if isinstance(module, LoraLayer) else module


def constrained_input_dim(module: nn.Module) -> int:
    """Input size d of a constrained LoRA layer, linear layer or GPT-2 `Conv1D` (which calls it `nx`)."""
    return module.nx if isinstance(module, Conv1D) else module.in_features


def _adapter_tensor_ids(model: nn.Module) -> set[int]:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    ids = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attribute in (*module.adapter_layer_names, *module.other_param_names):
                value = getattr(module, attribute, None)
                if isinstance(value, nn.Module):
                    ids.update(id(tensor) for tensor in (*value.parameters(), *value.buffers()))
        elif isinstance(module, ModulesToSaveWrapper):
            ids.update(id(tensor) for tensor in module.modules_to_save.parameters())
    return ids


@contextlib.contextmanager
def requires_grad_kept(model: nn.Module) -> Iterator[None]:
    """
    Puts back every parameter's `requires_grad` on exit. PEFT's `disable_adapter()` and `set_adapter()` make every
    active adapter weight trainable again, which would unfreeze weights frozen on purpose (LoRA-FA's A).
    """
    requires_grad = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        yield
    finally:
        for parameter, flag in requires_grad:
            parameter.requires_grad_(flag)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """A context in which `model` runs as its base model (PEFT adapters disabled); a no-op for plain models."""
    if not is_peft_model(model):
        yield
        return
    with requires_grad_kept(model), model.disable_adapter():
        yield


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
) -> dict[str, CovarianceAccumulator]:
    device = next(model.parameters()).device
    # Each process sketches with its own seed: the summed sketch then has independent columns on every token.
    state = PartialState()
    accumulators: dict[str, CovarianceAccumulator] = {}
    current_mask: list[torch.Tensor] = []

    def accumulate(name: str):
        def hook(module, args, kwargs):
            inputs = _layer_input(args, kwargs)
            real_tokens = inputs[current_mask[0]]
            if not torch.isfinite(real_tokens).all():
                raise NullSpaceError(
                    f"Non-finite activations at the input of {name} during calibration (float16 overflow?). Load the "
                    "model in float32 or bfloat16 for calibration."
                )
            if name not in accumulators:
                accumulators[name] = CovarianceAccumulator(
                    inputs.shape[-1], settings.sketch_dim, device=device, seed=settings.seed + state.process_index
                )
            accumulators[name].update(real_tokens)

        return hook

    handles = [modules[group[0]].register_forward_pre_hook(accumulate(group[0]), with_kwargs=True) for group in groups]
    try:
        batches = right_padded_batches(sequences, settings.batch_size, pad_id, device)
        total = (len(sequences) + settings.batch_size - 1) // settings.batch_size
        for input_ids, attention_mask in tqdm(batches, total=total, desc=description, disable=not show_progress):
            current_mask[:] = [attention_mask.bool()]
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for accumulator in accumulators.values():
        accumulator.sum = reduce(accumulator.sum, reduction="sum")
        accumulator.sketch = reduce(accumulator.sketch, reduction="sum")
        token_count = reduce(torch.tensor(accumulator.token_count, device=device), reduction="sum")
        accumulator.token_count = int(token_count.item())
    return accumulators


def layer_input_covariances(
    model: nn.Module,
    modules: dict[str, nn.Module],
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    settings: CalibrationSettings,
    show_progress: bool = True,
) -> Iterator[tuple[list[str], CovarianceAccumulator]]:
    """
    Runs token sequences through the model (adapters disabled, eval mode) and yields, for each set of modules that
    read the same input, that input's covariance (summed across ranks under `torch.distributed`).

    Yields one group at a time, doing one forward pass over the data per `settings.groups_per_pass` groups, so at
    most that many d × d covariances are alive at once.

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
            Batch size, sketch size, groups per pass and seed.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar.

    Yields:
        `tuple[list[str], CovarianceAccumulator]`: the module names sharing the input, and its statistics.
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
                model, modules, pass_groups, sequences, pad_id, settings, show_progress, description
            )
            # The caller decomposes each covariance between two yields: this bar shows that work.
            for group in tqdm(pass_groups, desc="NSPO calibration: null spaces", disable=not show_progress):
                yield group, accumulators.pop(group[0])


def compute_projectors(
    model: nn.Module,
    processing_class,
    dataset: Dataset,
    settings: CalibrationSettings | None = None,
    rule: NullSpaceRule | None = None,
    target_modules: str | Sequence[str] | None = None,
    show_progress: bool = True,
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

    Returns:
        [`NullSpaceProjectors`]
    """
    settings = settings or CalibrationSettings()
    rule = rule or NullSpaceRule()
    state = PartialState()
    show_progress = show_progress and state.is_main_process
    modules = find_constrained_modules(model, target_modules)
    fingerprint = model_fingerprint(model)
    sequences, counts = calibration_token_sequences(model, processing_class, dataset, settings, show_progress)
    local_sequences = sequences[state.process_index :: state.num_processes]
    if not local_sequences:
        raise NullSpaceError(
            f"{len(sequences)} calibration sequences cannot be shared among {state.num_processes} processes; pass "
            "at least one row per process."
        )
    groups: dict[str, ProjectorGroup] = {}
    pad_id = pad_token_id(processing_class)
    for names, accumulator in layer_input_covariances(
        model, modules, local_sequences, pad_id, settings, show_progress
    ):
        try:
            eigenvalues, eigenvectors = decompose_covariance(accumulator.sum)
            basis = NullSpaceBasis.from_eigh(eigenvalues, eigenvectors, rule.null_dimension(eigenvalues))
        except NullSpaceError as error:
            raise NullSpaceError(f"{names[0]}: {error}") from error
        sketch = accumulator.sketch.float().cpu() if settings.sketch_dim else None
        groups[names[0]] = ProjectorGroup(
            names, basis.to(device="cpu", dtype=torch.float32), accumulator.token_count, sketch, eigenvalues.cpu()
        )
    projectors = NullSpaceProjectors(
        groups=groups,
        rule=rule,
        model_fingerprint=fingerprint,
        calibration=projectors_calibration_record(model, processing_class, dataset, settings, sequences, counts),
    )
    _warn_about_thin_calibration(projectors)
    return projectors


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
