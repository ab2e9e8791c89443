"""One rank of a GRPO-family trainer under Accelerate's FSDP2 (`fsdp_version: 2`) on CPU (gloo), for
`tests/test_fsdp2.py`.

    accelerate launch --config_file examples/accelerate/fsdp2.yaml --num_processes 2 --mixed_precision no \
        tests/fsdp2_worker.py MODEL_DIR OUTPUT_DIR --mode {lora,full} [--trainer trl.GRPOTrainer] \
        [--max-steps 4] [--resume-from CHECKPOINT_DIR] [--without-generate-registration] \
        [--without-fsdp-on-cpu]

The launch goes through the example configuration itself, so `cpu_ram_efficient_loading` (rank 0 loads the weights,
the other ranks get them at `prepare`), activation checkpointing, `TRANSFORMER_BASED_WRAP` and the state-dict type
are the ones users get. Accelerate enables FSDP only on accelerators (`AcceleratorState.__init__` keeps FSDP for the
`MULTI_GPU`-like types only, not `MULTI_CPU`): this worker alone turns the CPU state into an FSDP one just before
the trainer creates its `Accelerator` (`create_accelerator_with_fsdp_on_cpu`), so everything after that is
Accelerate's real FSDP2 path (`fsdp2_prepare_model`, `fully_shard`, `fsdp2_load_full_state_dict`, the sharded
checkpoints).

Each rank writes `report-rank{r}.json` (what the trainer saw: engine, placements and local row counts of the
constrained weights after `prepare`, what `.grad` is in `training_step` and at `on_optimizer_step`, the output change
on the calibration inputs) and `parameters-rank{r}.safetensors` (the trained parameters, gathered from the shards,
under their names without FSDP's activation-checkpoint wrapper) so the test can compare ranks and runs.

`--trainer` names the trainer class (`module.Class`): `trl_nspo.NSPOTrainer` for the runs that must keep the general
outputs, `trl.GRPOTrainer` for the control that moves them.
"""

import argparse
import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType
from peft import get_peft_model
from safetensors.torch import save_file
from test_trainer import CALIBRATION, TRAIN, config, length_reward, lora, output_change_on_calibration_inputs
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback
from trl import GRPOConfig

from trl_nspo import NSPOConfig, NSPOTrainer
from trl_nspo.targets import find_constrained_modules

# A rank of 3 over 2 ranks gives uneven shards: 2 rows of every lora_A on rank 0, 1 on rank 1.
LORA_RANK = 3
# Full fine-tuning trains (and constrains) the MLP only, as in test_trainer's full fine-tuning test.
FULL_FINE_TUNING_TARGETS = ["gate_proj", "up_proj", "down_proj"]
SAVE_STEPS = 2
# FSDP2's activation checkpointing wraps every decoder layer; the parameter names gain this part.
CHECKPOINT_WRAPPER = "._checkpoint_wrapped_module"


def create_accelerator_with_fsdp_on_cpu(trainer: Trainer) -> None:
    """`Trainer.create_accelerator_and_postprocess`, with the CPU process group presented to Accelerate as an
    accelerator one: `AcceleratorState` turns `ACCELERATE_USE_FSDP` into `DistributedType.FSDP` only for the
    `MULTI_GPU`-like types and silently keeps DDP (`MULTI_CPU`) otherwise. Accelerate then replaces the type by
    `FSDP` itself; the device stays the CPU and the backend gloo."""
    PartialState().distributed_type = DistributedType.MULTI_GPU
    CREATE_ACCELERATOR(trainer)


CREATE_ACCELERATOR = Trainer.create_accelerator_and_postprocess


def canonical(name: str) -> str:
    return name.replace(CHECKPOINT_WRAPPER, "")


