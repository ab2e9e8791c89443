"""The commands of `trl-nspo` (`calibrate`, `train`, `demo`) in TRL's idiom: dataclasses built on
`trl.ScriptArguments`, turned into flags and YAML `--config` keys by `TrlParser`. `cli.py` imports this module only
once a command is chosen, so that `trl-nspo --help` loads neither torch nor TRL."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser

from .nspo_config import NSPOConfig
from .rewards.registry import RewardArguments, reward_functions

# The embedded conversations the CLI calibrates on when no dataset is named: 192 (29k tokens), the first point of the
# held-out curve in BENCHMARKS.md section 6, where the default rule holds its budget on unseen prompts (p90 1.04e-3);
# SmolLM2-135M calibrates on them within 5 minutes on 2 CPU cores.
DEFAULT_CALIBRATION_CONVERSATIONS = 192

# What `trl-nspo calibrate` reads (model, quantization, LoRA targets and rank, calibration, null-space rule, output,
# device): its `--help` lists these alone. Every other flag of `train` is still accepted, so that one `--config` file
# serves both commands.
CALIBRATE_OPTIONS = frozenset(
    {
        "help",
        "calibration_dataset_name",
        "calibration_dataset_split",
        "calibration_text_column",
        "model_name_or_path",
        "model_revision",
        "dtype",
        "attn_implementation",
        "trust_remote_code",
        "load_in_4bit",
        "load_in_8bit",
        "bnb_4bit_quant_type",
        "use_bnb_nested_quant",
        "bnb_4bit_quant_storage",
        "use_peft",
        "lora_target_modules",
        "lora_r",
        "calibration_num_samples",
        "calibration_max_length",
        "calibration_generate_completions",
        "calibration_completion_length",
        "calibration_batch_size",
        "calibration_groups_per_pass",
        "calibration_folds",
        "preservation_sketch_dim",
        "seed",
        "null_space_rule",
        "null_space_alpha",
        "null_space_energy",
        "null_space_max_dim",
        "nspo_target_modules",
        "projectors_path",
        "output_dir",
        "use_cpu",
    }
)


@dataclass
class CalibrateArguments:
    """
    The general-task data of `trl-nspo calibrate` and `train` (model loading, LoRA targets and calibration settings
    come from `ModelConfig` and `NSPOConfig`; projectors are written to `projectors_path`, or `output_dir`).

    Args:
        calibration_dataset_name (`str`, *optional*):
            Hub id, local file or folder of general-task data; `None` uses the first 192 of the 768 embedded
            conversations SmolLM2-135M-Instruct wrote itself (`general_conversations`, used as they are: no
            generation; 29k tokens, BENCHMARKS.md section 6).
        calibration_dataset_split (`str`, *optional*, defaults to `"train"`):
            Split to read.
        calibration_text_column (`str`, *optional*):
            Column holding the text or conversations, when it is not auto-detected.
    """

    calibration_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub id, local file or folder of general-task data; default: 192 embedded conversations."},
    )
    calibration_dataset_split: str = field(default="train", metadata={"help": "Split of the calibration dataset."})
    calibration_text_column: str | None = field(
        default=None, metadata={"help": "Column holding the text or conversations, if not auto-detected."}
    )


@dataclass
class TrainArguments(RewardArguments, CalibrateArguments, ScriptArguments):
    """
    Arguments of `trl-nspo train`, beside `NSPOConfig` and `ModelConfig`: TRL's `ScriptArguments` for the safety
    prompts, the calibration data of [`CalibrateArguments`] and the rewards of
    [`~trl_nspo.rewards.RewardArguments`]. `calibrate` parses them too (and ignores them), so that one `--config`
    file serves both commands. Training does not evaluate: `dataset_test_split` and `ignore_bias_buffers` are unused.

    Args:
        dataset_name (`str`, *optional*):
            Safety prompts: Hub id (e.g. `PKU-Alignment/PKU-SafeRLHF`), local file or folder; `None` uses the
            embedded demo prompts.
        dataset_config (`str`, *optional*):
            Configuration of a Hub dataset (the `name` of `datasets.load_dataset`).
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Split to read.
        dataset_split (`str`, *optional*):
            The name this flag had before `TrainArguments` built on `ScriptArguments`; kept, for commands and config
            files, as an alias of `dataset_train_split`.
        dataset_fraction (`float`, *optional*, defaults to `1.0`):
            Share of the distinct prompts to train on (the paper used 0.4 of PKU-SafeRLHF).
        harmful_column (`str`, *optional*):
            Boolean column marking harmful prompts; by default derived from PKU-SafeRLHF's safety labels.
    """

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Safety prompts: Hub id, local file or folder; default: the embedded demo prompts."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split of the safety dataset."})
    dataset_split: str | None = field(default=None, metadata={"help": "Alias of `dataset_train_split`."})
    dataset_fraction: float = field(
        default=1.0, metadata={"help": "Share of the distinct safety prompts to train on (the paper used 0.4)."}
    )
    harmful_column: str | None = field(
        default=None, metadata={"help": "Boolean column marking harmful prompts (default: from safety labels)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.dataset_split is not None:
            self.dataset_train_split = self.dataset_split
        if not 0.0 < self.dataset_fraction <= 1.0:
            raise ValueError(f"`dataset_fraction` must be in (0, 1], got {self.dataset_fraction}.")
        if self.dataset_streaming:
            raise ValueError(
                "`dataset_streaming` is not supported: the safety prompts are deduplicated and subsampled in memory "
                "(`dataset_fraction`). Leave it unset."
            )


def _calibration_dataset(arguments: CalibrateArguments, num_samples: int):
    from .data import load_calibration_dataset
    from .demo import embedded_prompts

    if arguments.calibration_dataset_name is None:
        # The model's own conversations: general-task data in the quantity null spaces need (BENCHMARKS.md section 6).
        conversations = embedded_prompts("general_conversations")
        return conversations.select(range(min(DEFAULT_CALIBRATION_CONVERSATIONS, num_samples, len(conversations))))
    return load_calibration_dataset(
        arguments.calibration_dataset_name,
        split=arguments.calibration_dataset_split,
        num_samples=num_samples,
        text_column=arguments.calibration_text_column,
    )


def _model_init_kwargs(model_args: ModelConfig, training_args: NSPOConfig) -> dict:
    from trl import get_quantization_config

    quantization_config = get_quantization_config(model_args)
    kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    return kwargs


def calibrate_parser() -> TrlParser:
    """The parser of `trl-nspo calibrate`: every flag of `train`, the help showing what calibrate reads
    (`CALIBRATE_OPTIONS`)."""
    parser = TrlParser(
        (TrainArguments, NSPOConfig, ModelConfig),
        prog="trl-nspo calibrate",
        epilog="Training flags (`trl-nspo train --help`) are accepted and ignored, so one --config file serves both.",
    )
    for action in parser._actions:
        if action.dest not in CALIBRATE_OPTIONS:
            action.help = argparse.SUPPRESS
    return parser


def train_parser() -> TrlParser:
    """The parser of `trl-nspo train`: `TrainArguments`, `NSPOConfig` and `ModelConfig`."""
    return TrlParser((TrainArguments, NSPOConfig, ModelConfig), prog="trl-nspo train")


def calibrate(argv: Sequence[str]) -> None:
    from peft import get_peft_model
    from transformers import AutoTokenizer
    from trl import get_peft_config
    from trl.trainer.utils import create_model_from_path

    from .calibration import compute_projectors
    from .constraint import NullSpaceConstraint
    from .projectors import file_megabytes

    arguments, training_args, model_args = calibrate_parser().parse_args_and_config(args=list(argv))
    # The loader GRPOTrainer uses, so calibration sees the model exactly as training will.
    model = create_model_from_path(model_args.model_name_or_path, **_model_init_kwargs(model_args, training_args))
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    peft_config = get_peft_config(model_args)
    if peft_config is not None:
        # Constrain exactly what the adapter will adapt.
        model = get_peft_model(model, peft_config)
    projectors = compute_projectors(
        model,
        tokenizer,
        _calibration_dataset(arguments, training_args.calibration_num_samples),
        settings=training_args.calibration_settings(),
        rule=training_args.null_space_rule_config(),
        target_modules=training_args.nspo_target_modules,
    )
    constraint = NullSpaceConstraint(model, projectors, training_args.nspo_target_modules)
    # Refuse here what training would refuse (an empty null space), before a file is written that the advised change
    # of rule or threshold could not act on.
    constraint.check_null_spaces()
    path = projectors.save(training_args.projectors_path or training_args.output_dir)
    print(projectors.summary())
    print(f"Saved {len(projectors.null_dims())} module projectors ({file_megabytes(path)}) to {path}.")
    rank_warning = constraint.rank_warning()
    if rank_warning is not None:
        warnings.warn(rank_warning, stacklevel=2)


def train(argv: Sequence[str]) -> None:
    from trl import get_peft_config

    from .data import load_safety_prompts
    from .demo import demo_safety_dataset
    from .nspo_trainer import NSPOTrainer
    from .projectors import existing_projectors_file, file_megabytes

    arguments, training_args, model_args = train_parser().parse_args_and_config(args=list(argv))
    # First, so that a misspelt reward or an unreachable reward module stops the run before any data or model loads.
    rewards = reward_functions(arguments)
    training_args.model_init_kwargs = {
        **_model_init_kwargs(model_args, training_args),
        **(training_args.model_init_kwargs or {}),
    }
    if arguments.dataset_name is None:
        train_dataset = demo_safety_dataset("train")
    else:
        source = arguments.dataset_name
        if arguments.dataset_config is not None:
            from datasets import load_dataset

            source = load_dataset(
                arguments.dataset_name, arguments.dataset_config, split=arguments.dataset_train_split
            )
        train_dataset = load_safety_prompts(
            source,
            split=arguments.dataset_train_split,
            fraction=arguments.dataset_fraction,
            seed=training_args.seed,
            harmful_column=arguments.harmful_column,
        )
    # A projector file given on purpose is used as it was made (it records its calibration); it is checked against
    # calibration data only when the data is named, never against the embedded prompts substituted by default.
    projectors_given = existing_projectors_file(training_args.projectors_path) is not None
    calibration_dataset = None
    if arguments.calibration_dataset_name is not None or not projectors_given:
        calibration_dataset = _calibration_dataset(arguments, training_args.calibration_num_samples)
    trainer = NSPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=rewards,
        args=training_args,
        train_dataset=train_dataset,
        peft_config=get_peft_config(model_args),
        calibration_dataset=calibration_dataset,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    dataset_name = arguments.dataset_name or "trl-nspo embedded demo prompts"
    trainer.create_model_card(dataset_name=dataset_name)
    trainer.accelerator.print(
        f"Adapter, projectors ({file_megabytes(trainer.projectors_file)}, from {trainer.projectors_file}) and model "
        f"card saved to {training_args.output_dir}."
    )
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}.")
    # Under `accelerate launch`, a process group left to the interpreter's exit can abort a rank after everything
    # was saved, which marks a finished job as failed.
    trainer.accelerator.end_training()


def demo(argv: Sequence[str]) -> None:
    from .demo import DemoArguments, run_demo

    (arguments,) = TrlParser((DemoArguments,), prog="trl-nspo demo").parse_args_and_config(args=list(argv))
    run_demo(arguments)


def front(argv: Sequence[str]) -> None:
    from .demo.front import FrontArguments, run_front

    (arguments,) = TrlParser((FrontArguments,), prog="trl-nspo front").parse_args_and_config(args=list(argv))
    run_front(arguments)
