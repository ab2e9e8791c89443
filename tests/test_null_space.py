import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_nspo.null_space import (
    NULL_SPACE_RULES,
    CovarianceAccumulator,
    InputStatistics,
    NullSpaceBasis,
    NullSpaceError,
    NullSpaceRule,
    SelectionRule,
    decompose_covariance,
    heldout_prefix_shares,
    null_space_from_covariance,
    register_null_space_rule,
    relative_output_change,
    task_directions,
)


def low_rank_inputs(input_dim: int, rank: int, tokens: int, seed: int) -> torch.Tensor:
    """`tokens` rows of size `input_dim` spanning a random `rank`-dimensional subspace (K as rows)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(rank, input_dim, generator=generator, dtype=torch.float64)
    return torch.randn(tokens, rank, generator=generator, dtype=torch.float64) @ mixing


def covariance_of(rows: torch.Tensor) -> torch.Tensor:
    accumulator = CovarianceAccumulator(rows.shape[1])
    accumulator.update(rows)
    return accumulator.sum


class TestNullSpaceRule:
    def test_relative_rule_counts_eigenvalues_below_alpha_times_largest(self):
        eigenvalues = torch.tensor([0.0, 1e-6, 4e-5, 6e-5, 0.5, 1.0], dtype=torch.float64)
        assert NullSpaceRule(alpha=5e-5).null_dimension(eigenvalues) == 3
        assert NullSpaceRule(alpha=1e-5).null_dimension(eigenvalues) == 2

    def test_energy_rule_keeps_smallest_directions_within_energy_budget(self):
        eigenvalues = torch.tensor([1.0, 2.0, 3.0, 94.0], dtype=torch.float64)  # total 100
        assert NullSpaceRule(rule="energy", energy=0.03).null_dimension(eigenvalues) == 2
        assert NullSpaceRule(rule="energy", energy=0.06).null_dimension(eigenvalues) == 3
        assert NullSpaceRule(rule="energy", energy=0.005).null_dimension(eigenvalues) == 0

    def test_cap_keeps_the_smallest_directions(self):
        eigenvalues = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
        assert NullSpaceRule(max_null_dim=2).null_dimension(eigenvalues) == 2

    def test_negative_round_off_eigenvalues_count_as_zero(self):
        eigenvalues = torch.tensor([-1e-12, 0.0, 1.0], dtype=torch.float64)
        assert NullSpaceRule().null_dimension(eigenvalues) == 2

    def test_zero_covariance_is_refused(self):
        with pytest.raises(NullSpaceError, match="covariance is zero"):
            NullSpaceRule().null_dimension(torch.zeros(4, dtype=torch.float64))

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"rule": "svd"}, "Unknown null-space rule 'svd'"),
            ({"alpha": 0.0}, "alpha must be in"),
            ({"alpha": 1.5}, "alpha must be in"),
            ({"energy": 1.0}, "energy must be in"),
            ({"max_null_dim": 0}, "max_null_dim must be a positive integer"),
        ],
    )
    def test_bad_values_fail_at_construction(self, kwargs, message):
        with pytest.raises(NullSpaceError, match=message):
            NullSpaceRule(**kwargs)

    def test_unknown_rule_error_lists_the_registered_rules(self):
        with pytest.raises(NullSpaceError, match="use one of " + ", ".join(repr(name) for name in NULL_SPACE_RULES)):
            NullSpaceRule(rule="svd")

    def test_a_rule_compares_only_the_settings_it_selects_with(self):
        # A file made with the relative rule must match a run that changes only the (unused) energy threshold.
        made = NullSpaceRule(rule="relative", alpha=1e-3, energy=1e-4, max_null_dim=8)
        assert made.parameters() == {"rule": "relative", "alpha": 1e-3, "max_null_dim": 8}
        assert made.selection_differences(NullSpaceRule(rule="relative", alpha=1e-3, energy=0.5, max_null_dim=8)) == []
        assert made.selection_differences(NullSpaceRule(rule="relative", alpha=1e-2, energy=0.5, max_null_dim=8)) == [
            ("alpha", 1e-3, 1e-2)
        ]


# Ascending, total 100: the relative and energy rules of the registry select 2 directions from it at these thresholds.
SPECTRUM = torch.tensor([1e-6, 1e-5, 3.0, 96.99999], dtype=torch.float64)


EIGENVALUE_RULES = sorted(name for name, rule in NULL_SPACE_RULES.items() if rule.null_dimension is not None)


@pytest.mark.parametrize("name", EIGENVALUE_RULES)
def test_every_eigenvalue_rule_selects_and_describes_itself(name):
    selection = NULL_SPACE_RULES[name]
    assert selection.name == name and isinstance(selection, SelectionRule)
    rule = NullSpaceRule(rule=name, **{selection.parameter: 1e-3}, max_null_dim=5)
    assert rule.threshold == 1e-3 and rule.parameters()[selection.parameter] == 1e-3
    assert rule.null_dimension(SPECTRUM) == 2
    assert NullSpaceRule(rule=name, **{selection.parameter: 1e-3}, max_null_dim=1).null_dimension(SPECTRUM) == 1
    assert rule.description().endswith(", at most 5 dimensions") and "0.001" in rule.description()
    assert rule.label() == f"{name} {selection.symbol}=1e-03, max 5"


def test_registered_rules_describe_themselves_in_words():
    assert NullSpaceRule(rule="relative", alpha=5e-5).description() == "eigenvalues below 5e-05 × the largest"
    assert NullSpaceRule(rule="energy", energy=1e-3, max_null_dim=128).description() == (
        "smallest eigen-directions holding ≤ 0.001 of the input energy, at most 128 dimensions"
    )
    assert NullSpaceRule(rule="relative", alpha=1e-4).label() == "relative α=1e-04"


class TestCovarianceAccumulator:
    def test_batches_sum_to_the_full_covariance_and_count_tokens(self):
        rows = low_rank_inputs(8, 8, 30, seed=0)
        accumulator = CovarianceAccumulator(8)
        accumulator.update(rows[:10].float().reshape(2, 5, 8))
        accumulator.update(rows[10:].float())
        assert accumulator.token_count == 30
        torch.testing.assert_close(accumulator.sum, rows.float().double().T @ rows.float().double())

    def test_sketch_estimates_output_norms_without_bias(self):
        rows = low_rank_inputs(16, 16, 400, seed=1)
        weight = torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        estimates = []
        for seed in range(20):
            accumulator = CovarianceAccumulator(16, sketch_dim=32, seed=seed)
            accumulator.update(rows)
            estimates.append(torch.linalg.matrix_norm(weight @ accumulator.sketch).item() ** 2)
        exact = torch.linalg.matrix_norm(weight @ rows.T).item() ** 2
        assert abs(sum(estimates) / len(estimates) / exact - 1.0) < 0.1

    def test_sketch_is_deterministic_for_a_seed(self):
        rows = low_rank_inputs(6, 6, 20, seed=3)
        sketches = []
        for _ in range(2):
            accumulator = CovarianceAccumulator(6, sketch_dim=4, seed=7)
            accumulator.update(rows)
            sketches.append(accumulator.sketch)
        torch.testing.assert_close(sketches[0], sketches[1], rtol=0, atol=0)


class TestNullSpaceBasis:
    def test_null_space_of_low_rank_inputs_is_their_orthogonal_complement(self):
        rows = low_rank_inputs(12, 4, 50, seed=0)
        basis = null_space_from_covariance(covariance_of(rows), NullSpaceRule())
        assert basis.null_dim == 8
        update = torch.randn(3, 12)
        projected = basis.project_rows(update)
        # dW·K = 0 for the projected update, while the raw one changes the outputs.
        assert relative_output_change(projected.double() @ rows.T, update.double() @ rows.T) < 1e-6
        assert torch.linalg.matrix_norm(update.double() @ rows.T) > 1.0

    def test_the_smaller_basis_is_stored(self):
        small_null = null_space_from_covariance(covariance_of(low_rank_inputs(10, 7, 40, seed=1)), NullSpaceRule())
        large_null = null_space_from_covariance(covariance_of(low_rank_inputs(10, 2, 40, seed=1)), NullSpaceRule())
        assert small_null.stores_null and tuple(small_null.basis.shape) == (10, 3)
        assert not large_null.stores_null and tuple(large_null.basis.shape) == (10, 2)
        assert (small_null.null_dim, large_null.null_dim) == (3, 8)

    def test_both_storages_give_the_same_projection(self):
        eigenvectors, _ = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64))
        eigenvalues = torch.arange(9, dtype=torch.float64)
        rows = torch.randn(4, 9, dtype=torch.float64)
        for null_dim in range(10):
            from_null = NullSpaceBasis(eigenvectors[:, :null_dim], stores_null=True)
            from_range = NullSpaceBasis(eigenvectors[:, null_dim:], stores_null=False)
            chosen = NullSpaceBasis.from_eigh(eigenvalues, eigenvectors, null_dim)
            expected = rows @ eigenvectors[:, :null_dim] @ eigenvectors[:, :null_dim].T
            for basis in (from_null, from_range, chosen):
                torch.testing.assert_close(basis.project_rows(rows), expected)
            assert chosen.basis.shape[1] == min(null_dim, 9 - null_dim)

    def test_low_precision_rows_are_projected_in_float32_and_cast_back(self):
        basis = null_space_from_covariance(covariance_of(low_rank_inputs(16, 6, 40, seed=4)), NullSpaceRule())
        rows = torch.randn(4, 16).to(torch.bfloat16)
        projected = basis.project_rows(rows)
        assert projected.dtype == torch.bfloat16
        torch.testing.assert_close(projected.float(), basis.project_rows(rows.float()), atol=2e-2, rtol=2e-2)

    def test_non_finite_covariance_names_the_fix(self):
        covariance = torch.eye(3, dtype=torch.float64)
        covariance[0, 0] = math.inf
        with pytest.raises(NullSpaceError, match="float32 instead of float16"):
            null_space_from_covariance(covariance, NullSpaceRule())

    def test_range_part_norm_measures_what_projection_removes(self):
        basis = NullSpaceBasis(torch.eye(4)[:, :2], stores_null=True)
        rows = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        assert basis.range_part_norm(rows).item() == pytest.approx(5.0)


@settings(max_examples=40, deadline=None)
@given(
    input_dim=st.integers(min_value=2, max_value=24),
    rank_fraction=st.floats(min_value=0.05, max_value=0.95),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_projection_properties_on_random_low_rank_covariances(input_dim, rank_fraction, seed):
    rank = max(1, min(input_dim - 1, round(rank_fraction * input_dim)))
    rows = low_rank_inputs(input_dim, rank, tokens=3 * input_dim, seed=seed)
    basis = null_space_from_covariance(covariance_of(rows), NullSpaceRule(alpha=1e-9))
    assert basis.null_dim == input_dim - rank
    # The complement is stored when it is smaller.
    assert basis.basis.shape[1] == min(basis.null_dim, input_dim - basis.null_dim)
    # Orthonormal basis.
    gram = basis.basis.double().T @ basis.basis.double()
    torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
    # P is idempotent and symmetric.
    projection = basis.project_rows(torch.eye(input_dim))
    torch.testing.assert_close(projection @ projection, projection, atol=1e-5, rtol=0)
    torch.testing.assert_close(projection, projection.T, atol=1e-5, rtol=0)
    # A projected update leaves every calibration direction's output untouched.
    update = torch.randn(5, input_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    projected = basis.project_rows(update.float()).double()
    scale = torch.linalg.matrix_norm(update @ rows.T).item()
    assert torch.linalg.matrix_norm(projected @ rows.T).item() <= 1e-5 * scale


def test_eigendecomposition_uses_half_the_threads_and_restores_them():
    covariance = covariance_of(low_rank_inputs(input_dim=96, rank=40, tokens=200, seed=0))
    symmetric = 0.5 * (covariance + covariance.T)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        threads_seen = []
        eigh = torch.linalg.eigh

        def recording_eigh(matrix):
            threads_seen.append(torch.get_num_threads())
            return eigh(matrix)

        with mock.patch("torch.linalg.eigh", recording_eigh):
            eigenvalues, eigenvectors = decompose_covariance(covariance)
        # Threads that wait on each other oversubscribe a busy CPU: 8.3 s instead of 0.05 s at 576 × 576.
        assert threads_seen == [2]
        assert torch.get_num_threads() == 4
        # Bitwise what LAPACK gives on 2 threads; other thread counts differ in the last bits only.
        assert torch.allclose(eigenvalues, eigh(symmetric).eigenvalues, rtol=0, atol=1e-10 * eigenvalues[-1].item())
        torch.set_num_threads(2)
        expected_values, expected_vectors = eigh(symmetric)
        assert torch.equal(eigenvalues, expected_values) and torch.equal(eigenvectors, expected_vectors)
        # A refused covariance leaves the thread count as it was, too.
        with pytest.raises(NullSpaceError):
            decompose_covariance(torch.full((4, 4), math.nan, dtype=torch.float64))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads_before)


def test_a_registered_rule_is_selectable_by_name():
    @register_null_space_rule("half", "energy", "ε", "the smaller half of the directions", "Any value works.")
    def smaller_half(eigenvalues: torch.Tensor, threshold: float) -> int:
        return len(eigenvalues) // 2

    try:
        rule = NullSpaceRule(rule="half", energy=0.5, max_null_dim=3)
        assert rule.null_dimension(torch.arange(1.0, 9.0, dtype=torch.float64)) == 3
        assert rule.description() == "the smaller half of the directions, at most 3 dimensions"
        assert rule.selection_differences(NullSpaceRule(rule="half", energy=0.5, alpha=0.1, max_null_dim=3)) == []
    finally:
        del NULL_SPACE_RULES["half"]


def anisotropic_rows(tokens: int, scales: torch.Tensor, seed: int) -> torch.Tensor:
    """Gaussian rows whose coordinate i has standard deviation `scales[i]` (a known spectrum)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, scales.numel(), generator=generator, dtype=torch.float64) * scales


