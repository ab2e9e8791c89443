"""One rank of a torch FSDP2 (`fully_shard`) experiment on CPU (gloo), for `tests/test_fsdp2.py`.

The projection NSPO needs under FSDP2, without any trainer: this worker applies `fully_shard` itself to a LoRA model
and trains it with a plain loop (`fsdp2_worker.py` runs the trainers through Accelerate's FSDP2 path), in two
variants:

- `bound_before_sharding`: the current `NullSpaceConstraint`, built before sharding as NSPOTrainer builds it before
  Accelerate prepares the model. `fully_shard` replaces every parameter with a new DTensor one, so the constraint
  keeps projecting the old tensors: nothing happens to the trained model.
- `local_row_shards`: the prototype of what NSPO needs under FSDP2: look the `lora_A` weights up after sharding, and
  project the rows each rank holds (`DTensor.to_local()`; FSDP2 shards dim 0, the rows of A, and rows are projected
  independently).

It also tries NSPOTrainer on a model that transformers sharded at load time (`DistributedConfig(fsdp_size=2)`).

Launch: `python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fully_shard_worker.py MODEL_DIR
OUTPUT_DIR`. Each rank writes `report-rank{r}.json`.
"""

import argparse
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from test_trainer import CALIBRATION, EXACT_KERNEL_ALPHA, TRAIN, config, length_reward, lora
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.distributed import DistributedConfig

from trl_nspo import NSPOConfig, NSPOTrainer, NullSpaceBasis, NullSpaceConstraint, NullSpaceRule, compute_projectors
from trl_nspo.calibration import layer_input_covariances
from trl_nspo.calibration_data import CalibrationSettings, calibration_token_sequences, pad_token_id
from trl_nspo.targets import base_linear, find_constrained_modules

# A rank of 3 over 2 ranks gives uneven shards: 2 rows of every lora_A on rank 0, 1 on rank 1.
LORA_RANK = 3
TRAINING_STEPS = 3
SETTINGS = CalibrationSettings(completion_length=8)
RULE = NullSpaceRule(alpha=EXACT_KERNEL_ALPHA)


