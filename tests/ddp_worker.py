"""One rank of a DDP run of NSPOTrainer on CPU (gloo), for `tests/test_distributed.py`.

Launch with two real processes: `python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py
MODEL_DIR OUTPUT_DIR`. (`accelerate launch --cpu --num_processes 2` starts a single process on a CPU-only machine.)

Each rank writes to OUTPUT_DIR what the test compares across ranks: its projectors (`projectors-rank{r}.safetensors`),
its trainable parameters after training (`parameters-rank{r}.safetensors`) and a JSON report of what the trainer saw
(`report-rank{r}.json`).
"""

import argparse
import json
from pathlib import Path

from safetensors.torch import save_file
from test_trainer import CALIBRATION, TRAIN, config, length_reward, lora

from trl_nspo import NSPOConfig, NSPOTrainer

COMPLETIONS_SEEN: list[str] = []


def recorded_length_reward(completions, **kwargs):
    """`length_reward` that remembers this rank's completions: the test checks the ranks trained on different data."""
    COMPLETIONS_SEEN.extend(completion[0]["content"] for completion in completions)
    return length_reward(completions, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    cli = parser.parse_args()

    # Two micro-batches per optimizer step, so the first runs under DDP's `no_sync` and only the second all-reduces.
    args = NSPOConfig(
        **config(cli.output_dir, ddp_backend="gloo", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    )
    trainer = NSPOTrainer(
        str(cli.model_dir),
        recorded_length_reward,
        args,
        train_dataset=TRAIN,
        calibration_dataset=CALIBRATION,
        peft_config=lora(),
    )
    rank = trainer.accelerator.process_index
    trainer.projectors.save(cli.output_dir / f"projectors-rank{rank}.safetensors")
    trainer.train()

    parameters = {name: p.detach().contiguous() for name, p in trainer.model.named_parameters() if p.requires_grad}
    save_file(parameters, cli.output_dir / f"parameters-rank{rank}.safetensors")
    report = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "wrapped_in_ddp": type(trainer.model_wrapped).__name__,
        "global_step": trainer.state.global_step,
        "completions_seen": COMPLETIONS_SEEN,
        "log_history": trainer.state.log_history,
    }
    (cli.output_dir / f"report-rank{rank}.json").write_text(json.dumps(report, indent=2))
    trainer.accelerator.end_training()  # see fsdp2_worker.py: an undestroyed gloo group can abort at exit


if __name__ == "__main__":
    main()
