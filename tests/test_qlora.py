"""NSPO on a 4-bit (bitsandbytes nf4) base with LoRA adapters: QLoRA, which bitsandbytes ≥ 0.48 also runs on CPU.

TRL casts the adapters of a quantized model to bfloat16. NSPO projects them in float32 and casts back, so `lora_A` is
in the null space up to bfloat16 rounding, not exactly: these tests measure that floor and check that it is all that
is left, and that the output change on general inputs stays orders of magnitude below plain GRPO's.
"""

import math

import bitsandbytes as bnb
import pytest
import torch
from test_trainer import CALIBRATION, TRAIN, config, length_reward, lora, output_change_on_calibration_inputs
from transformers import BitsAndBytesConfig
from trl import GRPOConfig, GRPOTrainer

from trl_nspo import NSPOConfig, NSPOTrainer
from trl_nspo.calibration import base_linear, find_constrained_modules

# bfloat16 keeps 8 significant bits: rounding moves each entry by at most 2⁻⁸ of its size.
BF16_UNIT_ROUNDOFF = 2.0**-8


def nf4_config(compute_dtype: torch.dtype = torch.float32) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    weight = base_linear(module).weight
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).double()


def projection_matrix(basis) -> torch.Tensor:
    stored = basis.basis.double()
    identity = torch.eye(stored.shape[0], dtype=torch.float64)
    return stored @ stored.T if basis.stores_null else identity - stored @ stored.T


def range_residuals(trainer) -> tuple[float, float]:
    """
    Pooled ‖A·(I − P)‖ / ‖A‖ of every `lora_A`, and the same for A projected exactly then rounded to bfloat16 (the
    floor that no bfloat16 matrix can beat in general).
    """
    residual_sq = floor_sq = total_sq = 0.0
    for entry in trainer.constraint.weights:
        lora_a = entry.parameter.detach().double()
        projection = projection_matrix(entry.basis)
        rounded = (lora_a @ projection).to(torch.bfloat16).double()
        residual_sq += torch.linalg.matrix_norm(lora_a - lora_a @ projection).item() ** 2
        floor_sq += torch.linalg.matrix_norm(rounded - rounded @ projection).item() ** 2
        total_sq += torch.linalg.matrix_norm(lora_a).item() ** 2
    return math.sqrt(residual_sq / total_sq), math.sqrt(floor_sq / total_sq)


@pytest.fixture(scope="module")
def grpo_output_change(tiny_model_dir, tmp_path_factory) -> float:
    """Output change of plain GRPO with the same QLoRA settings: what NSPO is compared to."""
    values = config(tmp_path_factory.mktemp("grpo"))
    trainer = GRPOTrainer(
        str(tiny_model_dir),
        length_reward,
        GRPOConfig(**{k: v for k, v in values.items() if not k.startswith(("calibration", "null"))}),
        train_dataset=TRAIN,
        peft_config=lora(),
        quantization_config=nf4_config(),
    )
    trainer.train()
    return output_change_on_calibration_inputs(trainer, dequantized_weight)


@pytest.mark.slow
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_bf16_adapters_stay_in_the_null_space_up_to_rounding(
    tiny_model_dir, tmp_path, compute_dtype, grpo_output_change
):
    trainer = NSPOTrainer(
        str(tiny_model_dir),
        length_reward,
        NSPOConfig(**config(tmp_path)),
        train_dataset=TRAIN,
        calibration_dataset=CALIBRATION,
        peft_config=lora(),
        quantization_config=nf4_config(compute_dtype),
    )
    assert trainer.model.is_loaded_in_4bit
    modules = find_constrained_modules(trainer.model)
    assert all(isinstance(base_linear(module), bnb.nn.Linear4bit) for module in modules.values())
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.bfloat16}
    trainer.train()

    residual, floor = range_residuals(trainer)
    # Without the projection A would keep its random init, most of which is outside the null space.
    assert residual <= BF16_UNIT_ROUNDOFF
    # What is left is rounding: as much as for an exactly projected matrix rounded to bfloat16.
    assert residual <= 1.5 * floor
    assert min(p.abs().max().item() for n, p in trainer.model.named_parameters() if "lora_B" in n) > 0
    # Relative to the layers' outputs, the change is below what bfloat16 activations resolve, and far below GRPO's.
    change = output_change_on_calibration_inputs(trainer, dequantized_weight)
    assert change <= BF16_UNIT_ROUNDOFF / 4
    assert grpo_output_change >= 1e-2
    assert change <= grpo_output_change / 100
    logged = [entry["nspo/preservation_error"] for entry in trainer.state.log_history if "loss" in entry]
    assert max(logged) <= BF16_UNIT_ROUNDOFF / 4
