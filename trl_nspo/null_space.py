"""The null-space math of NSPO, free of any model or trainer code.

A linear layer y = W·x keeps its outputs on a set of inputs K = [x_1 … x_n] exactly when an update dW satisfies
dW·K = 0. With the uncentred covariance C = K·Kᵀ = V·diag(λ)·Vᵀ, the eigenvectors with negligible eigenvalues span
the null space of Kᵀ; restricting the rows of dW (or of LoRA's A) to that span enforces the constraint.

Everything here works on plain tensors: covariance accumulation, eigen-selection rules, the stored basis (the null
basis U or its complement R, whichever is smaller) and the row projection x ↦ x·U·Uᵀ = x − x·R·Rᵀ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch


class NullSpaceError(ValueError):
    """Raised when a null space cannot be computed or would not preserve anything."""


# A selection: (non-negative ascending eigenvalues, threshold) → number of smallest eigen-directions in the null space.
NullDimension = Callable[[torch.Tensor, float], int]


@dataclass
class InputStatistics:
    """
    What calibration measured of one layer input: its general-task covariance, split into folds over disjoint
    calibration sequences, and optionally the covariance of the training task's inputs.

    Args:
        folds (`list[torch.Tensor]`):
            d × d uncentred covariances (float64) of disjoint parts of the calibration sequences; their sum is the
            covariance C the null space is computed from. With two or more, a null space computed without one fold
            can be measured on it: the held-out share of [`Selection`].
        task (`torch.Tensor`, *optional*):
            d × d uncentred covariance of the training prompts and rollouts, for task-aware rules.
    """

    folds: list[torch.Tensor]
    task: torch.Tensor | None = None

    @property
    def covariance(self) -> torch.Tensor:
        return sum(self.folds[1:], self.folds[0])

    @property
    def folds_are_filled(self) -> bool:
        """Whether there are two or more folds and every one saw inputs (a null space can be measured held out)."""
        return len(self.folds) > 1 and all(torch.trace(fold).item() > 0.0 for fold in self.folds)


@dataclass
class Selection:
    """
    A selected null space and what it keeps.

    Args:
        basis ([`NullSpaceBasis`]):
            The stored basis.
        eigenvalues (`torch.Tensor`):
            Ascending eigenvalues of the whole general covariance (stored in the projector file).
        heldout_share (`float`, *optional*):
            Share of general-input energy inside the null space on calibration data it was not computed from: the
            pooled share of each fold's energy inside the null space of the same rule computed from the other folds.
            `None` with a single fold.
    """

    basis: NullSpaceBasis
    eigenvalues: torch.Tensor
    heldout_share: float | None = None


# A selection from statistics: (statistics, threshold, cap on the null dimension) → the selection.
StatisticsSelection = Callable[[InputStatistics, float, "int | None"], Selection]


@dataclass(frozen=True)
class SelectionRule:
    """
    One way of choosing the null space of a layer input, registered by name in [`NULL_SPACE_RULES`]. A new rule is one
    function here, decorated with [`register_null_space_rule`] (from eigenvalues alone) or
    [`register_statistics_rule`] (from the folds and task inputs), plus a `NullSpaceRule` and `NSPOConfig` field if its
    threshold is a new one.

    Args:
        name (`str`):
            What `NullSpaceRule(rule=...)`, `NSPOConfig.null_space_rule` and the CLI call it.
        parameter (`str`):
            The [`NullSpaceRule`] field holding its threshold, in (0, 1).
        symbol (`str`):
            How labels write the threshold (`α`, `ε`).
        description (`str`):
            What the rule keeps, in words, with `{threshold}` where the threshold goes (for the model card).
        typical_values (`str`):
            Advice the error for a threshold out of range ends with.
        null_dimension (`Callable[[torch.Tensor, float], int]`, *optional*):
            For rules that select from eigenvalues alone: the number of smallest eigen-directions in the null space,
            from non-negative ascending eigenvalues (the largest positive) and the threshold.
        select (`Callable[[InputStatistics, float, int | None], Selection]`, *optional*):
            For the other rules: the selection from an input's statistics, the threshold and the cap.
        needs_task_inputs (`bool`, *optional*, defaults to `False`):
            Whether `select` reads the training task's covariance.
        exact_kernel (`bool`, *optional*, defaults to `False`):
            Whether the rule can select directions whose eigenvalues are at rounding level (a relative threshold far
            below float32's 1e-7), so that calibration must multiply in float64.
    """

    name: str
    parameter: str
    symbol: str
    description: str
    typical_values: str
    null_dimension: NullDimension | None = None
    select: StatisticsSelection | None = None
    needs_task_inputs: bool = False
    exact_kernel: bool = False

    @property
    def needs_folds(self) -> bool:
        """Whether the rule selects on held-out folds (it needs two or more)."""
        return self.select is not None

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
    name: str, parameter: str, symbol: str, description: str, typical_values: str, exact_kernel: bool = False
) -> Callable[[NullDimension], NullDimension]:
    """
    Registers the decorated function `(eigenvalues, threshold) -> null dimension` as the [`SelectionRule`] `name`,
    which `NullSpaceRule(rule=...)`, `NSPOConfig.null_space_rule` and the CLI then accept. The other arguments are
    those of [`SelectionRule`].
    """

    def register(null_dimension: NullDimension) -> NullDimension:
        NULL_SPACE_RULES[name] = SelectionRule(
            name,
            parameter,
            symbol,
            description,
            typical_values,
            null_dimension=null_dimension,
            exact_kernel=exact_kernel,
        )
        return null_dimension

    return register


def register_statistics_rule(
    name: str, parameter: str, symbol: str, description: str, typical_values: str, needs_task_inputs: bool = False
) -> Callable[[StatisticsSelection], StatisticsSelection]:
    """
    Registers the decorated function `(statistics, threshold, max_null_dim) -> Selection` as the [`SelectionRule`]
    `name`: a rule that selects on held-out calibration folds (and, with `needs_task_inputs`, the training task's
    inputs) rather than on eigenvalues alone.
    """

    def register(select: StatisticsSelection) -> StatisticsSelection:
        NULL_SPACE_RULES[name] = SelectionRule(
            name, parameter, symbol, description, typical_values, select=select, needs_task_inputs=needs_task_inputs
        )
        return select

    return register


@register_null_space_rule(
    "relative",
    "alpha",
    "α",
    "eigenvalues below {threshold:g} × the largest",
    "The original NSPO code uses 5e-5.",
    exact_kernel=True,
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


def _checked_folds(statistics: InputStatistics, rule_name: str) -> list[torch.Tensor]:
    if len(statistics.folds) < 2:
        raise NullSpaceError(
            f"The {rule_name!r} null-space rule selects on calibration data each null space was not computed from, "
            "so it needs the calibration covariance in two or more folds (`calibration_folds`)."
        )
    if torch.trace(statistics.covariance).item() <= 0.0:
        raise NullSpaceError("The covariance is zero: the layer saw no calibration input (or only zeros).")
    if not statistics.folds_are_filled:
        raise NullSpaceError(
            f"The {rule_name!r} null-space rule needs calibration inputs in every fold, and one fold is empty; pass "
            "more calibration rows (at least one per fold and process)."
        )
    return statistics.folds


def heldout_prefix_shares(directions_by_fold: Sequence[torch.Tensor], folds: Sequence[torch.Tensor]) -> torch.Tensor:
    """
    Out-of-fold shares of general-input energy in nested subspaces.

    Args:
        directions_by_fold (`Sequence[torch.Tensor]`):
            For every fold f, d × K orthonormal directions computed without fold f, in the order they would be added
            to the null space.
        folds (`Sequence[torch.Tensor]`):
            The folds' covariances C_f.

    Returns:
        `torch.Tensor`: K + 1 shares, the k-th being Σ_f tr(D_f,kᵀ·C_f·D_f,k) / Σ_f tr(C_f) with D_f,k the first k
        directions of fold f; non-decreasing in k.
    """
    energies = sum(
        (directions * (fold @ directions)).sum(dim=0)
        for directions, fold in zip(directions_by_fold, folds, strict=True)
    )
    total = sum(torch.trace(fold) for fold in folds)
    return torch.cat([energies.new_zeros(1), torch.cumsum(energies.clamp(min=0.0), dim=0)]) / total


def _smallest_eigenvectors_without_each_fold(statistics: InputStatistics, limit: int) -> list[torch.Tensor]:
    """For every fold, the `limit` smallest eigen-directions of the covariance of the other folds."""
    total = statistics.covariance
    return [decompose_covariance(total - fold)[1][:, :limit] for fold in statistics.folds]


def _largest_prefix_within(shares: torch.Tensor, energy: float) -> int:
    return int((shares[1:] <= energy).sum().item())


@register_statistics_rule(
    "heldout",
    "energy",
    "ε",
    "smallest eigen-directions holding ≤ {threshold:g} of the input energy of calibration data they were not "
    "computed from",
    "Typical values are 1e-4 to 1e-2.",
)
def _directions_within_heldout_energy(
    statistics: InputStatistics, energy: float, max_null_dim: int | None
) -> Selection:
    """
    The energy rule with its budget enforced out of sample: for each fold, the smallest eigen-directions of the
    covariance of the other folds are measured on that fold, and the null dimension is the largest k whose first k
    directions hold ≤ ε of the held-out energy, pooled over folds. The null space itself is then the k smallest
    eigen-directions of the whole covariance (computed from more data, it is at least as good in expectation).
    """
    folds = _checked_folds(statistics, "heldout")
    total = statistics.covariance
    limit = total.shape[0] if max_null_dim is None else min(max_null_dim, total.shape[0])
    shares = heldout_prefix_shares(_smallest_eigenvectors_without_each_fold(statistics, limit), folds)
    null_dim = _largest_prefix_within(shares, energy)
    eigenvalues, eigenvectors = decompose_covariance(total)
    basis = NullSpaceBasis.from_eigh(eigenvalues, eigenvectors, null_dim)
    return Selection(basis, eigenvalues, shares[null_dim].item())


# Ridge added to the trace-normalised general covariance before the generalized eigenproblem, as a multiple of
# ε / d: a direction whose sample general energy is below it cannot claim an arbitrarily large task/general ratio.
TASK_RIDGE = 1.0


def task_directions(
    general: torch.Tensor, task: torch.Tensor, limit: int | None = None, ridge: float = 0.0
) -> torch.Tensor:
    """
    Orthonormal directions ordered by how much more of the task's input energy than of the general inputs' they hold:
    the generalized eigenvectors of T·v = μ·(G + ridge·I)·v (G, T the trace-normalised covariances), by decreasing μ,
    orthonormalised in that order (the first k columns span the first k eigenvectors).

    Args:
        general (`torch.Tensor`):
            d × d general-task covariance.
        task (`torch.Tensor`):
            d × d covariance of the training task's inputs.
        limit (`int`, *optional*):
            Directions to return (all d by default).
        ridge (`float`, *optional*, defaults to `0.0`):
            Added to G's diagonal (G has trace 1); a tiny floor keeps the Cholesky factor finite.

    Returns:
        `torch.Tensor`: d × limit, orthonormal columns, float64.
    """
    dim = general.shape[0]
    limit = dim if limit is None else min(limit, dim)
    normalised = general.double() / torch.trace(general.double())
    task_normalised = task.double() / torch.trace(task.double())
    floor = max(ridge, 1e-12)
    factor = torch.linalg.cholesky(normalised + floor * torch.eye(dim, dtype=torch.float64, device=general.device))
    whitened = torch.linalg.solve_triangular(factor, task_normalised, upper=False)
    whitened = torch.linalg.solve_triangular(factor, whitened.T, upper=False)
    _, vectors = decompose_covariance(whitened)
    generalized = torch.linalg.solve_triangular(factor.T, vectors.flip(dims=[1])[:, :limit], upper=True)
    orthonormal, _ = torch.linalg.qr(generalized)
    return orthonormal


@register_statistics_rule(
    "task",
    "energy",
    "ε",
    "directions holding the most training-task input energy per unit of general input energy, within ≤ {threshold:g} "
    "of the input energy of calibration data they were not computed from",
    "Typical values are 1e-4 to 1e-2.",
    needs_task_inputs=True,
)
def _task_directions_within_heldout_energy(
    statistics: InputStatistics, energy: float, max_null_dim: int | None
) -> Selection:
    """
    Task-aware selection: the directions with the largest ratio of training-task to general input energy (a
    generalized eigenproblem), as many as keep ≤ ε of the general energy of held-out folds. The guarantee on general
    inputs is the same budget as the `heldout` rule's; what changes is which directions spend it.
    """
    folds = _checked_folds(statistics, "task")
    if statistics.task is None or torch.trace(statistics.task).item() <= 0.0:
        raise NullSpaceError(
            "The 'task' null-space rule needs the training prompts' layer inputs (the trainer's `train_dataset`)."
        )
    total = statistics.covariance
    ridge = TASK_RIDGE * energy / total.shape[0]
    limit = total.shape[0] if max_null_dim is None else min(max_null_dim, total.shape[0])
    directions = [task_directions(total - fold, statistics.task, limit, ridge) for fold in folds]
    shares = heldout_prefix_shares(directions, folds)
    null_dim = _largest_prefix_within(shares, energy)
    eigenvalues = torch.linalg.eigvalsh(0.5 * (total + total.T))
    basis = task_directions(total, statistics.task, null_dim, ridge)
    return Selection(NullSpaceBasis(basis, stores_null=True), eigenvalues, shares[null_dim].item())


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
        if self.selection.null_dimension is None:
            raise NullSpaceError(
                f"The {self.rule!r} rule selects on held-out calibration folds, not from eigenvalues alone."
            )
        eigenvalues = eigenvalues.clamp(min=0.0)
        if eigenvalues[-1].item() <= 0.0:
            raise NullSpaceError("The covariance is zero: the layer saw no calibration input (or only zeros).")
        null_dim = self.selection.null_dimension(eigenvalues, self.threshold)
        if self.max_null_dim is not None:
            null_dim = min(null_dim, self.max_null_dim)
        return null_dim

    @property
    def selects_from_eigenvalues(self) -> bool:
        """Whether the rule's null dimension follows from a covariance's eigenvalues alone (so a projector file's
        stored eigenvalues can show that another such rule selects the same null spaces)."""
        return self.selection.null_dimension is not None

    def select(self, statistics: InputStatistics) -> Selection:
        """
        The null space of one layer input.

        Args:
            statistics ([`InputStatistics`]):
                The input's general covariance in folds (one fold is enough for the eigenvalue rules; with more, the
                held-out share is measured too) and, for task-aware rules, the task covariance.

        Returns:
            [`Selection`]: the stored basis, the eigenvalues of the whole covariance and the held-out share.
        """
        if self.selection.select is not None:
            return self.selection.select(statistics, self.threshold, self.max_null_dim)
        eigenvalues, eigenvectors = decompose_covariance(statistics.covariance)
        null_dim = self.null_dimension(eigenvalues)
        heldout_share = None
        if statistics.folds_are_filled:
            directions = _smallest_eigenvectors_without_each_fold(statistics, null_dim)
            heldout_share = heldout_prefix_shares(directions, statistics.folds)[null_dim].item()
        return Selection(NullSpaceBasis.from_eigh(eigenvalues, eigenvectors, null_dim), eigenvalues, heldout_share)


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
        float32_products (`bool`, *optional*, defaults to `False`):
            Multiply each batch's rows in float32 and add the products to the float64 sum: twice as fast on a CPU,
            with a rounding of about 1e-7 of the largest eigenvalue. That is far below any energy budget, but it
            moves exactly-null directions above a tight `relative` threshold, so calibration uses float32 products
            for the budget rules only (`SelectionRule.exact_kernel`).
    """

    def __init__(
        self,
        input_dim: int,
        sketch_dim: int = 0,
        device: torch.device | str = "cpu",
        seed: int = 0,
        float32_products: bool = False,
    ):
        self.input_dim = input_dim
        self.float32_products = float32_products
        self.sum = torch.zeros(input_dim, input_dim, dtype=torch.float64, device=device)
        self.sketch = torch.zeros(input_dim, sketch_dim, dtype=torch.float64, device=device)
        self.token_count = 0
        self._generator = torch.Generator(device=device).manual_seed(seed)

    @classmethod
    def merged(cls, parts: Sequence[CovarianceAccumulator]) -> CovarianceAccumulator:
        """The statistics of all the rows of `parts` (sums, sketches and token counts added)."""
        merged = cls(parts[0].input_dim, parts[0].sketch.shape[1], device=parts[0].sum.device)
        for part in parts:
            merged.sum += part.sum
            merged.sketch += part.sketch
            merged.token_count += part.token_count
        return merged

    def update(self, inputs: torch.Tensor) -> None:
        """Adds rows of `inputs` (shape `(..., d)`; pass only real tokens, padding already removed)."""
        rows = inputs.reshape(-1, self.input_dim).to(device=self.sum.device)
        if self.float32_products:
            rows = rows.float()
            self.sum += (rows.T @ rows).double()
        else:
            rows = rows.double()
            self.sum.addmm_(rows.T, rows)
        sketch_dim = self.sketch.shape[1]
        if sketch_dim:
            rows = rows.double()
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

    def energy_share(self, covariance: torch.Tensor) -> float:
        """
        tr(P·C·P) / tr(C) = tr(Uᵀ·C·U) / tr(C): the share of the energy of inputs with uncentred covariance C that lies
        inside the null space, which is what an update confined to it can reach of them (0 when C is zero).
        """
        covariance = covariance.double()
        basis = self.basis.to(device=covariance.device, dtype=torch.float64)
        total = torch.trace(covariance).item()
        if total <= 0.0:
            return 0.0
        stored = (basis * (covariance @ basis)).sum().item()
        return (stored if self.stores_null else total - stored) / total

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
    return rule.select(InputStatistics([covariance])).basis.to(dtype=torch.float32)


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
