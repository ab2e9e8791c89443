"""Binding null-space projectors to a model's trainable parameters, and keeping them in the null space.

Trap 1 of the method: Adam divides each coordinate by its own √v, so a projected gradient does not give a projected
update, and neither AdamW's decay nor LoRA's random init of A lie in the null space. The guarantee is therefore
carried by the parameters themselves: they are projected at the start and after every optimizer step; gradients are
projected too, so that clipping, `grad_norm` and Adam's moments see only the part that will be kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from peft import LoraConfig, PeftConfig
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .calibration import base_linear, find_constrained_modules
from .null_space import NullSpaceBasis, NullSpaceError
from .projectors import NullSpaceProjectors

# LoRA initialisations that leave the base weights and the product B·A as they are (B·A = 0, or A is re-projected).
_SAFE_LORA_INITS = (True, False, "gaussian")


class UnsupportedSetupError(NullSpaceError):
    """Raised for a training setup in which the null-space guarantee cannot be honoured."""


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
    if not isinstance(model, nn.Module) or not is_peft_model(model):
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


@dataclass
class _ConstrainedWeight:
    """One parameter whose rows must stay in a null space, with what is needed to measure its output change."""

    module_name: str
    parameter: nn.Parameter
    basis: NullSpaceBasis
    # Full fine-tuning only: the part of the starting weight (one row per output) outside the null space (W₀·R when R
    # is stored, else W₀ itself), so that W ← W₀ + (W − W₀)·P can be applied without a full copy when R is smaller.
    anchor: torch.Tensor | None = None
    # Rows = a sketch of the calibration inputs; `base_outputs` = W₀ applied to them in float32 (full fine-tuning),
    # `base_outputs_in_compute_dtype` the same as the forward computes it when that is not float32, and
    # `base_output_norm` = ‖W₀·K·S‖ for the preservation ratio.
    sketch_rows: torch.Tensor | None = None
    base_outputs: torch.Tensor | None = None
    base_outputs_in_compute_dtype: torch.Tensor | None = None
    base_output_norm: float = 0.0
    # GPT-2's `Conv1D` stores its weight as (d_in, d_out): the rows that must stay in the null space are its columns.
    transposed: bool = False

    def as_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (laid out as the parameter) with one row per output, or back: the transpose is its own inverse."""
        return tensor.T if self.transposed else tensor