# 24 strong directions and 8 weak ones, whose sample energy is far below their true energy in small samples.
SCALES = torch.cat([torch.ones(24), torch.full((8,), 0.02)]).double()


class TestHeldoutSelection:
    def test_heldout_prefix_shares_pool_each_folds_energy_in_the_directions_computed_without_it(self):
        folds = [torch.diag(torch.tensor([1.0, 2.0, 7.0], dtype=torch.float64)), torch.eye(3, dtype=torch.float64)]
        directions = [torch.eye(3, dtype=torch.float64)[:, [0, 1]], torch.eye(3, dtype=torch.float64)[:, [2, 0]]]
        shares = heldout_prefix_shares(directions, folds)
        # Fold 0 (trace 10) in e0 then e1: 1, 2; fold 1 (trace 3) in e2 then e0: 1, 1. Pooled over the trace 13.
        torch.testing.assert_close(shares, torch.tensor([0.0, 2.0, 5.0], dtype=torch.float64) / 13)

    def test_the_energy_rule_spends_more_than_its_budget_out_of_sample_and_the_heldout_rule_does_not(self):
        # A smooth spectrum sampled with about 6 tokens per dimension: its smallest eigenvalues look smaller than
        # they are, so directions chosen in-sample hold more of unseen inputs' energy than the budget.
        scales = torch.logspace(0, -2, 32, dtype=torch.float64)
        rows = anisotropic_rows(200, scales, seed=0)
        folds = [covariance_of(rows[:100]), covariance_of(rows[100:])]
        unseen = covariance_of(anisotropic_rows(20000, scales, seed=100))
        energy = NullSpaceRule(rule="energy", energy=1e-3).select(InputStatistics(folds))
        heldout = NullSpaceRule(rule="heldout", energy=1e-3).select(InputStatistics(folds))
        assert energy.basis.energy_share(sum(folds)) <= 1e-3
        # The fold estimate sees what unseen data shows: more than the budget.
        assert energy.heldout_share > 1e-3 and energy.basis.energy_share(unseen) > 1e-3
        assert heldout.heldout_share <= 1e-3 and heldout.basis.energy_share(unseen) <= 1e-3
        assert heldout.basis.null_dim < energy.basis.null_dim

    def test_heldout_rule_needs_two_nonzero_folds(self):
        covariance = covariance_of(anisotropic_rows(50, SCALES, seed=0))
        with pytest.raises(NullSpaceError, match="two or more folds"):
            NullSpaceRule(rule="heldout").select(InputStatistics([covariance]))
        empty = torch.zeros_like(covariance)
        with pytest.raises(NullSpaceError, match="one fold is empty"):
            NullSpaceRule(rule="heldout").select(InputStatistics([covariance, empty]))
        # The eigenvalue rules select as before, without a held-out estimate.
        selection = NullSpaceRule(rule="energy", energy=1e-3).select(InputStatistics([covariance, empty]))
        assert selection.heldout_share is None and selection.basis.null_dim > 0
        with pytest.raises(NullSpaceError, match="selects on held-out calibration folds, not from eigenvalues"):
            NullSpaceRule(rule="heldout").null_dimension(torch.ones(3, dtype=torch.float64))

    def test_energy_share_of_the_stored_null_or_range_basis_is_the_same(self):
        covariance = covariance_of(anisotropic_rows(300, SCALES, seed=3))
        other = covariance_of(anisotropic_rows(300, SCALES.flip(0), seed=4))
        eigenvalues, eigenvectors = decompose_covariance(covariance)
        for null_dim in (3, 30):
            basis = NullSpaceBasis.from_eigh(eigenvalues, eigenvectors, null_dim)
            null = eigenvectors[:, :null_dim]
            expected = torch.trace(null.T @ other @ null).item() / torch.trace(other).item()
            assert basis.energy_share(other) == pytest.approx(expected, rel=1e-9)
        assert basis.stores_null is False


