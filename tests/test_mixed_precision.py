"""NSPO with low-precision weights and forwards: what stays exact, and the rounding floor bf16 adds.

With `bf16=True`, accelerate runs the forward under bf16 autocast while the weights (and LoRA adapters) stay in
float32: the float32 weights are kept in the null space exactly, but a bf16 forward rounds the weights and the inputs,
so the constrained layers' outputs on general inputs change by a small, bounded amount. These tests measure both
numbers, and check that `nspo/preservation_error_in_compute_dtype` sees the floor that the float32
`nspo/preservation_error` cannot. Numbers quoted in comments are this tiny model's, after 4 steps (the README's engine
table quotes them).
"""

import math
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model
from test_trainer import CALIBRATION, EXACT_KERNEL_ALPHA, build_nspo, lora, output_change_on_calibration_inputs
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_nspo.calibration import adapters_disabled, base_linear, compute_projectors, find_constrained_modules
from trl_nspo.calibration_data import (
    CalibrationSettings,
    calibration_token_sequences,
    eval_mode,
    pad_token_id,
    right_padded_batches,
)
from trl_nspo.constraint import NullSpaceConstraint
from trl_nspo.evaluation import float32_model
from trl_nspo.null_space import NullSpaceRule

# bfloat16 keeps 8 significant bits: rounding moves each entry by at most 2⁻⁸ of its size.
BF16_UNIT_ROUNDOFF = 2.0**-8
MLP = ["gate_proj", "up_proj", "down_proj"]
COMPUTE_DTYPE_METRIC = "nspo/preservation_error_in_compute_dtype"


@torch.no_grad()
def layer_inputs(model, tokenizer, modules) -> dict[str, torch.Tensor]:
    """Every module's inputs on the calibration tokens (padding removed), as the base model computes them."""
    settings = CalibrationSettings(completion_length=8, sketch_dim=0)
    sequences, _ = calibration_token_sequences(model, tokenizer, CALIBRATION, settings, False)
    collected = {name: [] for name in modules}
    mask = []

    def collect(name):
        return lambda module, args: collected[name].append(args[0][mask[0]])

    handles = [module.register_forward_pre_hook(collect(name)) for name, module in modules.items()]
    try:
        with eval_mode(model), adapters_disabled(model):
            for input_ids, attention_mask in right_padded_batches(sequences, 8, pad_token_id(tokenizer), "cpu"):
                mask[:] = [attention_mask.bool()]
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(rows) for name, rows in collected.items()}


@torch.no_grad()
def output_change_in_dtype(model, tokenizer, dtype, targets=None, initial_weights=None) -> tuple[float, float]:
    """
    The update's contribution to the constrained layers' outputs on the calibration tokens, ΔW·x, as a forward under
    `dtype` autocast computes it (LoRA: the adapter branch; full fine-tuning: trained layer minus base layer, both in
    `dtype`), and the base layers' own rounding in `dtype` (vs float64), both relative to the exact base outputs and
    pooled over layers. `initial_weights` gives W₀ in full fine-tuning.
    """
    modules = find_constrained_modules(model, targets)
    inputs = layer_inputs(model, tokenizer, modules)
    change_sq = rounding_sq = base_sq = 0.0
    for name, module in modules.items():
        x = inputs[name]
        weight = base_linear(module).weight
        start = weight if initial_weights is None else initial_weights[name].to(weight.dtype)
        exact = x.double() @ start.double().T
        with torch.autocast("cpu", dtype=dtype):
            base = torch.nn.functional.linear(x, start)
            if hasattr(module, "lora_A"):
                change = module.lora_B["default"](module.lora_A["default"](x)) * module.scaling["default"]
            else:
                change = module(x).double() - base.double()
        change_sq += torch.linalg.matrix_norm(change.double()).item() ** 2
        rounding_sq += torch.linalg.matrix_norm(base.double() - exact).item() ** 2
        base_sq += torch.linalg.matrix_norm(exact).item() ** 2
    return math.sqrt(change_sq / base_sq), math.sqrt(rounding_sq / base_sq)


def float32_measurement(trainer) -> SimpleNamespace:
    """
    The trainer's model without accelerate's autocast wrapper, for `output_change_on_calibration_inputs`: with the
    wrapper, the layer inputs it measures on would be computed in bf16, not the calibration's float32 ones.
    """
    return SimpleNamespace(
        model=float32_model(trainer),
        processing_class=trainer.processing_class,
        args=trainer.args,
        initial_weights=getattr(trainer, "initial_weights", None),
    )


