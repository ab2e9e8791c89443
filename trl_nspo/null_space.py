"""The null-space math of NSPO, free of any model or trainer code.

A linear layer y = W·x keeps its outputs on a set of inputs K = [x_1 … x_n] exactly when an update dW satisfies
dW·K = 0. With the uncentred covariance C = K·Kᵀ = V·diag(λ)·Vᵀ, the eigenvectors with negligible eigenvalues span
the null space of Kᵀ; restricting the rows of dW (or of LoRA's A) to that span enforces the constraint.

Everything here works on plain tensors: covariance accumulation, eigen-selection rules, the stored basis (the null
basis U or its complement R, whichever is smaller) and the row projection x ↦ x·U·Uᵀ = x − x·R·Rᵀ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch


class NullSpaceError(ValueError):
    """Raised when a null space cannot be computed or would not preserve anything."""


# A selection: (non-negative ascending eigenvalues, threshold) → number of smallest eigen-directions in the null space.
NullDimension = Callable[[torch.Tensor, float], int]


@dataclass(frozen=True)
class SelectionRule:
    """
    One way of choosing the null space from a covariance's eigenvalues, registered by name in [`NULL_SPACE_RULES`].
    A new rule is one function here, decorated with [`register_null_space_rule`] (plus a `NullSpaceRule` and
    `NSPOConfig` field if its threshold is a new one).

    Args:
        name (`str`):
            What `NullSpaceRule(rule=...)`, `NSPOConfig.null_space_rule` and the CLI call it.
        parameter (`str`):
            The [`NullSpaceRule`] field holding its threshold, in (0, 1).
        symbol (`str`):
            How labels write the threshold (`α`, `ε`).
        null_dimension (`Callable[[torch.Tensor, float], int]`):
            The number of smallest eigen-directions in the null space, from non-negative ascending eigenvalues (the
            largest positive) and the threshold.
        description (`str`):
            What the rule keeps, in words, with `{threshold}` where the threshold goes (for the model card).
        typical_values (`str`):
            Advice the error for a threshold out of range ends with.
    """

    name: str
    parameter: str
    symbol: str
    null_dimension: NullDimension
    description: str
    typical_values: str

    def check(self, threshold: float) -> None:
        """Raises [`NullSpaceError`] unless `threshold` is in (0, 1) (NaN is not)."""
        if not 0.0 < threshold < 1.0:
            raise NullSpaceError(f"{self.parameter} must be in (0, 1), got {threshold}. {self.typical_values}")

    def describe(self, threshold: float) -> str:
        """What the rule keeps, in words: `"eigenvalues below 5e-05 × the largest"`."""
        return self.description.format(threshold=threshold)

    def label(self, threshold: float) -> str:
        """A short name of the rule with its threshold, for tables and plots: `"relative α=5e-05"`."""
        return f"{self.name} {self.symbol}={threshold:.0e}"


NULL_SPACE_RULES: dict[str, SelectionRule] = {}


def register_null_space_rule(
    name: str, parameter: str, symbol: str, description: str, typical_values: str
) -> Callable[[NullDimension], NullDimension]:
    """
    Registers the decorated function `(eigenvalues, threshold) -> null dimension` as the [`SelectionRule`] `name`,
    which `NullSpaceRule(rule=...)`, `NSPOConfig.null_space_rule` and the CLI then accept. The other arguments are
    those of [`SelectionRule`].
    """

    def register(null_dimension: NullDimension) -> NullDimension:
        NULL_SPACE_RULES[name] = SelectionRule(name, parameter, symbol, null_dimension, description, typical_values)
        return null_dimension

    return register


@register_null_space_rule(
    "relative", "alpha", "α", "eigenvalues below {threshold:g} × the largest", "The original NSPO code uses 5e-5."
)
def _directions_below_relative_threshold(eigenvalues: torch.Tensor, alpha: float) -> int:
    """Every eigen-direction with eigenvalue < α · the largest (the original NSPO code, α = 5e-5)."""
    return int((eigenvalues < alpha * eigenvalues[-1]).sum().item())


@register_null_space_rule(
    "energy",
    "energy",
    "ε",
    "smallest eigen-directions holding ≤ {threshold:g} of the input energy",
    "Typical values are 1e-5 to 1e-3.",
)
def _directions_within_energy_fraction(eigenvalues: torch.Tensor, energy: float) -> int:
    """The largest set of smallest eigen-directions whose eigenvalues sum to at most ε of the total."""
    cumulative = torch.cumsum(eigenvalues, dim=0)
    return int((cumulative <= energy * cumulative[-1]).sum().item())


@dataclass(frozen=True)
class NullSpaceRule:
    """
    How to pick the null space from the eigenvalues of an input covariance: a registered [`SelectionRule`], the
    thresholds, and a cap. Every threshold is checked whichever rule is used: a bad value is a mistake either way.

    Args:
        rule (`str`, *optional*, defaults to `"relative"`):
            Name of a rule in [`NULL_SPACE_RULES`]. `"relative"`: every eigen-direction with eigenvalue < `alpha` ·
            largest eigenvalue (the original NSPO code, α = 5e-5). `"energy"`: the largest set of smallest
            eigen-directions whose eigenvalues sum to at most `energy` of the total.
        alpha (`float`, *optional*, defaults to `5e-5`):
            Relative eigenvalue threshold of the `"relative"` rule, in (0, 1).
        energy (`float`, *optional*, defaults to `1e-4`):
            Fraction of the total input energy the `"energy"` rule may discard, in (0, 1).
        max_null_dim (`int`, *optional*):
            Upper bound on the null dimension; the smallest eigen-directions are kept.
    """

    rule: str = "relative"
    alpha: float = 5e-5
    energy: float = 1e-4
    max_null_dim: int | None = None

    def __post_init__(self) -> None:
        if self.rule not in NULL_SPACE_RULES:
            raise NullSpaceError(
                f"Unknown null-space rule {self.rule!r}; use one of {', '.join(map(repr, NULL_SPACE_RULES))}."
            )
        for selection in NULL_SPACE_RULES.values():
            selection.check(getattr(self, selection.parameter))
        if self.max_null_dim is not None and self.max_null_dim < 1:
            raise NullSpaceError(f"max_null_dim must be a positive integer or None, got {self.max_null_dim}.")

    @property
    def selection(self) -> SelectionRule:
        return NULL_SPACE_RULES[self.rule]

    @property
    def threshold(self) -> float:
        """The value of the one threshold this rule reads (`alpha` or `energy`)."""
        return getattr(self, self.selection.parameter)

    def parameters(self) -> dict[str, Any]:
        """The settings this rule selects with: its name, its threshold and the cap (the others play no part)."""
        return {"rule": self.rule, self.selection.parameter: self.threshold, "max_null_dim": self.max_null_dim}

    def description(self) -> str:
        """What the rule keeps, in words (model card): `"eigenvalues below 5e-05 × the largest, at most 128
        dimensions"`."""
        described = self.selection.describe(self.threshold)
        return described if self.max_null_dim is None else f"{described}, at most {self.max_null_dim} dimensions"

    def label(self) -> str:
        """A short name for tables and plots: `"relative α=1e-04"`, or `"energy ε=1e-03, max 64"` with a cap."""
        label = self.selection.label(self.threshold)
        return label if self.max_null_dim is None else f"{label}, max {self.max_null_dim}"

    def selection_differences(self, other: NullSpaceRule) -> list[tuple[str, Any, Any]]:
        """
        The settings in which `other` selects differently from this rule, as `(field, this value, other value)`;
        empty when both select the same null spaces from any eigenvalues (a field neither rule uses may differ).
        """
        used = self.parameters().keys() | other.parameters().keys()
        return [
            (setting.name, getattr(self, setting.name), getattr(other, setting.name))
            for setting in fields(self)
            if setting.name in used and getattr(self, setting.name) != getattr(other, setting.name)
        ]

    def null_dimension(self, eigenvalues: torch.Tensor) -> int:
        """
        Number of smallest eigen-directions that form the null space.

        Args:
            eigenvalues (`torch.Tensor`):
                Eigenvalues of a covariance in ascending order (as `torch.linalg.eigh` returns them).

        Returns:
            `int`: the null dimension k; the null basis is the first k eigenvectors.
        """
        eigenvalues = eigenvalues.clamp(min=0.0)
        if eigenvalues[-1].item() <= 0.0:
            raise NullSpaceError("The covariance is zero: the layer saw no calibration input (or only zeros).")
        null_dim = self.selection.null_dimension(eigenvalues, self.threshold)
        if self.max_null_dim is not None:
            null_dim = min(null_dim, self.max_null_dim)
        return null_dim


class CovarianceAccumulator:
    """
    Running uncentred covariance K·Kᵀ = Σ x·xᵀ of input rows, in float64, counted in tokens.

    Optionally also keeps a Gaussian sketch K·S (d × m, S with i.i.d. N(0, 1/m) entries, one row per token), for which
    E[(K·S)(K·S)ᵀ] = K·Kᵀ: ‖dW·K·S‖ estimates ‖dW·K‖ over every calibration token at the cost of m probe vectors.

    Args:
        input_dim (`int`):
            Size d of each input vector.
        sketch_dim (`int`, *optional*, defaults to `0`):
            Columns m of the sketch; `0` keeps none.
        device (`torch.device` or `str`, *optional*, defaults to `"cpu"`):
            Where the sums live.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the sketch's random matrix.
    """

    def __init__(self, input_dim: int, sketch_dim: int = 0, device: torch.device | str = "cpu", seed: int = 0):
        self.input_dim = input_dim
        self.sum = torch.zeros(input_dim, input_dim, dtype=torch.float64, device=device)
        self.sketch = torch.zeros(input_dim, sketch_dim, dtype=torch.float64, device=device)
        self.token_count = 0
        self._generator = torch.Generator(device=device).manual_seed(seed)

    def update(self, inputs: torch.Tensor) -> None:
        """Adds rows of `inputs` (shape `(..., d)`; pass only real tokens, padding already removed)."""
        rows = inputs.reshape(-1, self.input_dim).to(device=self.sum.device, dtype=torch.float64)
        self.sum.addmm_(rows.T, rows)
        sketch_dim = self.sketch.shape[1]
        if sketch_dim:
            gaussian = torch.randn(
                rows.shape[0], sketch_dim, generator=self._generator, dtype=torch.float64, device=rows.device
            )
            self.sketch.addmm_(rows.T, gaussian, alpha=1.0 / math.sqrt(sketch_dim))
        self.token_count += rows.shape[0]


@dataclass
class NullSpaceBasis:
    """
    An orthonormal basis from which the projection onto a layer's input null space is applied.

    Only the smaller of the null basis U (d × k) and the range basis R (d × (d − k)) is stored: P = U·Uᵀ = I − R·Rᵀ.

    Args:
        basis (`torch.Tensor`):
            d × m matrix with orthonormal columns.
        stores_null (`bool`):
            `True` if `basis` is the null basis U, `False` if it is the range basis R.
    """

    basis: torch.Tensor
    stores_null: bool

    @property
    def input_dim(self) -> int:
        return self.basis.shape[0]

    @property
    def null_dim(self) -> int:
        return self.basis.shape[1] if self.stores_null else self.input_dim - self.basis.shape[1]

    @classmethod
    def from_eigh(cls, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, null_dim: int) -> NullSpaceBasis:
        """Keeps the first `null_dim` eigenvectors (ascending eigenvalues) as U, or the rest as R if fewer."""
        input_dim = eigenvectors.shape[0]
        if null_dim <= input_dim - null_dim:
            return cls(eigenvectors[:, :null_dim].contiguous(), stores_null=True)
        return cls(eigenvectors[:, null_dim:].contiguous(), stores_null=False)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> NullSpaceBasis:
        return NullSpaceBasis(self.basis.to(device=device, dtype=dtype), self.stores_null)

    def project_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """
        Returns rows·P, the part of each row of `rows` (shape `(n, d)`) that lies in the null space.

        Computed in the basis dtype and cast back, so low-precision parameters are projected in float32.
        """
        basis = self.basis
        rows_in_basis_dtype = rows.to(basis.dtype)
        coordinates = rows_in_basis_dtype @ basis
        if self.stores_null:
            projected = coordinates @ basis.T
        else:
            projected = rows_in_basis_dtype - coordinates @ basis.T
        return projected.to(rows.dtype)

    def range_part_norm(self, rows: torch.Tensor) -> torch.Tensor:
        """‖rows·(I − P)‖_F, the part of `rows` that would change outputs on the calibration inputs."""
        rows_in_basis_dtype = rows.to(self.basis.dtype)
        return torch.linalg.matrix_norm(rows_in_basis_dtype - self.project_rows(rows_in_basis_dtype))

    @property
    def num_bytes(self) -> int:
        return self.basis.numel() * self.basis.element_size()


def null_space_from_covariance(covariance: torch.Tensor, rule: NullSpaceRule) -> NullSpaceBasis:
    """
    Eigendecomposes a covariance and selects its null space with `rule`.

    Args:
        covariance (`torch.Tensor`):
            Symmetric positive semi-definite d × d matrix (float64 recommended).
        rule ([`NullSpaceRule`]):
            Selection rule.

    Returns:
        [`NullSpaceBasis`]: the stored basis, in float32.
    """
    eigenvalues, eigenvectors = decompose_covariance(covariance)
    null_dim = rule.null_dimension(eigenvalues)
    return NullSpaceBasis.from_eigh(eigenvalues, eigenvectors, null_dim).to(dtype=torch.float32)


def decompose_covariance(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric covariance, refusing non-finite entries. On the CPU it
    runs on half of torch's threads (see [`fewer_cpu_threads`])."""
    if not torch.isfinite(covariance).all():
        raise NullSpaceError("The covariance has non-finite entries; calibrate in float32 instead of float16.")
    symmetric = 0.5 * (covariance + covariance.T)
    if symmetric.device.type != "cpu":
        return torch.linalg.eigh(symmetric)
    with fewer_cpu_threads():
        return torch.linalg.eigh(symmetric)