def describe(tensor: torch.Tensor | None) -> dict | None:
    """Type, global shape, placements and local (this rank's) shape of a parameter or gradient."""
    if tensor is None:
        return None
    if isinstance(tensor, DTensor):
        return {
            "type": "DTensor",
            "shape": list(tensor.shape),
            "placements": str(tensor.placements),
            "local_shape": list(local(tensor).shape),
            "dtype": str(tensor.dtype),
        }
    return {"type": "Tensor", "shape": list(tensor.shape), "dtype": str(tensor.dtype)}


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def constrained_weights(model: torch.nn.Module, mode: str) -> dict[str, torch.nn.Parameter]:
    """The weights NSPO constrains (each `lora_A`, or the MLP weights), by canonical name."""
    if mode == "lora":
        return {canonical(n): p for n, p in model.named_parameters() if "lora_A" in n}
    return {
        canonical(n): p
        for n, p in model.named_parameters()
        if any(f".{target}." in n for target in FULL_FINE_TUNING_TARGETS) and n.endswith("weight")
    }


class RecordWhatTheTrainerSees(TrainerCallback):
    """Records, on the first optimizer step, the constrained weights and their gradients as the NSPO hooks see them:
    after `prepare` (`on_train_begin`), before `optimizer.step()` (after clipping) and at `on_optimizer_step`."""

    def __init__(self, report: dict, mode: str):
        self.report = report
        self.mode = mode

    def _record(self, key: str, model: torch.nn.Module) -> None:
        if key in self.report:
            return
        weights = constrained_weights(model, self.mode)
        name = sorted(weights)[0]
        self.report[key] = {
            "name": name,
            "parameter": describe(weights[name]),
            "gradient": describe(weights[name].grad),
            "local_rows": sorted({local(p).shape[0] for p in weights.values()}),
        }

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record("after_prepare", model)
        # After `prepare` and after a resume's `_load_from_checkpoint`: what the run starts from.
        self.report["trainable_norm_at_train_begin"] = trainable_norm(gathered_parameters(model))
        self.report["checkpoint_wrapped_names"] = any(CHECKPOINT_WRAPPER in n for n, _ in model.named_parameters())

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._record("before_optimizer_step", model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._record("on_optimizer_step", model)


def gathered_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole (`full_tensor` is a collective: every rank calls it in the same order)."""
    return {
        canonical(name): (p.full_tensor() if isinstance(p, DTensor) else p).detach().contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def trainable_norm(parameters: dict[str, torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.stack([p.double().norm() for p in parameters.values()])).item()


def unsharded_model(model_dir: Path, mode: str, parameters: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh single-process copy of the model with `parameters` loaded: what the test measures outputs on."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if mode == "lora":
        model = get_peft_model(model, lora(r=LORA_RANK))
    incompatible = model.load_state_dict(parameters, strict=False)
    assert not incompatible.unexpected_keys, incompatible.unexpected_keys
    return model


def build_trainer(trainer_class: type, model_dir: Path, output_dir: Path, mode: str, max_steps: int) -> Trainer:
    values = config(
        output_dir,
        output_dir=str(output_dir),
        ddp_backend="gloo",
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
    )
    if mode == "full":
        values.update(learning_rate=1e-3, nspo_target_modules=FULL_FINE_TUNING_TARGETS)
    if issubclass(trainer_class, NSPOTrainer):
        args = NSPOConfig(**values)
        extra = {"calibration_dataset": CALIBRATION}
    else:
        args = GRPOConfig(**{k: v for k, v in values.items() if not k.startswith(("calibration", "null", "nspo"))})
        extra = {}
    _ = args.device  # Starts the process group, so that `from_pretrained` sees FSDP and loads on rank 0 only.
    if mode == "lora":
        model, extra["peft_config"] = str(model_dir), lora(r=LORA_RANK)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(".mlp." in name)
    return trainer_class(model, length_reward, args, train_dataset=TRAIN, **extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--mode", choices=["lora", "full"], required=True)
    parser.add_argument("--trainer", default="trl.GRPOTrainer", help="module.Class of the trainer to run")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--resume-from", type=Path, help="a checkpoint directory of an earlier run to resume from")
    parser.add_argument(
        "--without-generate-registration",
        action="store_true",
        help="undo transformers' fix of TRL #4550 (`register_fsdp_forward_method(model, 'generate')`), to show it",
    )
    parser.add_argument(
        "--without-fsdp-on-cpu",
        action="store_true",
        help="leave Accelerate's CPU state alone, to show that it then trains with DDP instead of FSDP2",
    )
    cli = parser.parse_args()
    if not cli.without_fsdp_on_cpu:
        Trainer.create_accelerator_and_postprocess = create_accelerator_with_fsdp_on_cpu
    if cli.without_generate_registration:
        torch.distributed.fsdp.register_fsdp_forward_method = lambda module, method_name: None

    module_name, class_name = cli.trainer.rsplit(".", 1)
    trainer_class = getattr(importlib.import_module(module_name), class_name)
    trainer = build_trainer(trainer_class, cli.model_dir, cli.output_dir, cli.mode, cli.max_steps)
    rank = trainer.accelerator.process_index
    # None when Accelerate fell back to DDP (`--without-fsdp-on-cpu`).
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    base_weight = trainer.model.get_input_embeddings().weight
    report = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "fsdp_version": plugin and plugin.fsdp_version,
        "cpu_ram_efficient_loading": plugin and plugin.cpu_ram_efficient_loading,
        "activation_checkpointing": plugin and plugin.activation_checkpointing,
        "state_dict_type": plugin and str(plugin.state_dict_type),
        # With `cpu_ram_efficient_loading`, only rank 0 holds the loaded weights before `prepare`: what the others
        # hold there is what a calibration in `__init__` would run on.
        "embedding_before_prepare": {
            "device": str(base_weight.device),
            "sum": None if base_weight.is_meta else base_weight.detach().double().sum().item(),
        },
    }
    trainer.add_callback(RecordWhatTheTrainerSees(report, cli.mode))
    try:
        trainer.train(resume_from_checkpoint=str(cli.resume_from) if cli.resume_from else None)
    except RuntimeError as error:
        report["error"] = str(error)[:500]
        (cli.output_dir / f"report-rank{rank}.json").write_text(json.dumps(report, indent=2))
        raise

    parameters = gathered_parameters(trainer.model)
    save_file(parameters, cli.output_dir / f"parameters-rank{rank}.safetensors")
    model = unsharded_model(cli.model_dir, cli.mode, parameters)
    base = unsharded_model(cli.model_dir, cli.mode, {})
    targets = FULL_FINE_TUNING_TARGETS if cli.mode == "full" else None
    initial_weights = {n: m.weight.detach().double() for n, m in find_constrained_modules(base, targets).items()}
    measured = SimpleNamespace(
        model=model,
        processing_class=AutoTokenizer.from_pretrained(cli.model_dir),
        args=SimpleNamespace(nspo_target_modules=targets),
        initial_weights=initial_weights,
    )
    report.update(
        trainable_norm_at_train_end=trainable_norm(parameters),
        wrapped_model=type(trainer.model_wrapped).__name__,
        global_step=trainer.state.global_step,
        output_change=output_change_on_calibration_inputs(measured),
        checkpoints=sorted(p.name for p in cli.output_dir.glob("checkpoint-*")),
        checkpoint_files=sorted(p.name for p in (cli.output_dir / f"checkpoint-{SAVE_STEPS}").iterdir())
        if (cli.output_dir / f"checkpoint-{SAVE_STEPS}").is_dir()
        else [],
        log_history=trainer.state.log_history,
    )
    (cli.output_dir / f"report-rank{rank}.json").write_text(json.dumps(report, indent=2))
    # A gloo group left to the interpreter's exit can abort the process ("terminate called without an active
    # exception") after everything above succeeded.
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
