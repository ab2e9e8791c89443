import math

import pytest
import torch
from conftest import build_tiny_gpt2
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from trl_nspo.calibration_data import CalibrationSettings
from trl_nspo.measurement import collect_layer_inputs, output_change
from trl_nspo.targets import adapters_disabled, base_linear, find_constrained_modules

GENERAL = Dataset.from_dict(
    {
        "prompt": [
            [{"role": "user", "content": "What is 12 times 7?"}],
            [{"role": "user", "content": "Write a haiku about autumn."}],
        ]
    }
)
SETTINGS = CalibrationSettings(completion_length=4, sketch_dim=0)


@torch.no_grad()
def explicit_layer_inputs(model, modules, sequences) -> dict[str, torch.Tensor]:
    """K of every module, one token per row, from hooks on a forward of each sequence alone (no padding)."""
    rows = {name: [] for name in modules}
    handles = [
        base_linear(module).register_forward_hook(
            lambda _, args, __, name=name: rows[name].append(args[0].reshape(-1, args[0].shape[-1]).double())
        )
        for name, module in modules.items()
    ]
    try:
        with adapters_disabled(model):
            for ids in sequences:
                model(input_ids=torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(collected) for name, collected in rows.items()}


def explicit_change(deltas: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], inputs) -> float:
    """Pooled ‖ΔW·K‖ / ‖W·K‖ from the explicit K (rows are tokens, so ΔW·K is K·ΔWᵀ)."""
    delta_sq = sum(torch.linalg.matrix_norm(inputs[n] @ deltas[n].T).item() ** 2 for n in deltas)
    base_sq = sum(torch.linalg.matrix_norm(inputs[n] @ weights[n].T).item() ** 2 for n in deltas)
    return math.sqrt(delta_sq / base_sq)


def test_lora_change_is_zero_at_start_and_matches_the_explicit_inputs_after_an_update(tiny_model, tiny_tokenizer):
    model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules="all-linear"))
    inputs = collect_layer_inputs(model, tiny_tokenizer, GENERAL, SETTINGS)
    assert output_change(model, inputs).pooled == 0.0  # B starts at zero
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)

    measured = output_change(model, inputs)

    modules = find_constrained_modules(model)
    explicit = explicit_layer_inputs(model, modules, inputs.sequences)
    deltas = {
        name: (module.lora_B["default"].weight @ module.lora_A["default"].weight).double() * module.scaling["default"]
        for name, module in modules.items()
    }
    weights = {name: base_linear(module).weight.double() for name, module in modules.items()}
    assert measured.pooled == pytest.approx(explicit_change(deltas, weights, explicit), rel=1e-6)
    assert measured.worst_layer >= measured.pooled > 0
    assert set(measured.by_kind) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert inputs.token_count == sum(len(ids) for ids in inputs.sequences)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_full_fine_tuning_measures_the_change_from_the_initial_weights(architecture, tiny_model, tiny_tokenizer):
    if architecture == "llama":
        model, targets = tiny_model, ["down_proj"]
    else:
        model, targets = build_tiny_gpt2(tiny_tokenizer).eval(), None  # built, not loaded: dropout would be on
    inputs = collect_layer_inputs(model, tiny_tokenizer, GENERAL, SETTINGS, targets)
    modules = find_constrained_modules(model, targets)
    explicit = explicit_layer_inputs(model, modules, inputs.sequences)
    initial = {name: module.weight.detach().clone() for name, module in modules.items()}
    with torch.no_grad():
        for module in modules.values():
            module.weight.add_(0.01 * torch.randn_like(module.weight))

    measured = output_change(model, inputs, initial)

    def rows(weight: torch.Tensor) -> torch.Tensor:
        # GPT-2's Conv1D stores (d_in, d_out): one row per output is the transpose.
        return weight.double().T if architecture == "gpt2" else weight.double()

    deltas = {name: rows(module.weight - initial[name]) for name, module in modules.items()}
    weights = {name: rows(weight) for name, weight in initial.items()}
    assert measured.pooled == pytest.approx(explicit_change(deltas, weights, explicit), rel=1e-6)
    if architecture == "llama":
        assert set(measured.by_kind) == {"down_proj"}
    with pytest.raises(ValueError, match="pass `initial_weights`"):
        output_change(model, inputs)


def test_null_space_energy_is_each_inputs_share_inside_the_null_space(tiny_model, tiny_tokenizer):
    from trl_nspo.calibration import compute_projectors
    from trl_nspo.measurement import NullSpaceEnergy, null_space_energy
    from trl_nspo.null_space import NullSpaceRule

    rule = NullSpaceRule(rule="energy", energy=0.05)
    projectors = compute_projectors(tiny_model, tiny_tokenizer, GENERAL, SETTINGS, rule, show_progress=False)
    calibration = collect_layer_inputs(tiny_model, tiny_tokenizer, GENERAL, SETTINGS)
    other = Dataset.from_dict({"text": ["The quick brown fox jumps over the lazy dog again and again."]})
    unseen = collect_layer_inputs(tiny_model, tiny_tokenizer, other, SETTINGS)
    in_sample = null_space_energy(projectors, calibration)
    held_out = null_space_energy(projectors, unseen)
    # One share per shared input (q/k/v and gate/up read one), keyed by its first module.
    assert set(in_sample.by_group) == set(projectors.groups) and len(in_sample.by_group) == 8
    # In-sample, the energy rule spends at most its budget, and the file records the same share.
    for key, share in in_sample.by_group.items():
        assert share <= 0.05 + 1e-9
        assert share == pytest.approx(projectors.groups[key].calibration_share, rel=1e-6)
    # Checked against the explicit inputs: ‖K·U‖² / ‖K‖² with the stored basis.
    sequences = unseen.sequences
    explicit = explicit_layer_inputs(tiny_model, find_constrained_modules(tiny_model), sequences)
    for key, group in projectors.groups.items():
        null_basis = group.basis.basis.double()
        rows = explicit[key]
        inside = rows @ null_basis if group.basis.stores_null else rows - rows @ null_basis @ null_basis.T
        expected = torch.linalg.matrix_norm(inside).item() ** 2 / torch.linalg.matrix_norm(rows).item() ** 2
        assert held_out.by_group[key] == pytest.approx(expected, rel=1e-5)
    selectivity = held_out.ratio_to(in_sample)
    assert selectivity.by_group[next(iter(selectivity.by_group))] == pytest.approx(
        held_out.by_group[next(iter(held_out.by_group))] / in_sample.by_group[next(iter(in_sample.by_group))]
    )
    summary = NullSpaceEnergy({"a.q_proj": 1.0, "b.q_proj": 3.0, "c.down_proj": 2.0}).summary()
    assert summary == {"median": 2.0, "p90": 2.8, "max": 3.0, "by_kind": {"q_proj": 2.0, "down_proj": 2.0}}
