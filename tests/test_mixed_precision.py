"""NSPO with low-precision weights and forwards: what stays exact, and the rounding floor bf16 adds."""

import torch
from test_trainer import CALIBRATION, EXACT_KERNEL_ALPHA
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_nspo.calibration import CalibrationSettings, compute_projectors
from trl_nspo.constraint import NullSpaceConstraint
from trl_nspo.null_space import NullSpaceRule

MLP = ["gate_proj", "up_proj", "down_proj"]


def exact_kernel_projectors(model, tiny_model_dir, target_modules=None):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    settings = CalibrationSettings(completion_length=8)
    rule = NullSpaceRule(rule="relative", alpha=EXACT_KERNEL_ALPHA)
    return compute_projectors(model, tokenizer, CALIBRATION, settings, rule, target_modules, show_progress=False)


def test_full_fine_tuning_of_bf16_weights_reads_zero_before_training(tiny_model_dir):
    # Before: W₀'s outputs were computed by the bf16 layer but compared with float32 products of the same weights,
    # so the float32 measurement read 2.3e-3 before any step.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    constraint = NullSpaceConstraint(model, exact_kernel_projectors(model, tiny_model_dir, MLP), MLP)
    assert constraint.preservation_error() == {"mean": 0.0, "max": 0.0}
