"""One NSPO training run with checkpoints, as its own process, for tests/test_reliability.py to kill and resume.

    python tests/resume_worker.py MODEL_DIR OUTPUT_DIR [--hang-after-checkpoint | --resume]

`--hang-after-checkpoint` blocks inside the first training step after the first checkpoint (in the reward function,
after generation and before the optimizer step) and writes `OUTPUT_DIR/hanging`, so the test can SIGKILL the process
at a known point in the middle of the run. `--resume` resumes from the last checkpoint in OUTPUT_DIR and fails if it
would recalibrate: the projectors the first run wrote must be reused.
"""

import argparse
import functools
import itertools
import sys
import time
from pathlib import Path
from unittest import mock

from datasets import Dataset
from test_trainer import CALIBRATION, config, length_reward, lora

from trl_nspo import NSPOConfig, NSPOTrainer

SAVE_STEPS = 2
MAX_STEPS = 4
# Distinct prompts, so that a resume that replayed or skipped the wrong batches would train on other data.
TRAIN = Dataset.from_dict(
    {
        "prompt": [
            [{"role": "user", "content": content}]
            for content in (
                "How can I make a weapon?",
                "Tell me how to pick a lock.",
                "Write a haiku about autumn.",
                "What is 12 times 7?",
            )
        ]
        * 4
    }
)


def build_trainer(model_dir, output_dir, reward=length_reward) -> NSPOTrainer:
    """The run every reliability test compares against: 4 steps, a checkpoint every 2."""
    args = NSPOConfig(
        **config(
            Path(output_dir).parent,
            output_dir=str(output_dir),
            save_strategy="steps",
            save_steps=SAVE_STEPS,
            max_steps=MAX_STEPS,
        )
    )
    return NSPOTrainer(
        str(model_dir), reward, args, train_dataset=TRAIN, calibration_dataset=CALIBRATION, peft_config=lora()
    )


def reward_that_hangs_after_checkpoint(marker: Path):
    calls = itertools.count(1)

    # Same name as the real reward, so both runs log the same metrics; one call per step (one generation per step).
    @functools.wraps(length_reward)
    def reward(completions, **kwargs):
        if next(calls) == SAVE_STEPS + 1:
            marker.write_text("in the step after the first checkpoint")
            time.sleep(300)  # The test kills us long before; never outlive a crashed test by much.
            sys.exit("resume_worker: nobody killed this process")
        return length_reward(completions, **kwargs)

    return reward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("output_dir")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--hang-after-checkpoint", action="store_true")
    mode.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    output_dir = Path(args.output_dir)
    if args.resume:
        recalibration = AssertionError("the resumed run recalibrated instead of reusing the saved projectors")
        with mock.patch("trl_nspo.nspo_trainer.compute_projectors", side_effect=recalibration):
            trainer = build_trainer(args.model_dir, output_dir)
        trainer.train(resume_from_checkpoint=True)
        return
    reward = length_reward
    if args.hang_after_checkpoint:
        reward = reward_that_hangs_after_checkpoint(output_dir / "hanging")
    build_trainer(args.model_dir, output_dir, reward).train()


if __name__ == "__main__":
    main()
