"""Which modules NSPO constrains, and everything that reads PEFT's internals to find them.

This is the only module that knows how PEFT names, wraps and switches its adapters (`LoraLayer`, `lora_A` /
`lora_B`, `active_adapters`, `base_layer`, `disable_adapter()`), which adapter settings escape the projection, and
how `target_modules` strings are matched (PEFT's own `check_target_module_exists`). Calibration and the constraint
ask it for modules and parameters by canonical name, so projector files work with and without PEFT and wrappers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from types import SimpleNamespace

from accelerate.utils import is_peft_model
from peft import LoraConfig, PeftConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .null_space import NullSpaceError

# Prefixes that DDP (`module.`), PEFT (`base_model.model.`) and `torch.compile` (`_orig_mod.`) put before the names.
_WRAPPER_PREFIXES = ("module.", "base_model.model.", "_orig_mod.")
_CHECKPOINT_WRAPPER = "._checkpoint_wrapped_module"
# LoRA initialisations that leave the base weights and the product B·A as they are (B·A = 0, or A is re-projected).
_SAFE_LORA_INITS = (True, False, "gaussian")


class UnsupportedSetupError(NullSpaceError):
    """Raised for a training setup in which the null-space guarantee cannot be honoured."""


def canonical_module_name(name: str) -> str:
    """A module name without DDP/PEFT/compile/activation-checkpoint wrappers, so projector files work with and without
    PEFT."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    # FSDP2's activation checkpointing wraps each decoder layer; the wrapped layer keeps the wrapper's name.
    return name.replace(_CHECKPOINT_WRAPPER, "")