class TestTaskAwareSelection:
    def test_task_directions_are_orthonormal_and_lead_with_the_largest_task_to_general_ratio(self):
        general = torch.diag(torch.tensor([1.0, 1.0, 1e-3, 1.0], dtype=torch.float64))
        task = torch.diag(torch.tensor([1.0, 2.0, 1.0, 1e-3], dtype=torch.float64))
        directions = task_directions(general, task)
        torch.testing.assert_close(directions.T @ directions, torch.eye(4, dtype=torch.float64))
        assert directions[:, 0].abs().argmax().item() == 2  # ratio 1 / 1e-3
        assert directions[:, 1].abs().argmax().item() == 1  # ratio 2

    def test_task_rule_reaches_more_task_energy_than_the_heldout_rule_within_the_same_heldout_budget(self):
        rows = anisotropic_rows(4000, SCALES, seed=0)
        folds = [covariance_of(rows[:2000]), covariance_of(rows[2000:])]
        # The task's inputs add energy along one weak direction and one strong one.
        task_scales = SCALES.clone()
        task_scales[30] = 0.5
        task = covariance_of(anisotropic_rows(2000, task_scales, seed=2))
        statistics = InputStatistics(folds, task=task)
        unseen = covariance_of(anisotropic_rows(20000, SCALES, seed=1))
        unseen_task = covariance_of(anisotropic_rows(20000, task_scales, seed=3))
        heldout = NullSpaceRule(rule="heldout", energy=1e-3).select(statistics)
        aware = NullSpaceRule(rule="task", energy=1e-3).select(statistics)
        assert aware.heldout_share <= 1e-3
        torch.testing.assert_close(
            aware.basis.basis.T @ aware.basis.basis, torch.eye(aware.basis.null_dim, dtype=torch.float64)
        )

        def selectivity(selection) -> float:
            return selection.basis.energy_share(unseen_task) / selection.basis.energy_share(unseen)

        assert selectivity(aware) > 3 * selectivity(heldout)

    def test_task_rule_needs_the_task_inputs(self):
        rows = anisotropic_rows(400, SCALES, seed=0)
        folds = [covariance_of(rows[:200]), covariance_of(rows[200:])]
        with pytest.raises(NullSpaceError, match="needs the training prompts' layer inputs"):
            NullSpaceRule(rule="task").select(InputStatistics(folds))


def test_float32_products_round_like_float32_and_only_budget_rules_use_them():
    rows = anisotropic_rows(3000, torch.logspace(0, -3, 16, dtype=torch.float64), seed=5)
    accumulator = CovarianceAccumulator(16, float32_products=True)
    for batch in rows.float().split(500):
        accumulator.update(batch)
    exact = rows.float().double().T @ rows.float().double()
    assert 0 < ((accumulator.sum - exact).abs().max() / exact.abs().max()).item() < 1e-6
    assert [name for name, rule in NULL_SPACE_RULES.items() if rule.exact_kernel] == ["relative"]