@contextmanager
def fewer_cpu_threads() -> Iterator[int]:
    """
    Runs the block on half of torch's intra-op threads (at least one), then restores the count.

    LAPACK's eigensolver synchronises its threads many times per call; when other processes hold the cores, each
    synchronisation waits for a descheduled thread. Measured on a 2-core machine running two other jobs, a float64
    `eigh` of 576 × 576 took 8.4 s on torch's 2 threads and 0.045 s on 1 (1536 × 1536: 1.6-7.9 s against 0.8 s).

    Yields:
        `int`: the number of threads the block runs on.
    """
    threads = torch.get_num_threads()
    fewer = max(1, threads // 2)
    torch.set_num_threads(fewer)
    try:
        yield fewer
    finally:
        torch.set_num_threads(threads)


def relative_output_change(delta_outputs: torch.Tensor, base_outputs: torch.Tensor) -> float:
    """‖ΔW·K‖_F / ‖W·K‖_F from the two output matrices; 0 when both are zero."""
    base_norm = torch.linalg.matrix_norm(base_outputs.double()).item()
    delta_norm = torch.linalg.matrix_norm(delta_outputs.double()).item()
    if base_norm == 0.0:
        return 0.0 if delta_norm == 0.0 else math.inf
    return delta_norm / base_norm
