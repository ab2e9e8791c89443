"""Keeping a model's constrained parameters in the null spaces of their layers' calibration inputs.

Trap 1 of the method: Adam divides each coordinate by its own √v, so a projected gradient does not give a projected
update, and neither AdamW's decay nor LoRA's random init of A lie in the null space. The guarantee is therefore
carried by the parameters themselves: they are projected at the start and after every optimizer step; gradients are
projected too, so that clipping, `grad_norm` and Adam's moments see only the part that will be kept.

A [`NullSpaceConstraint`] is built from the model before training (bases, starting weights and outputs, by module
name) and bound late: [`~NullSpaceConstraint.bind`] looks the parameters up by module name in the model as
`accelerator.prepare` returned it. What differs between LoRA and full fine-tuning is in two small strategies; which
training engines keep the guarantee is decided in one place, [`check_training_engine`].
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import TrainingArguments
from transformers.pytorch_utils import Conv1D

from .null_space import NullSpaceBasis, NullSpaceError
from .projectors import NullSpaceProjectors
from .targets import (
    UnsupportedSetupError,
    base_linear,
    find_constrained_modules,
    is_lora_model,
    lora_adapters,
    lora_factors,
    modules_by_canonical_name,
)

# Constrained parameters this far outside their null space (pooled ‖removed‖/‖parameters‖) were not left there by a
# projection, which leaves float32 rounding (~1e-7): binding projects them, and leaves them bitwise alone below it.
PROJECTED_DRIFT_TOLERANCE = 1e-5

_DEEPSPEED_MESSAGE = (
    "NSPOTrainer does not support DeepSpeed: ZeRO keeps the gradients in partitioned buffers (`p.grad` is None after "
    "backward) and steps its own float32 master copy, which it writes back over the parameters, so NSPO's projections "
    "would silently be lost (measured: bench/deepspeed_master_copy.py, docs/fsdp2_findings.md). Use FSDP2 "
    "(`fsdp_version: 2`, examples/accelerate/fsdp2.yaml or fsdp2_qlora.yaml), DDP (`accelerate launch --multi_gpu`) "
    "or a single device."
)
_FSDP1_MESSAGE = (
    "NSPOTrainer does not support FSDP1: its flat parameters cut the rows of the constrained weights, so no process "
    "holds whole rows to project. Use FSDP2 (`fsdp_version: 2` in the Accelerate config, or "
    "`fsdp_config={'version': 2}`), see examples/accelerate/fsdp2.yaml."
)
_LOAD_TIME_SHARDING_MESSAGE = (
    "NSPOTrainer does not support models sharded at load time (`distributed_config`, `tp_plan`): their parameters "
    "are sharded before the constraint is built, by placements the projection cannot act on. Load the model whole "
    "and let FSDP2 shard it at `prepare` (examples/accelerate/fsdp2.yaml)."
)
_PEFT_SHARDED_CHECKPOINT_MESSAGE = (
    "NSPOTrainer refuses LoRA under FSDP2 with SHARDED_STATE_DICT checkpoints and activation checkpointing together: "
    "Accelerate saves the adapter through PEFT's `get_peft_model_state_dict`, which finds nothing once activation "
    "checkpointing has wrapped the decoder layers, so checkpoints silently hold no adapter and a resume starts from a "
    "fresh one (docs/fsdp2_findings.md). Use `fsdp_state_dict_type: FULL_STATE_DICT` "
    "(examples/accelerate/fsdp2_qlora.yaml) or turn off `fsdp_activation_checkpointing`."
)


def _fsdp_settings(args: TrainingArguments, accelerator) -> tuple[int, str, bool] | None:
    """(version, state-dict type, activation checkpointing) of the FSDP the run uses, or `None` without FSDP: from
    Accelerate's plugin when the accelerator exists, else from what `accelerate launch` or `args.fsdp` set."""
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if plugin is not None:
        state_dict_type = str(plugin.state_dict_type).rsplit(".", 1)[-1]
        return int(plugin.fsdp_version), state_dict_type, bool(plugin.activation_checkpointing)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        version = int(os.environ.get("FSDP_VERSION", "1"))
        default_type = "FULL_STATE_DICT" if version == 1 else "SHARDED_STATE_DICT"
        state_dict_type = os.environ.get("FSDP_STATE_DICT_TYPE", default_type).upper()
        checkpointing = os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() in ("1", "true", "yes")
        return version, state_dict_type, checkpointing
    if args.fsdp:
        fsdp_config = args.fsdp_config or {}
        version = int(fsdp_config.get("version", 2))
        state_dict_type = str(fsdp_config.get("state_dict_type", "SHARDED_STATE_DICT")).upper()
        checkpointing = bool(fsdp_config.get("activation_checkpointing", False))
        return version, state_dict_type, checkpointing
    return None


