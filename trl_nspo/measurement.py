"""How far training moved what the constrained layers compute on general data, measured exactly.

For a layer's inputs K over a set of sequences (the base model's, adapters disabled) and its update ΔW, the output
change is ‖ΔW·K‖ / ‖W·K‖. It comes from the input covariance C = K·Kᵀ, without storing K:

    ‖ΔW·K‖² = tr(ΔW·C·ΔWᵀ),  and with LoRA (ΔW = s·B·A): s²·tr(B·(A·C·Aᵀ)·Bᵀ).

`NSPOTrainer` logs an estimate of this on a random sketch of its calibration inputs (`nspo/preservation_error`).
These functions measure it exactly, on any data (held-out general prompts, not only the calibration set) and for any
trainer's model (a plain GRPO run, to compare with):

```python
inputs = collect_layer_inputs(model, tokenizer, held_out_general_prompts, CalibrationSettings())  # before training
trainer.train()
print(output_change(trainer.model, inputs).pooled)
```

Before any training, [`null_space_energy`] says how much of a set's layer-input energy the null spaces let an update
reach: for held-out general prompts it should stay near the rule's budget ε, for the training prompts it should be
many times larger (their ratio is the null spaces' selectivity).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from torch import nn
from transformers.pytorch_utils import Conv1D

from .calibration import layer_input_covariances
from .calibration_data import CalibrationSettings, calibration_token_sequences, pad_token_id
from .null_space import CovarianceAccumulator, NullSpaceBasis
from .projectors import NullSpaceProjectors
from .targets import base_linear, find_constrained_modules, lora_adapters, lora_factors


@dataclass
class LayerInputs:
    """
    The base model's inputs to every constrained layer over a set of sequences, as covariances.

    Args:
        groups (`list[tuple[list[str], CovarianceAccumulator]]`):
            Modules that read the same input, and that input's statistics.
        sequences (`list[list[int]]`):
            The token ids that went through the model (prompt, then greedy answer if the settings ask for one).
        counts (`dict[str, int]`):
            Rows, truncated rows and generated tokens.
        base_output_energy (`dict[str, float]`):
            tr(W·C·Wᵀ) = ‖W·K‖² of every module's weight when the inputs were collected: the denominator of the
            output change.
        target_modules (`str` or `list[str]`, *optional*):
            The constrained modules the inputs were collected for, as given to calibration.
        seconds (`dict[str, float]`, *optional*):
            Wall time of the greedy answers (`generation`) and of the covariance pass (`covariances`).
    """

    groups: list[tuple[list[str], CovarianceAccumulator]]
    sequences: list[list[int]]
    counts: dict[str, int]
    base_output_energy: dict[str, float]
    target_modules: str | Sequence[str] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def token_count(self) -> int:
        return sum(len(ids) for ids in self.sequences)

    def covariance_by_module(self) -> dict[str, torch.Tensor]:
        return {name: accumulator.sum for names, accumulator in self.groups for name in names}


@dataclass
class OutputChange:
    """
    ‖ΔW·K‖ / ‖W·K‖ of the constrained layers, from [`output_change`].

    Args:
        pooled (`float`):
            Over all layers, norms pooled (Σ‖ΔW·K‖² / Σ‖W·K‖², square-rooted).
        worst_layer (`float`):
            The largest single layer's.
        by_kind (`dict[str, float]`):
            Pooled per module kind, the last part of the module name (`q_proj`, …, `down_proj`).
    """

    pooled: float
    worst_layer: float
    by_kind: dict[str, float]


def _weight_rows(layer: nn.Module) -> torch.Tensor:
    """The base layer's weight in float64 with one row per output: dequantized if bitsandbytes stores it in 4 bits,
    transposed for GPT-2's `Conv1D` (which stores it as (d_in, d_out))."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, quant_state).double()
    weight = weight.detach().double()
    return weight.T if isinstance(layer, Conv1D) else weight