class NullSpaceConstraint:
    """
    Keeps every constrained parameter of a model exactly in the null space of its layer's calibration inputs.

    With LoRA, the constrained parameters are the `lora_A` weights of the constrained layers (the update is
    s·B·A, so A·K = 0 is enough and B is free); with full fine-tuning, the layers' weights, whose change from the
    starting weights is projected.

    Args:
        model (`nn.Module`):
            The (PEFT-wrapped) model, after wrapping.
        projectors ([`NullSpaceProjectors`]):
            Projectors that match the model (see [`NullSpaceProjectors.validated_for_run`]).
        target_modules (`str` or `list[str]`, *optional*):
            The constrained modules, as given to calibration.
        autocast_dtype (`torch.dtype`, *optional*):
            The dtype mixed-precision autocast runs the forward in (bf16 or fp16), if the forward is autocast; without
            it, each constrained layer computes in its constrained parameter's dtype. Only the measurement
            [`~NullSpaceConstraint.preservation_error_in_compute_dtype`] depends on it.
    """

    def __init__(
        self,
        model: nn.Module,
        projectors: NullSpaceProjectors,
        target_modules: str | list[str] | None = None,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.is_lora = is_peft_model(model)
        self.autocast_dtype = autocast_dtype
        modules = find_constrained_modules(model, target_modules)
        bases = projectors.basis_by_module()
        sketches = {name: group.input_sketch for group in projectors.groups.values() for name in group.module_names}
        self.weights: list[_ConstrainedWeight] = []
        self.lora_b_parameters: set[int] = set()
        for name, module in modules.items():
            for parameter in self._constrained_parameters(module):
                basis = bases[name].to(device=parameter.device)
                transposed = not self.is_lora and isinstance(module, Conv1D)
                entry = _ConstrainedWeight(name, parameter, basis, transposed=transposed)
                if not self.is_lora:
                    start = entry.as_rows(parameter.detach().float())
                    entry.anchor = start.clone() if basis.stores_null else start @ basis.basis
                sketch = sketches.get(name)
                if sketch is not None:
                    entry.sketch_rows = sketch.T.contiguous().to(device=parameter.device, dtype=torch.float32)
                    if self.is_lora:
                        base_outputs = self._base_outputs(module, entry.sketch_rows)
                    else:
                        # W₀ exactly as stored, in float32 like the trained weights it is compared with.
                        base_outputs = entry.sketch_rows @ start.T
                        entry.base_outputs = base_outputs
                        if self.compute_dtype(entry) != torch.float32:
                            entry.base_outputs_in_compute_dtype = _outputs_in(
                                self.compute_dtype(entry), entry.sketch_rows, start
                            )
                    entry.base_output_norm = torch.linalg.matrix_norm(base_outputs.double()).item()
                self.weights.append(entry)
            if self.is_lora:
                self.lora_b_parameters.update(id(module.lora_B[a].weight) for a in module.active_adapters)
        self._modules = modules

    def _constrained_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        if isinstance(module, LoraLayer):
            return [module.lora_A[adapter].weight for adapter in module.active_adapters if adapter in module.lora_A]
        return [module.weight]

    @staticmethod
    @torch.no_grad()
    def _base_outputs(module: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        layer = base_linear(module)
        reference = layer.weight
        dtype = reference.dtype if reference.is_floating_point() else torch.float32
        outputs = layer(rows.to(dtype)).float()
        if getattr(layer, "bias", None) is not None:
            outputs = outputs - layer.bias.float()
        return outputs

    def compute_dtype(self, entry: _ConstrainedWeight) -> torch.dtype:
        """The dtype the forward multiplies `entry`'s layer in: autocast's when it is on, else the parameter's own."""
        return self.autocast_dtype or entry.parameter.dtype

    def lora_ranks(self) -> dict[str, int]:
        return {entry.module_name: entry.parameter.shape[0] for entry in self.weights} if self.is_lora else {}

    def check_ranks(self) -> None:
        """Refuses LoRA ranks above a module's null dimension: A's rows could not be independent there."""
        too_small = [
            f"{entry.module_name} (null dim {entry.basis.null_dim} < rank {entry.parameter.shape[0]})"
            for entry in self.weights
            if self.is_lora and entry.basis.null_dim < entry.parameter.shape[0]
        ]
        empty = [entry.module_name for entry in self.weights if entry.basis.null_dim == 0]
        if empty:
            raise NullSpaceError(
                f"The null space of {len(empty)} module(s) is empty, so they could not train at all: {empty[:6]}. "
                "Raise `null_space_alpha` (relative rule) or `null_space_energy` (energy rule), or exclude them with "
                "`nspo_target_modules`."
            )
        if too_small:
            raise NullSpaceError(
                f"The LoRA rank exceeds the null dimension of {len(too_small)} module(s): {too_small[:6]}. Lower the "
                "LoRA rank `r`, raise `null_space_alpha` / `null_space_energy`, or exclude those modules."
            )

    def unconstrained_trainable_parameters(self, model: nn.Module) -> list[str]:
        """Names of trainable parameters that neither are constrained nor are LoRA B matrices of constrained layers."""
        allowed = {id(entry.parameter) for entry in self.weights} | self.lora_b_parameters
        return [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in allowed]

    def freezing_code(self, model: nn.Module) -> str | None:
        """
        Python that freezes exactly the unconstrained trainable parameters of `model` (full fine-tuning), for error
        messages: the shortest name suffixes that match them and no constrained weight. `None` if there is none.
        """
        constrained_ids = {id(entry.parameter) for entry in self.weights}
        constrained = {name for name, p in model.named_parameters() if id(p) in constrained_ids}
        suffixes: list[str] = []
        for name in self.unconstrained_trainable_parameters(model):
            parts = name.split(".")
            candidates = (".".join(parts[-length:]) for length in range(1, len(parts) + 1))
            suffix = next((s for s in candidates if not any(c.endswith(s) for c in constrained)), None)
            if suffix is None:
                return None
            suffixes.append(suffix)
        # A suffix that ends with a shorter one already listed adds nothing ("input_layernorm.weight", "norm.weight").
        kept = [s for s in dict.fromkeys(suffixes) if not any(s != t and s.endswith(t) for t in suffixes)]
        if not kept:
            return None
        return (
            "for name, parameter in model.named_parameters():\n"
            f"    if name.endswith({tuple(kept)!r}):\n"
            "        parameter.requires_grad_(False)"
        )

    def _projected(self, entry: _ConstrainedWeight) -> torch.Tensor:
        """`entry`'s parameter put back into its null space (for full fine-tuning: its change since the start)."""
        current = entry.as_rows(entry.parameter.data.float())
        if self.is_lora:
            return entry.basis.project_rows(current)
        if entry.basis.stores_null:
            return entry.as_rows(entry.anchor + entry.basis.project_rows(current - entry.anchor))
        # W₀ + (W − W₀)·(I − R·Rᵀ) = W − (W·R − W₀·R)·Rᵀ
        basis = entry.basis.basis
        return entry.as_rows(current - (current @ basis - entry.anchor) @ basis.T)

    def drift(self) -> float:
        """
        ‖part outside the null space‖ / ‖parameters‖ over all constrained weights, changing nothing (for LoRA, the
        part of A outside the null space; for full fine-tuning, the part of the change since the start outside it).
        """
        return self._measure_and_project(write=False)

    def project_parameters(self) -> float:
        """
        Puts every constrained parameter back into its null space.

        Returns:
            `float`: the [`~NullSpaceConstraint.drift`] before projecting, i.e. how far the optimizer drifted.
        """
        return self._measure_and_project(write=True)

    @torch.no_grad()
    def _measure_and_project(self, write: bool) -> float:
        removed_sq = 0.0
        total_sq = 0.0
        for entry in self.weights:
            current = entry.parameter.data.float()
            projected = self._projected(entry)
            removed_sq += torch.linalg.matrix_norm(current - projected).item() ** 2
            total_sq += torch.linalg.matrix_norm(current).item() ** 2
            if write:
                entry.parameter.data.copy_(projected.to(entry.parameter.dtype))
        return math.sqrt(removed_sq / total_sq) if total_sq > 0 else 0.0

    @torch.no_grad()
    def project_gradients(self) -> float | None:
        """
        Projects every constrained parameter's gradient onto its null space, in place.

        Returns:
            `float` or `None`: the kept-gradient fraction ‖g·P‖ / ‖g‖ over all constrained weights, `None` when no
            gradient was there.
        """
        kept_sq = 0.0
        total_sq = 0.0
        for entry in self.weights:
            gradient = entry.parameter.grad
            if gradient is None:
                continue
            projected = entry.as_rows(entry.basis.project_rows(entry.as_rows(gradient.float())))
            total_sq += torch.linalg.matrix_norm(gradient.float()).item() ** 2
            kept_sq += torch.linalg.matrix_norm(projected).item() ** 2
            gradient.copy_(projected.to(gradient.dtype))
        if total_sq == 0.0:
            return None
        return math.sqrt(kept_sq / total_sq)

    @torch.no_grad()
    def preservation_error(self) -> dict[str, float]:
        """
        ‖ΔW·K‖ / ‖W·K‖ of the constrained layers on (a random sketch of) the calibration inputs, computed in float32
        from the weights as stored.

        Returns:
            `dict[str, float]`: `"mean"` (over all constrained layers, norms pooled) and `"max"` (worst layer); empty
            when the projectors carry no input sketch.
        """
        return self._preservation_error(in_compute_dtype=False)

    @torch.no_grad()
    def preservation_error_in_compute_dtype(self) -> dict[str, float]:
        """
        [`~NullSpaceConstraint.preservation_error`] as the forward computes it: the sketch and the weights cast to
        each layer's [`~NullSpaceConstraint.compute_dtype`]. Float32 weights kept exactly in the null space still
        change a bf16 forward's outputs, since rounding the weights and inputs to bf16 leaves ΔW·K ≠ 0 there: this
        measures that floor, which the float32 measurement cannot see.

        Returns:
            `dict[str, float]`: as [`~NullSpaceConstraint.preservation_error`]; empty when every constrained layer
            computes in float32 (it would only repeat that measurement).
        """
        if all(self.compute_dtype(entry) == torch.float32 for entry in self.weights):
            return {}
        return self._preservation_error(in_compute_dtype=True)

    def _preservation_error(self, in_compute_dtype: bool) -> dict[str, float]:
        delta_sq = 0.0
        base_sq = 0.0
        worst = 0.0
        for entry in self.weights:
            if entry.sketch_rows is None:
                continue
            dtype = self.compute_dtype(entry) if in_compute_dtype else torch.float32
            module = self._modules[entry.module_name]
            if self.is_lora:
                delta = self._lora_delta_outputs(module, entry, dtype)
            elif dtype == torch.float32:
                delta = entry.sketch_rows @ entry.as_rows(entry.parameter.float()).T - entry.base_outputs
            else:
                weight_rows = entry.as_rows(entry.parameter)
                delta = _outputs_in(dtype, entry.sketch_rows, weight_rows) - entry.base_outputs_in_compute_dtype
            delta_norm = torch.linalg.matrix_norm(delta.double()).item()
            delta_sq += delta_norm**2
            base_sq += entry.base_output_norm**2
            if entry.base_output_norm > 0:
                worst = max(worst, delta_norm / entry.base_output_norm)
        if base_sq == 0.0:
            return {}
        return {"mean": math.sqrt(delta_sq / base_sq), "max": worst}

    @staticmethod
    def _lora_delta_outputs(module: LoraLayer, entry: _ConstrainedWeight, dtype: torch.dtype) -> torch.Tensor:
        adapter = next(a for a in module.active_adapters if module.lora_A[a].weight is entry.parameter)
        hidden = entry.sketch_rows.to(dtype) @ module.lora_A[adapter].weight.to(dtype).T
        return (hidden @ module.lora_B[adapter].weight.to(dtype).T * module.scaling[adapter]).float()


def _outputs_in(dtype: torch.dtype, rows: torch.Tensor, weight_rows: torch.Tensor) -> torch.Tensor:
    """`rows`·Wᵀ as a forward in `dtype` computes it (operands and result rounded to `dtype`), returned in float32."""
    return (rows.to(dtype) @ weight_rows.to(dtype).T).float()