def check_training_engine(
    args: TrainingArguments, accelerator=None, model: nn.Module | None = None, peft: bool | None = None
) -> None:
    """
    The engine policy: refuses the training engines under which the projection would not act on what is trained.

    Single-device and DDP training keep the guarantee exactly: every process holds whole parameters and, once DDP has
    averaged them, whole gradients, and the optimizer steps those. FSDP2 keeps it too: it shards every parameter, its
    gradient and its optimizer state by rows (`Shard(0)`) and steps those shards, and the projection acts on whole
    rows, so each process projects the rows it holds (see [`_local_rows`]). Refused: DeepSpeed (it steps its own
    float32 master copy), FSDP1 (flat parameters cut rows), models sharded at load time, and LoRA with
    SHARDED_STATE_DICT checkpoints plus activation checkpointing (the checkpoints hold no adapter).

    Args:
        args ([`~transformers.TrainingArguments`]):
            The run's arguments. With the environment `accelerate launch` sets, they are enough to refuse an engine
            before anything is loaded.
        accelerator ([`~accelerate.Accelerator`], *optional*):
            The trainer's accelerator, whose state also knows engines turned on by accelerate's own config.
        model (`nn.Module`, *optional*):
            The model before `prepare`, whose parameters are `DTensor`s when it was sharded at load time.
        peft (`bool`, *optional*):
            Whether LoRA trains; found from `model` when not given.

    Raises:
        [`UnsupportedSetupError`]: saying why, and what is supported instead.
    """
    uses_deepspeed = args.deepspeed is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true"
    if accelerator is not None:
        uses_deepspeed = uses_deepspeed or getattr(accelerator.state, "deepspeed_plugin", None) is not None
    if uses_deepspeed:
        raise UnsupportedSetupError(_DEEPSPEED_MESSAGE)
    if model is not None and any(isinstance(parameter, DTensor) for parameter in model.parameters()):
        raise UnsupportedSetupError(_LOAD_TIME_SHARDING_MESSAGE)
    fsdp = _fsdp_settings(args, accelerator)
    if fsdp is None:
        return
    version, state_dict_type, activation_checkpointing = fsdp
    if version != 2:
        raise UnsupportedSetupError(_FSDP1_MESSAGE)
    if peft is None:
        peft = model is not None and is_lora_model(model)
    if peft and state_dict_type == "SHARDED_STATE_DICT" and activation_checkpointing:
        raise UnsupportedSetupError(_PEFT_SHARDED_CHECKPOINT_MESSAGE)


def _local_rows(tensor: torch.Tensor) -> torch.Tensor:
    """
    The rows of a constrained parameter (or of its gradient) that this process projects, as a view to write to: the
    whole tensor, or a `DTensor`'s local shard when FSDP2 shards it by rows (`Shard(0)`) or replicates it. Projecting
    whole rows is the same on every shard, so this is exact; any other placement (a column shard holds part of every
    row) is refused.
    """
    if not isinstance(tensor, DTensor):
        return tensor
    _check_placements(tensor)
    return tensor.to_local()


def _check_placements(tensor: DTensor) -> None:
    if not all(placement.is_replicate() or placement.is_shard(0) for placement in tensor.placements):
        raise UnsupportedSetupError(
            f"A constrained parameter is sharded as {tensor.placements}: the null-space projection needs whole rows "
            "on each process, i.e. `Shard(0)` (FSDP2's default) or `Replicate()`."
        )