@torch.no_grad()
def collect_layer_inputs(
    model: nn.Module,
    processing_class,
    dataset: Dataset,
    settings: CalibrationSettings,
    target_modules: str | Sequence[str] | None = None,
    show_progress: bool = False,
) -> LayerInputs:
    """
    Every constrained layer's input covariance over `dataset`, with the calibration's own code: the base model's
    greedy answers to the prompts (adapters off, as `settings` asks), then one pass with padding masked and shared
    inputs computed once.

    Args:
        model (`nn.Module`):
            The model, plain or PEFT-wrapped; collect before training, so that `W` is the starting weight.
        processing_class ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer.
        dataset ([`~datasets.Dataset`]):
            General-task data in a format calibration accepts (`prompt`, `messages` or `text`).
        settings ([`CalibrationSettings`]):
            How the sequences are built (sample count, lengths, greedy answers).
        target_modules (`str` or `list[str]`, *optional*):
            The constrained modules, as given to calibration.
        show_progress (`bool`, *optional*, defaults to `False`):
            Show progress bars.

    Returns:
        [`LayerInputs`]: the covariances, the sequences and each module's ‖W·K‖².
    """
    modules = find_constrained_modules(model, target_modules)
    started = time.perf_counter()
    sequences, counts = calibration_token_sequences(model, processing_class, dataset, settings, show_progress)
    generated = time.perf_counter()
    groups = list(
        layer_input_covariances(model, modules, sequences, pad_token_id(processing_class), settings, show_progress)
    )
    finished = time.perf_counter()
    base_output_energy = {}
    for names, accumulator in groups:
        for name in names:
            weight = _weight_rows(base_linear(modules[name]))
            base_output_energy[name] = torch.trace(weight @ accumulator.sum @ weight.T).item()
    return LayerInputs(
        groups=groups,
        sequences=sequences,
        counts=counts,
        base_output_energy=base_output_energy,
        target_modules=target_modules,
        seconds={"generation": generated - started, "covariances": finished - generated},
    )


@torch.no_grad()
def output_change(
    model: nn.Module, inputs: LayerInputs, initial_weights: dict[str, torch.Tensor] | None = None
) -> OutputChange:
    """
    Exact ‖ΔW·K‖ / ‖W·K‖ of the constrained layers of `model` on `inputs`.

    Args:
        model (`nn.Module`):
            The trained model: with LoRA, ΔW = s·B·A of the active adapter; without, ΔW = W − W₀.
        inputs ([`LayerInputs`]):
            The base model's layer inputs, from [`collect_layer_inputs`] on a model with the same constrained modules.
        initial_weights (`dict[str, torch.Tensor]`, *optional*):
            Full fine-tuning only: W₀ of every constrained module by name, laid out as the module stores its weight.

    Returns:
        [`OutputChange`]: pooled over layers, for the worst layer, and per module kind.
    """
    covariances = inputs.covariance_by_module()
    delta_sq = base_sq = worst = 0.0
    by_kind: dict[str, list[float]] = {}
    for name, module in find_constrained_modules(model, inputs.target_modules).items():
        covariance = covariances[name]
        if adapters := lora_adapters(module):
            lora_a, lora_b, scale = lora_factors(module, adapters[0])
            inner = lora_a.double() @ covariance @ lora_a.double().T
            layer_delta_sq = scale**2 * torch.trace(lora_b.double() @ inner @ lora_b.double().T).item()
        else:
            if initial_weights is None:
                raise ValueError(
                    "Without LoRA the update is W − W₀: pass `initial_weights`, every constrained module's weight "
                    "before training."
                )
            delta = module.weight.double() - initial_weights[name].double()
            delta = delta.T if isinstance(module, Conv1D) else delta
            layer_delta_sq = torch.trace(delta @ covariance @ delta.T).item()
        layer_base_sq = inputs.base_output_energy[name]
        delta_sq += layer_delta_sq
        base_sq += layer_base_sq
        worst = max(worst, math.sqrt(max(layer_delta_sq, 0.0) / layer_base_sq))
        kind = by_kind.setdefault(name.rsplit(".", 1)[-1], [0.0, 0.0])
        kind[0] += layer_delta_sq
        kind[1] += layer_base_sq
    return OutputChange(
        pooled=math.sqrt(max(delta_sq, 0.0) / base_sq),
        worst_layer=worst,
        by_kind={kind: math.sqrt(max(d, 0.0) / b) for kind, (d, b) in by_kind.items()},
    )