def training_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.slow
class TestBf16:
    def test_lora_under_autocast_keeps_float32_weights_exact_and_bf16_outputs_at_the_floor(
        self, tiny_model_dir, tmp_path
    ):
        trainer = build_nspo(tiny_model_dir, tmp_path, peft_config=lora(), bf16=True)
        assert trainer.accelerator.mixed_precision == "bf16"
        assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
        trainer.train()

        measured = float32_measurement(trainer)
        exact = output_change_on_calibration_inputs(measured)
        change, base_rounding = output_change_in_dtype(measured.model, measured.processing_class, torch.bfloat16)
        # The float32 weights are in the null space: float32 outputs are unchanged to float32 rounding (1.1e-8).
        assert exact <= 1e-6
        # A bf16 forward rounds A and the inputs, so A·x is not exactly zero there: a floor (3.2e-4), well below the
        # base layers' own bf16 rounding (2.9e-3) and bf16's unit roundoff, and far above float32 rounding.
        assert 100 * exact < change <= BF16_UNIT_ROUNDOFF / 4
        assert change <= base_rounding / 4
        logs = training_logs(trainer)
        assert max(entry["nspo/preservation_error"] for entry in logs) <= 1e-5
        # The metric logged in the compute dtype sees the floor the float32 one cannot.
        assert all(COMPUTE_DTYPE_METRIC in entry for entry in logs)
        assert change / 4 <= logs[-1][COMPUTE_DTYPE_METRIC] <= 4 * change

    @pytest.mark.parametrize("bf16", [True, False])
    def test_bf16_adapter_weights_stay_at_the_rounding_floor(self, tiny_model_dir, tmp_path, bf16):
        # A bf16 base with bf16 adapters (PEFT upcasts adapters to float32 unless `autocast_adapter_dtype=False`):
        # no float32 copy exists, so A itself is in the null space only up to its bf16 rounding (2.2e-4, whether the
        # stored weights are multiplied in float64 or the forward runs in bf16).
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        model = get_peft_model(model, lora(), autocast_adapter_dtype=False)
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        trainer = build_nspo(model, tmp_path, processing_class=tokenizer, bf16=bf16)
        assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.bfloat16}
        trainer.train()

        measured = float32_measurement(trainer)
        stored = output_change_on_calibration_inputs(measured)
        change, base_rounding = output_change_in_dtype(measured.model, tokenizer, torch.bfloat16)
        for value in (stored, change):
            assert 1e-6 < value <= BF16_UNIT_ROUNDOFF / 4
        assert change <= base_rounding / 4
        logs = training_logs(trainer)
        # The stored A is what is rounded, so the float32 measurement sees this floor too.
        assert stored / 4 <= logs[-1]["nspo/preservation_error"] <= 4 * stored
        # With or without autocast, the adapters compute in bf16, their own dtype.
        assert all(COMPUTE_DTYPE_METRIC in entry for entry in logs)
        assert change / 4 <= logs[-1][COMPUTE_DTYPE_METRIC] <= 4 * change

    def test_full_fine_tuning_under_autocast_keeps_float32_weights_exact(self, tiny_model_dir, tmp_path):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(".mlp." in name)
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        trainer = build_nspo(
            model, tmp_path, processing_class=tokenizer, bf16=True, nspo_target_modules=MLP, learning_rate=1e-3
        )
        initial_weights = {
            name: module.weight.detach().double().clone()
            for name, module in find_constrained_modules(model, MLP).items()
        }
        trainer.initial_weights = initial_weights
        trainer.train()

        measured = float32_measurement(trainer)
        exact = output_change_on_calibration_inputs(measured)
        change, base_rounding = output_change_in_dtype(measured.model, tokenizer, torch.bfloat16, MLP, initial_weights)
        # The float32 master weights are exact (2.7e-8). A bf16 forward rounds W and W₀ independently wherever the
        # update moved an entry across a bf16 step (at this learning rate, nearly all of them), so its outputs change
        # as much as bf16 rounding itself changes the base layers' (3.1e-3 against 2.9e-3).
        assert exact <= 1e-6
        assert base_rounding / 4 <= change <= 2 * base_rounding
        assert change <= 2 * BF16_UNIT_ROUNDOFF
        logs = training_logs(trainer)
        assert max(entry["nspo/preservation_error"] for entry in logs) <= 1e-5
        assert all(COMPUTE_DTYPE_METRIC in entry for entry in logs)
        assert change / 4 <= logs[-1][COMPUTE_DTYPE_METRIC] <= 4 * change

    def test_float32_runs_log_no_compute_dtype_metric(self, tiny_model_dir, tmp_path):
        trainer = build_nspo(tiny_model_dir, tmp_path, peft_config=lora(), max_steps=1)
        trainer.train()
        logged = {key for entry in trainer.state.log_history for key in entry}
        assert "nspo/preservation_error" in logged
        assert COMPUTE_DTYPE_METRIC not in logged


def exact_kernel_projectors(model, tiny_model_dir, target_modules=None):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    settings = CalibrationSettings(completion_length=8)
    rule = NullSpaceRule(rule="relative", alpha=EXACT_KERNEL_ALPHA)
    return compute_projectors(model, tokenizer, CALIBRATION, settings, rule, target_modules, show_progress=False)


class TestPreservationErrorInComputeDtype:
    """The constraint's own measurement, without a trainer: the dtype is what the caller says the forward runs in."""

    @pytest.fixture
    def constrained(self, tiny_model_dir):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora())
        projectors = exact_kernel_projectors(model, tiny_model_dir)
        torch.manual_seed(0)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)
        return model, projectors

    def test_bf16_autocast_sees_the_floor_the_float32_measurement_does_not(self, constrained):
        model, projectors = constrained
        constraint = NullSpaceConstraint(model, projectors, autocast_dtype=torch.bfloat16)
        constraint.project_parameters()
        assert constraint.preservation_error()["mean"] <= 1e-6
        in_bf16 = constraint.preservation_error_in_compute_dtype()
        assert 1e-5 < in_bf16["mean"] <= in_bf16["max"] <= BF16_UNIT_ROUNDOFF

    def test_float32_computation_adds_nothing(self, constrained):
        model, projectors = constrained
        constraint = NullSpaceConstraint(model, projectors)
        constraint.project_parameters()
        assert constraint.preservation_error()
        assert constraint.preservation_error_in_compute_dtype() == {}

    def test_full_fine_tuning_of_bf16_weights_reads_zero_before_training(self, tiny_model_dir):
        # Before: W₀'s outputs were computed by the bf16 layer but compared with float32 products of the same weights,
        # so the float32 measurement read 2.3e-3 before any step.
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        constraint = NullSpaceConstraint(model, exact_kernel_projectors(model, tiny_model_dir, MLP), MLP)
        assert constraint.preservation_error() == {"mean": 0.0, "max": 0.0}
        assert constraint.preservation_error_in_compute_dtype() == {"mean": 0.0, "max": 0.0}