def _local_row_range(tensor: torch.Tensor) -> tuple[int, int, float]:
    """(first row, end row, weight) of the rows this process holds; the weight (1/replicas) makes sums of squares
    over processes count every row once when they are all-reduced."""
    if not isinstance(tensor, DTensor):
        return 0, tensor.shape[0], 1.0
    _check_placements(tensor)
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    replicas = 1
    for dim, placement in enumerate(tensor.placements):
        if placement.is_replicate():
            replicas *= tensor.device_mesh.size(dim)
    start = offset[0] if len(offset) else 0
    return start, start + shape[0], 1.0 / replicas


def _row_weight(tensor: torch.Tensor) -> float:
    return _local_row_range(tensor)[2] if isinstance(tensor, DTensor) else 1.0


def _all_reduce_sum(values: list[float], sharded: DTensor | None) -> list[float]:
    """`values` summed over the processes of `sharded`'s mesh (unchanged when nothing is sharded)."""
    if sharded is None or not values:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=sharded.to_local().device)
    for dim in range(sharded.device_mesh.ndim):
        torch.distributed.all_reduce(total, group=sharded.device_mesh.get_group(dim))
    return total.tolist()


@dataclass
class _ConstrainedWeight:
    """One parameter whose rows must stay in a null space, with what is needed to measure its output change."""

    module_name: str
    basis: NullSpaceBasis
    # The parameter's dtype, and how many of its rows must be independent inside the null space (LoRA A: its rank; a
    # full weight only needs a non-empty null space), both known before binding.
    dtype: torch.dtype
    independent_rows: int = 0
    # LoRA only: the adapter whose A this is.
    adapter: str | None = None
    # The parameter in the bound model (see `NullSpaceConstraint.bind`).
    parameter: nn.Parameter | None = None
    # Full fine-tuning only: the part of the starting weight (one row per output) outside the null space (W₀·R in
    # float64 when R is stored, else W₀ itself), so that W ← W₀ + (W − W₀)·P can be applied without a full copy when R
    # is smaller.
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
    # The rows (outputs) of the bound parameter this process holds: all of them, or a `DTensor`'s local shard under
    # FSDP2, in which case `anchor` and the columns of `base_outputs` keep only those rows (cut once, at the first
    # sharded binding, so that a rank holds no full copy of W₀). `row_weight` is 1/replicas of those rows.
    rows: slice = field(default_factory=lambda: slice(None))
    row_weight: float = 1.0

    def keep_rows(self, rows: slice) -> None:
        """Keeps only `rows` of the per-output data recorded before binding (a no-op when they are all kept)."""
        if rows == self.rows:
            return
        if self.rows != slice(None):
            raise NullSpaceError(
                f"{self.module_name} was bound to rows {self.rows.start}:{self.rows.stop} and is now sharded as rows "
                f"{rows.start}:{rows.stop}: the constraint keeps only the first binding's rows of W₀."
            )
        if self.anchor is not None:
            self.anchor = self.anchor[rows].clone()
        for name in ("base_outputs", "base_outputs_in_compute_dtype"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[:, rows].clone())
        self.rows = rows

    def as_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (laid out as the parameter) with one row per output, or back: the transpose is its own inverse."""
        return tensor.T if self.transposed else tensor

    def to(self, device: torch.device) -> None:
        """Moves what was recorded before binding to the device of the bound parameter."""
        self.basis = self.basis.to(device=device)
        for name in ("anchor", "sketch_rows", "base_outputs", "base_outputs_in_compute_dtype"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))


class _Strategy(Protocol):
    """What differs between LoRA and full fine-tuning; [`NullSpaceConstraint`] does the rest the same way for both."""

    def entries(self, name: str, module: nn.Module, basis: NullSpaceBasis) -> list[_ConstrainedWeight]:
        """The constrained parameters of the constrained module `name`, with their starting state (before binding)."""

    def base_outputs(self, entry: _ConstrainedWeight, module: nn.Module, compute_dtype: torch.dtype) -> torch.Tensor:
        """The starting layer's outputs on `entry.sketch_rows`, in float32 (recording what the measurement needs)."""

    def parameter(self, module: nn.Module, entry: _ConstrainedWeight) -> nn.Parameter:
        """`entry`'s parameter in `module`, a constrained module of the model being bound."""

    def output_rows(self, module: nn.Module, entry: _ConstrainedWeight) -> torch.Tensor:
        """The parameter with one row per output of `entry`'s layer (LoRA B, or the weight): which of its rows this
        process holds decides which outputs it measures."""

    def free_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        """The parameters of a constrained module that train freely without changing its general-task outputs."""

    def projected_rows(self, entry: _ConstrainedWeight, rows: torch.Tensor) -> torch.Tensor:
        """`rows` (the parameter, one row per output, float32) put back into the null space."""

    def output_change(self, entry: _ConstrainedWeight, module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """The change of the layer's outputs on `entry.sketch_rows` since the start, computed in `dtype`."""


class _LoraStrategy:
    """LoRA: the update is s·B·A, so A·K = 0 is enough. The rows of each active adapter's A are constrained, B is
    free, and the outputs to preserve are the frozen base layer's."""

    def entries(self, name: str, module: nn.Module, basis: NullSpaceBasis) -> list[_ConstrainedWeight]:
        entries = []
        for adapter in lora_adapters(module):
            lora_a = lora_factors(module, adapter)[0]
            entries.append(_ConstrainedWeight(name, basis, lora_a.dtype, lora_a.shape[0], adapter=adapter))
        return entries

    @torch.no_grad()
    def base_outputs(self, entry: _ConstrainedWeight, module: nn.Module, compute_dtype: torch.dtype) -> torch.Tensor:
        layer = base_linear(module)
        reference = layer.weight
        dtype = reference.dtype if reference.is_floating_point() else torch.float32
        outputs = layer(entry.sketch_rows.to(dtype)).float()
        if getattr(layer, "bias", None) is not None:
            outputs = outputs - layer.bias.float()
        return outputs

    def parameter(self, module: nn.Module, entry: _ConstrainedWeight) -> nn.Parameter:
        return lora_factors(module, entry.adapter)[0]

    def output_rows(self, module: nn.Module, entry: _ConstrainedWeight) -> torch.Tensor:
        return lora_factors(module, entry.adapter)[1]

    def free_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        return [lora_factors(module, adapter)[1] for adapter in lora_adapters(module)]

    def projected_rows(self, entry: _ConstrainedWeight, rows: torch.Tensor) -> torch.Tensor:
        return entry.basis.project_rows(rows)

    def output_change(self, entry: _ConstrainedWeight, module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        lora_a, lora_b, scaling = lora_factors(module, entry.adapter)
        # Under FSDP2, the outputs of this process's rows of B (`entry.rows`, bound from B too), through all of A
        # (r × d_in, small: gathered, a collective every process runs in the same order).
        lora_a = lora_a.detach()
        if isinstance(lora_a, DTensor):
            lora_a = lora_a.full_tensor()
        hidden = entry.sketch_rows.to(dtype) @ lora_a.to(dtype).T
        return (hidden @ _local_rows(lora_b.detach()).to(dtype).T * scaling).float()


class _FullFineTuningStrategy:
    """Full fine-tuning: each constrained layer's weight, whose change since the start W − W₀ is kept in the null
    space; no parameter of a constrained layer is free."""

    def entries(self, name: str, module: nn.Module, basis: NullSpaceBasis) -> list[_ConstrainedWeight]:
        entry = _ConstrainedWeight(name, basis, module.weight.dtype, transposed=isinstance(module, Conv1D))
        start = entry.as_rows(module.weight.detach().float())
        # W₀·R in float64: W·R − W₀·R cancels almost entirely for a small update, and float32 would leave about 10×
        # more of it outside the null space than the null-basis branch does.
        entry.anchor = start.clone() if basis.stores_null else start.double() @ basis.basis.double()
        return [entry]

    @torch.no_grad()
    def base_outputs(self, entry: _ConstrainedWeight, module: nn.Module, compute_dtype: torch.dtype) -> torch.Tensor:
        # W₀ exactly as stored, in float32 like the trained weights it is compared with.
        start = entry.as_rows(module.weight.detach().float())
        entry.base_outputs = entry.sketch_rows @ start.T
        if compute_dtype != torch.float32:
            entry.base_outputs_in_compute_dtype = _outputs_in(compute_dtype, entry.sketch_rows, start)
        return entry.base_outputs

    def parameter(self, module: nn.Module, entry: _ConstrainedWeight) -> nn.Parameter:
        return module.weight

    def output_rows(self, module: nn.Module, entry: _ConstrainedWeight) -> torch.Tensor:
        return module.weight

    def free_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        return []

    def projected_rows(self, entry: _ConstrainedWeight, rows: torch.Tensor) -> torch.Tensor:
        anchor = entry.anchor
        if entry.basis.stores_null:
            return anchor + entry.basis.project_rows(rows - anchor)
        # W₀ + (W − W₀)·(I − R·Rᵀ) = W − (W·R − W₀·R)·Rᵀ, the difference in float64 (see `entries`).
        basis = entry.basis.basis.to(device=rows.device, dtype=torch.float64)
        return rows - ((rows.double() @ basis - anchor) @ basis.T).to(rows.dtype)

    def output_change(self, entry: _ConstrainedWeight, module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        # The outputs of this process's rows only (all of them without sharding).
        weight_rows = entry.as_rows(_local_rows(entry.parameter.detach()))
        if dtype == torch.float32:
            return entry.sketch_rows @ weight_rows.float().T - entry.base_outputs
        return _outputs_in(dtype, entry.sketch_rows, weight_rows) - entry.base_outputs_in_compute_dtype


class NullSpaceConstraint:
    """
    Keeps every constrained parameter of a model exactly in the null space of its layer's calibration inputs.

    With LoRA, the constrained parameters are the `lora_A` weights of the constrained layers (the update is
    s·B·A, so A·K = 0 is enough and B is free); with full fine-tuning, the layers' weights, whose change from the
    starting weights is projected.

    Construction records, by module name, what the constraint needs from the model before any training step (bases,
    LoRA ranks, starting weights and outputs); [`~NullSpaceConstraint.bind`] then attaches it to the parameters of the
    model that trains, which may be a wrapped copy (`accelerator.prepare`).

    Args:
        model (`nn.Module`):
            The (PEFT-wrapped) model, after wrapping, before any training step.
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
        self._strategy: _Strategy = _LoraStrategy() if is_lora_model(model) else _FullFineTuningStrategy()
        self.autocast_dtype = autocast_dtype
        modules = find_constrained_modules(model, target_modules)
        bases = projectors.basis_by_module()
        sketches = {name: group.input_sketch for group in projectors.groups.values() for name in group.module_names}
        self.weights: list[_ConstrainedWeight] = []
        for name, module in modules.items():
            device = base_linear(module).weight.device
            for entry in self._strategy.entries(name, module, bases[name].to(device=device)):
                sketch = sketches.get(name)
                if sketch is not None:
                    entry.sketch_rows = sketch.T.contiguous().to(device=device, dtype=torch.float32)
                    base_outputs = self._strategy.base_outputs(entry, module, self.compute_dtype(entry))
                    entry.base_output_norm = torch.linalg.matrix_norm(base_outputs.double()).item()
                self.weights.append(entry)
        self._module_names = list(modules)
        self._bound_modules: dict[str, nn.Module] | None = None
        self._sharded: DTensor | None = None

    def bind(self, model: nn.Module, project: bool = True) -> float:
        """
        Attaches the constraint to the parameters of `model`, looked up by module name: the model as
        `accelerator.prepare` returned it (DDP-wrapped, compiled, or holding new parameter objects) or as it was
        built. Binding again, to the same model or to a re-prepared one, only moves the constraint onto the
        parameters found.

        Args:
            model (`nn.Module`):
                The model that trains.
            project (`bool`, *optional*, defaults to `True`):
                Put the parameters back into their null space when they are outside it by more than float32 rounding
                ([`PROJECTED_DRIFT_TOLERANCE`]), e.g. at the start of a run (LoRA's random A); below that they are
                left bitwise as they are.

        Returns:
            `float`: the parameters' [`~NullSpaceConstraint.drift`] when bound, before any projection.
        """
        modules = self._modules_in(model)
        for entry in self.weights:
            module = modules[entry.module_name]
            entry.parameter = self._strategy.parameter(module, entry)
            output_rows = self._strategy.output_rows(module, entry)
            if entry.transposed and isinstance(output_rows, DTensor):
                raise UnsupportedSetupError(
                    f"{entry.module_name} is a GPT-2 `Conv1D` (weight stored as d_in × d_out) sharded by FSDP2, which "
                    "shards dim 0, the input dimension: no process holds whole rows to project. Full fine-tuning of "
                    "Conv1D models under FSDP2 is not supported; train them with LoRA, DDP or on one device."
                )
            entry.row_weight = 1.0
            if isinstance(output_rows, DTensor):
                start, end, entry.row_weight = _local_row_range(output_rows)
                # LoRA measures through B's local rows directly and keeps no per-row data.
                if entry.anchor is not None or entry.base_outputs is not None:
                    entry.keep_rows(slice(start, end))
            if entry.basis.basis.device != entry.parameter.device:
                entry.to(entry.parameter.device)
        self._bound_modules = modules
        # The first sharded parameter: its mesh sums the measurements' squares over the processes.
        self._sharded = next((e.parameter for e in self.weights if isinstance(e.parameter, DTensor)), None)
        drift = self.drift()
        if project and drift > PROJECTED_DRIFT_TOLERANCE:
            self.project_parameters()
        return drift

    def _modules_in(self, model: nn.Module) -> dict[str, nn.Module]:
        by_name = modules_by_canonical_name(model)
        missing = [name for name in self._module_names if name not in by_name]
        if missing:
            raise NullSpaceError(
                f"{len(missing)} constrained module(s) are not in the model being bound, e.g. {missing[:3]}: the "
                "constraint was built from another model."
            )
        return {name: by_name[name] for name in self._module_names}

    def _bound(self) -> dict[str, nn.Module]:
        if self._bound_modules is None:
            raise RuntimeError("The null-space constraint is not bound to a model yet: call `bind(model)` first.")
        return self._bound_modules

    def compute_dtype(self, entry: _ConstrainedWeight) -> torch.dtype:
        """The dtype the forward multiplies `entry`'s layer in: autocast's when it is on, else the parameter's own."""
        return self.autocast_dtype or entry.dtype

    def check_null_spaces(self) -> None:
        """Refuses an empty null space: that module could not train at all, at any rank. Needs no binding."""
        empty = [entry.module_name for entry in self.weights if entry.basis.null_dim == 0]
        if empty:
            raise NullSpaceError(
                f"The null space of {len(empty)} module(s) is empty, so they could not train at all: {empty[:6]}. "
                "Calibrate on more general data (with the 'heldout' and 'task' rules, what too little data leaves "
                "looks occupied on the held-out fold), raise `null_space_energy` (heldout, energy and task rules) or "
                "`null_space_alpha` (relative rule), or exclude them with `nspo_target_modules`."
            )

    def rank_warning(self) -> str | None:
        """
        A warning for the modules whose LoRA rank exceeds their null dimension, or `None`. Such a module trains
        within its null space as well (A = M·Uᵀ holds with more rows than null dimensions), but its update has rank at
        most the null dimension: the extra rank is unused there. Needs no binding.
        """
        too_small = [
            f"{entry.module_name} (null dim {entry.basis.null_dim} < rank {entry.independent_rows})"
            for entry in self.weights
            if 0 < entry.basis.null_dim < entry.independent_rows
        ]
        if not too_small:
            return None
        return (
            f"The LoRA rank exceeds the null dimension of {len(too_small)} module(s): {too_small[:6]}"
            f"{' …' if len(too_small) > 6 else ''}. They train within their null spaces all the same, with updates of "
            "rank at most the null dimension; a lower rank `r` saves the unused parameters, a larger "
            "`null_space_energy` gives them more room (and reaches more general-input energy)."
        )

    def _allowed_parameter_names(self, model: nn.Module) -> set[str]:
        """Names, in `model`, of the constrained parameters and of the free ones of constrained layers (LoRA B)."""
        modules = self._modules_in(model)
        allowed = {id(self._strategy.parameter(modules[entry.module_name], entry)) for entry in self.weights}
        allowed |= {
            id(parameter) for module in modules.values() for parameter in self._strategy.free_parameters(module)
        }
        return {name for name, parameter in model.named_parameters() if id(parameter) in allowed}

    def unconstrained_trainable_parameters(self, model: nn.Module) -> list[str]:
        """Names of trainable parameters of `model` that neither are constrained nor are free parameters of
        constrained layers (LoRA B matrices). Looks them up by module name: needs no binding."""
        allowed = self._allowed_parameter_names(model)
        return [name for name, p in model.named_parameters() if p.requires_grad and name not in allowed]

    def freezing_code(self, model: nn.Module) -> str | None:
        """
        Python that freezes exactly the unconstrained trainable parameters of `model`, for error messages: the
        shortest name suffixes that match them and no constrained or free parameter. `None` if there is none.
        """
        allowed = self._allowed_parameter_names(model)
        suffixes: list[str] = []
        for name in self.unconstrained_trainable_parameters(model):
            parts = name.split(".")
            candidates = (".".join(parts[-length:]) for length in range(1, len(parts) + 1))
            suffix = next((s for s in candidates if not any(a.endswith(s) for a in allowed)), None)
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
        self._bound()
        removed_sq = 0.0
        total_sq = 0.0
        for entry in self.weights:
            stored = _local_rows(entry.parameter.data)
            current = entry.as_rows(stored.float())
            projected = self._strategy.projected_rows(entry, current)
            weight = _row_weight(entry.parameter)
            removed_sq += weight * torch.linalg.matrix_norm(current - projected).item() ** 2
            total_sq += weight * torch.linalg.matrix_norm(current).item() ** 2
            if write:
                stored.copy_(entry.as_rows(projected).to(stored.dtype))
        removed_sq, total_sq = _all_reduce_sum([removed_sq, total_sq], self._sharded)
        return math.sqrt(removed_sq / total_sq) if total_sq > 0 else 0.0

    @torch.no_grad()
    def project_gradients(self) -> float | None:
        """
        Projects every constrained parameter's gradient onto its null space, in place.

        Returns:
            `float` or `None`: the kept-gradient fraction ‖g·P‖ / ‖g‖ over all constrained weights, `None` when no
            gradient was there.
        """
        self._bound()
        kept_sq = 0.0
        total_sq = 0.0
        for entry in self.weights:
            if entry.parameter.grad is None:
                continue
            gradient = _local_rows(entry.parameter.grad)
            projected = entry.as_rows(entry.basis.project_rows(entry.as_rows(gradient.float())))
            weight = _row_weight(entry.parameter.grad)
            total_sq += weight * torch.linalg.matrix_norm(gradient.float()).item() ** 2
            kept_sq += weight * torch.linalg.matrix_norm(projected).item() ** 2
            gradient.copy_(projected.to(gradient.dtype))
        kept_sq, total_sq = _all_reduce_sum([kept_sq, total_sq], self._sharded)
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
        modules = self._bound()
        measured = [entry for entry in self.weights if entry.sketch_rows is not None]
        # Each process measures the outputs of the rows it holds; the squares are summed over processes.
        local_sq = []
        for entry in measured:
            dtype = self.compute_dtype(entry) if in_compute_dtype else torch.float32
            delta = self._strategy.output_change(entry, modules[entry.module_name], dtype)
            local_sq.append(entry.row_weight * torch.linalg.matrix_norm(delta.double()).item() ** 2)
        local_sq = _all_reduce_sum(local_sq, self._sharded)
        delta_sq = 0.0
        base_sq = 0.0
        worst = 0.0
        for entry, entry_sq in zip(measured, local_sq, strict=True):
            delta_sq += entry_sq
            base_sq += entry.base_output_norm**2
            if entry.base_output_norm > 0:
                worst = max(worst, math.sqrt(entry_sq) / entry.base_output_norm)
        if base_sq == 0.0:
            return {}
        return {"mean": math.sqrt(delta_sq / base_sq), "max": worst}


def _outputs_in(dtype: torch.dtype, rows: torch.Tensor, weight_rows: torch.Tensor) -> torch.Tensor:
    """`rows`·Wᵀ as a forward in `dtype` computes it (operands and result rounded to `dtype`), returned in float32."""
    return (rows.to(dtype) @ weight_rows.to(dtype).T).float()