def modules_by_canonical_name(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of `model` (plain, PEFT-wrapped, DDP-wrapped or compiled) under its canonical name."""
    return {canonical_module_name(name): module for name, module in model.named_modules()}


def _name_matches(name: str, targets: str | Sequence[str]) -> bool:
    # PEFT's own `target_modules` matching: a string is a full-match regex, a list matches names or name suffixes.
    return bool(check_target_module_exists(SimpleNamespace(target_modules=targets), name))


def is_lora_model(model: nn.Module) -> bool:
    """Whether `model` (possibly DDP-wrapped) is a PEFT model, whose constrained parameters are LoRA A matrices."""
    return is_peft_model(model)


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
    if is_lora_model(model):
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                adapters = lora_adapters(module)
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


def lora_adapters(module: nn.Module) -> list[str]:
    """The active adapters of a LoRA layer that have an A matrix (whose rows NSPO constrains); none elsewhere."""
    if not isinstance(module, LoraLayer):
        return []
    return [adapter for adapter in module.active_adapters if adapter in module.lora_A]


def lora_factors(module: nn.Module, adapter: str) -> tuple[nn.Parameter, nn.Parameter, float]:
    """The weights of A and B, and the scale s, of `adapter` in a LoRA layer, whose update is s·B·A."""
    return module.lora_A[adapter].weight, module.lora_B[adapter].weight, module.scaling[adapter]


def adapter_tensor_ids(model: nn.Module) -> set[int]:
    """`id`s of every tensor PEFT added to `model`: adapter weights and the trained copies of `modules_to_save`."""
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


def base_tensor_name(name: str) -> str:
    """The name of a base model tensor as the plain model calls it, wherever PEFT moved it."""
    # PEFT keeps the wrapped layer as `…q_proj.base_layer` (LoRA) or `….original_module` (modules_to_save).
    parts = canonical_module_name(name).split(".")
    return ".".join(part for part in parts if part not in ("base_layer", "original_module"))


def recorded_base_model(model: nn.Module) -> str | None:
    """The base model's name or path as the active PEFT adapter records it (`base_model_name_or_path`), if any."""
    peft_config = getattr(model, "active_peft_config", None)
    return getattr(peft_config, "base_model_name_or_path", None)


def record_base_model(model: nn.Module, name_or_path: str) -> None:
    """Makes the active PEFT adapter (its saved config and model card) name `name_or_path` as its base model."""
    model.active_peft_config.base_model_name_or_path = name_or_path


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
    if not is_lora_model(model):
        yield
        return
    with requires_grad_kept(model), model.disable_adapter():
        yield


@contextlib.contextmanager
def lora_scaled(model: nn.Module, factor: float) -> Iterator[None]:
    """
    A context in which every active LoRA adapter's update s·B·A is multiplied by `factor` (PEFT's per-adapter
    scaling s), so that `factor` in (0, 1) interpolates between the base model and the trained one. An NSPO adapter
    scaled so stays in its null spaces: A is unchanged.
    """
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    saved = [(layer, dict(layer.scaling)) for layer in layers]
    for layer in layers:
        for adapter in lora_adapters(layer):
            layer.scaling[adapter] *= factor
    try:
        yield
    finally:
        for layer, scaling in saved:
            layer.scaling.update(scaling)


def check_peft_config(peft_config: PeftConfig | None, allow_unconstrained_parameters: bool = False) -> list[str]:
    """
    Refuses adapter settings that change general-task outputs outside the projection.

    Args:
        peft_config ([`~peft.PeftConfig`], *optional*):
            The adapter configuration about to be applied; `None` means full fine-tuning.
        allow_unconstrained_parameters (`bool`, *optional*, defaults to `False`):
            Turn the refusal of `modules_to_save` into a warning.

    Returns:
        `list[str]`: warnings to show the user.
    """
    if peft_config is None:
        return []
    if not isinstance(peft_config, LoraConfig):
        raise UnsupportedSetupError(
            f"NSPO projects LoRA adapters; {type(peft_config).__name__} is not supported. Use a `peft.LoraConfig`, or "
            "no `peft_config` for full fine-tuning."
        )
    if peft_config.use_dora:
        raise UnsupportedSetupError(
            "DoRA (`use_dora=True`) rescales the base weight by a trained magnitude vector, which changes general "
            "task outputs outside the null space. Set `use_dora=False`."
        )
    if peft_config.init_lora_weights not in _SAFE_LORA_INITS:
        raise UnsupportedSetupError(
            f"`init_lora_weights={peft_config.init_lora_weights!r}` rewrites the base weights or starts from a "
            "non-null B·A, so general outputs change before training starts. Use `init_lora_weights=True` (default) "
            "or 'gaussian'."
        )
    if peft_config.bias != "none" or getattr(peft_config, "lora_bias", False):
        raise UnsupportedSetupError(
            "Trainable biases (`bias` other than 'none', or `lora_bias=True`) shift every output, on general inputs "
            "too; the null-space projection cannot constrain them. Set `bias='none'` and `lora_bias=False`."
        )
    if getattr(peft_config, "target_parameters", None):
        raise UnsupportedSetupError(
            "LoRA on raw parameters (`target_parameters`, e.g. MoE experts) is not supported by the projection yet. "
            "Target linear modules with `target_modules` instead."
        )
    if peft_config.modules_to_save:
        message = (
            f"`modules_to_save={peft_config.modules_to_save}` trains full copies of those modules without any "
            "null-space constraint, so their general-task outputs will change."
        )
        if not allow_unconstrained_parameters:
            raise UnsupportedSetupError(
                message + " Remove them, or set `allow_unconstrained_parameters=True` to accept this."
            )
        return [message]
    return []


def check_peft_model(model: nn.Module | str, allow_unconstrained_parameters: bool = False) -> list[str]:
    """
    Refuses a PEFT model passed in ready-made whose adapters change general-task outputs outside the projection, or
    that already carry a trained update.

    Every adapter's configuration is checked, whatever its name and whether it is active: an inactive PiSSA/OLoRA
    adapter has already rewritten the base weights when it was added.

    Args:
        model (`nn.Module` or `str`):
            The model passed to the trainer; anything but a [`~peft.PeftModel`] passes.
        allow_unconstrained_parameters (`bool`, *optional*, defaults to `False`):
            Turn the refusal of `modules_to_save` into a warning.

    Returns:
        `list[str]`: warnings to show the user.
    """
    if not isinstance(model, nn.Module) or not is_lora_model(model):
        return []
    messages = []
    for adapter_name, peft_config in model.peft_config.items():
        try:
            messages += check_peft_config(peft_config, allow_unconstrained_parameters)
        except UnsupportedSetupError as error:
            raise UnsupportedSetupError(f"Adapter {adapter_name!r}: {error}") from error
    trained = [
        f"{name} ({adapter})"
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
        for adapter in module.active_adapters
        if adapter in module.lora_B and bool(module.lora_B[adapter].weight.detach().any())
    ]
    if trained:
        raise UnsupportedSetupError(
            f"The model passed in has an adapter whose LoRA B weights are not zero in {len(trained)} layer(s), e.g. "
            f"{trained[:3]}: it already changes the base model's outputs (a trained adapter, or one created with "
            "`init_lora_weights=False`). NSPO keeps an update that starts at zero in the null space; projecting this "
            "adapter's A would silently change what it does. Merge it into the base model "
            "(`model = model.merge_and_unload()`) and train a new adapter on top (`peft_config=LoraConfig(...)`)."
        )
    return messages