@dataclass
class NullSpaceEnergy:
    """
    Per shared layer input, the share of a set's input energy that lies inside the null space, tr(Uᵀ·C·U) / tr(C):
    what an update confined to the null spaces can reach of those inputs. From [`null_space_energy`]; the ratio of two
    (training prompts ÷ held-out general prompts) is the null spaces' selectivity ([`NullSpaceEnergy.ratio_to`]).

    Args:
        by_group (`dict[str, float]`):
            The share for every input, keyed by the first module reading it (q/k/v and gate/up share one).
    """

    by_group: dict[str, float]

    def quantile(self, q: float) -> float:
        """The `q`-quantile over inputs (linear interpolation): `quantile(0.5)` is the median."""
        values = sorted(self.by_group.values())
        position = q * (len(values) - 1)
        lower = math.floor(position)
        upper = min(lower + 1, len(values) - 1)
        return values[lower] + (values[upper] - values[lower]) * (position - lower)

    @property
    def median(self) -> float:
        return self.quantile(0.5)

    @property
    def worst(self) -> float:
        return max(self.by_group.values())

    def by_kind(self) -> dict[str, float]:
        """The median share per module kind (the last part of the first module's name: `q_proj`, `down_proj`, …)."""
        kinds: dict[str, list[float]] = {}
        for name, share in self.by_group.items():
            kinds.setdefault(name.rsplit(".", 1)[-1], []).append(share)
        return {kind: statistics.median(shares) for kind, shares in kinds.items()}

    def ratio_to(self, other: NullSpaceEnergy) -> NullSpaceEnergy:
        """Per input, this share ÷ `other`'s (inputs where `other`'s is 0 are left out): with this set the training
        prompts and `other` held-out general prompts, the selectivity."""
        return NullSpaceEnergy(
            {name: share / other.by_group[name] for name, share in self.by_group.items() if other.by_group.get(name)}
        )

    def summary(self) -> dict[str, float | dict[str, float]]:
        """Median, 90th percentile, worst input and per-kind medians, for logs and result files."""
        return {"median": self.median, "p90": self.quantile(0.9), "max": self.worst, "by_kind": self.by_kind()}


def null_space_energy(
    projectors: NullSpaceProjectors | Mapping[str, NullSpaceBasis],
    inputs: LayerInputs | Mapping[str, torch.Tensor],
) -> NullSpaceEnergy:
    """
    How much of a set's layer-input energy the null spaces let an update reach, per shared input.

    Args:
        projectors ([`NullSpaceProjectors`] or `Mapping[str, NullSpaceBasis]`):
            The null spaces, or bases keyed by module name.
        inputs ([`LayerInputs`] or `Mapping[str, torch.Tensor]`):
            The set's layer inputs, from [`collect_layer_inputs`] (before training, on the base model), or
            covariances keyed by the first module of each shared input.

    Returns:
        [`NullSpaceEnergy`]: one share per input that both cover.
    """
    bases = projectors.basis_by_module() if isinstance(projectors, NullSpaceProjectors) else projectors
    covariances = (
        {names[0]: accumulator.sum for names, accumulator in inputs.groups}
        if isinstance(inputs, LayerInputs)
        else inputs
    )
    return NullSpaceEnergy(
        {name: bases[name].energy_share(covariance) for name, covariance in covariances.items() if name in bases}
    )