def local_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of a (possibly FSDP2-sharded) `lora_A` weight or gradient held by this rank, as a view to write to."""
    if not isinstance(tensor, DTensor):
        return tensor
    if not all(placement.is_shard(dim=0) or placement.is_replicate() for placement in tensor.placements):
        # A column shard holds part of every row: projecting it alone is not the projection of the rows.
        raise ValueError(f"Projecting rows needs whole rows on each rank; got placements {tensor.placements}.")
    return tensor.to_local()


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard(model: torch.nn.Module, mesh: DeviceMesh) -> None:
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def output_change(modules: dict[str, torch.nn.Module], covariances: dict[str, torch.Tensor]) -> float:
    """‖s·B·A·K‖ / ‖W·K‖ over every LoRA layer from the full (gathered) weights, K = all calibration tokens."""
    delta_sq = base_sq = 0.0
    for name, module in modules.items():
        lora_a = full(module.lora_A["default"].weight.detach()).double()
        lora_b = full(module.lora_B["default"].weight.detach()).double()
        weight = full(base_linear(module).weight.detach()).double()
        delta = lora_b @ lora_a * module.scaling["default"]
        delta_sq += torch.trace(delta @ covariances[name] @ delta.T).item()
        base_sq += torch.trace(weight @ covariances[name] @ weight.T).item()
    return math.sqrt(delta_sq / base_sq)


def range_residual(modules: dict[str, torch.nn.Module], bases: dict[str, NullSpaceBasis]) -> float:
    """The largest ‖A·(I − P)‖ / ‖A‖ over every `lora_A` (full, gathered)."""
    worst = 0.0
    for name, module in modules.items():
        lora_a = full(module.lora_A["default"].weight.detach()).float()
        worst = max(worst, (bases[name].range_part_norm(lora_a) / torch.linalg.matrix_norm(lora_a)).item())
    return worst


def train(model_dir: Path, mesh: DeviceMesh, variant: str) -> dict:
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora(r=LORA_RANK))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rank, world_size = dist.get_rank(), dist.get_world_size()

    # Exact K·Kᵀ of all calibration tokens: each rank feeds its share and the covariances are summed across ranks.
    sequences, _ = calibration_token_sequences(model, tokenizer, CALIBRATION, SETTINGS, show_progress=False)
    covariances = {}
    for names, accumulator in layer_input_covariances(
        model, find_constrained_modules(model), sequences[rank::world_size], pad_token_id(tokenizer), SETTINGS, False
    ):
        covariances.update(dict.fromkeys(names, accumulator.sum))
    projectors = compute_projectors(model, tokenizer, CALIBRATION, SETTINGS, RULE, show_progress=False)
    bases = projectors.basis_by_module()
    # Bound before the model is sharded, as NSPOTrainer does in `__init__`, and (unlike NSPOTrainer) never again.
    constraint = NullSpaceConstraint(model, projectors)
    constraint.bind(model)

    shard(model, mesh)
    modules = find_constrained_modules(model)
    model_parameters = {id(p) for p in model.parameters()}
    report = {
        "bound_parameters_in_model": sum(id(entry.parameter) in model_parameters for entry in constraint.weights),
        "placements": sorted({str(m.lora_A["default"].weight.placements) for m in modules.values()}),
        "local_rows": [local_rows(m.lora_A["default"].weight).shape[0] for m in modules.values()],
        "gradient_projection_error": 0.0,
        "parameter_projection_error": 0.0,
        "kept_gradient_fraction": [],
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(TRAINING_STEPS):
        # Different tokens on each rank: FSDP2 must reduce the gradients for the ranks to agree.
        input_ids = torch.randint(5, len(tokenizer), (2, 12), generator=generator)
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        if variant == "bound_before_sharding":
            report["kept_gradient_fraction"].append(constraint.project_gradients())
        else:
            with torch.no_grad():
                for name, module in modules.items():
                    gradient = module.lora_A["default"].weight.grad
                    expected = bases[name].project_rows(full(gradient))
                    rows = local_rows(gradient)
                    rows.copy_(bases[name].project_rows(rows))
                    error = (full(gradient) - expected).abs().max().item()
                    report["gradient_projection_error"] = max(report["gradient_projection_error"], error)
        optimizer.step()
        optimizer.zero_grad()
        if variant == "bound_before_sharding":
            constraint.project_parameters()
        else:
            with torch.no_grad():
                for name, module in modules.items():
                    weight = module.lora_A["default"].weight
                    expected = bases[name].project_rows(full(weight.detach()))
                    rows = local_rows(weight.detach())
                    rows.copy_(bases[name].project_rows(rows))
                    error = (full(weight.detach()) - expected).abs().max().item()
                    report["parameter_projection_error"] = max(report["parameter_projection_error"], error)
    report["output_change"] = output_change(modules, covariances)
    report["range_residual"] = range_residual(modules, bases)
    # Every B left zero: the adapters trained.
    report["least_moved_lora_b"] = min(
        full(m.lora_B["default"].weight).detach().abs().max().item() for m in modules.values()
    )
    return report


def nspo_on_model_sharded_at_load_time(model_dir: Path, output_dir: Path) -> dict:
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, distributed_config=DistributedConfig(fsdp_size=dist.get_world_size())
    )
    try:
        NSPOTrainer(
            model,
            length_reward,
            NSPOConfig(**config(output_dir, ddp_backend="gloo")),
            train_dataset=TRAIN,
            calibration_dataset=CALIBRATION,
            peft_config=lora(),
        )
    except Exception as error:
        return {"error_type": type(error).__name__, "message": str(error)[:500]}
    return {"error_type": None, "message": "accepted"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    cli = parser.parse_args()

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    report = {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "local_row_shards": train(cli.model_dir, mesh, "local_row_shards"),
        "bound_before_sharding": train(cli.model_dir, mesh, "bound_before_sharding"),
        "sharded_at_load_time": nspo_on_model_sharded_at_load_time(cli.model_dir, cli.output_dir),
    }
    (cli.output_dir / f"report-rank{dist.get_rank()}.json").write_text(json.dumps(report, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
