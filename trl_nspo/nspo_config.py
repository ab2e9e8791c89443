from dataclasses import dataclass, field

from trl import GRPOConfig

from .calibration_data import CalibrationSettings
from .null_space import NULL_SPACE_RULES, NullSpaceRule
from .precision import accelerator_available, bf16_supported


@dataclass
class NSPOConfig(GRPOConfig):
    r"""
    Configuration class for the [`NSPOTrainer`].

    Adds to [`~trl.GRPOConfig`] the parameters of the null-space constraint: how the general-task calibration data
    is fed to the model, how each layer's null space is selected, and where projectors are loaded from or saved to.
    Every GRPO parameter keeps its meaning and default, except that an unset `bf16` is turned on only where the
    hardware computes in bf16 natively (an accelerator that supports it, or a CPU with bf16 instructions), and that
    `use_cpu` is set when bf16 is on without an accelerator: the same settings run on a GPU and on a laptop.

    Parameters:
        > Parameters that control the calibration

        calibration_num_samples (`int`, *optional*, defaults to `1024`):
            Rows of `calibration_dataset` to use (the first ones). The paper used 1,024 general-task prompts.
        calibration_max_length (`int`, *optional*, defaults to `256`):
            Maximum tokens of each calibration prompt or conversation; longer ones are truncated (and counted in the
            log).
        calibration_generate_completions (`bool`, *optional*, defaults to `True`):
            Append the base model's greedy completion to each `prompt` before collecting layer inputs, so the
            preserved behaviour includes the model's responses (as in the paper).
        calibration_completion_length (`int`, *optional*, defaults to `128`):
            Maximum tokens of each generated calibration completion.
        calibration_batch_size (`int`, *optional*, defaults to `32`):
            Sequences per calibration forward pass and per batch of greedy calibration completions.
        calibration_groups_per_pass (`int`, *optional*):
            Layer-input covariances (d × d in float64 each, one per fold) held in memory at once. Lower it to
            calibrate large models on small GPUs, at the cost of one forward pass over the data per chunk. `None` does
            one pass.
        calibration_folds (`int`, *optional*, defaults to `2`):
            Parts of the calibration sequences whose covariances are kept apart, so that each null space can be
            measured on calibration data it was not computed from (logged as `nspo/heldout_null_energy`, and what the
            `"heldout"` and `"task"` rules select on). `1` halves calibration memory and measures nothing held out.

        > Parameters that control the null space

        null_space_rule (`str`, *optional*, defaults to `"heldout"`):
            `"heldout"`: the largest set of smallest eigen-directions holding ≤ `null_space_energy` of the layer's
            general-input energy on calibration folds held out of the null space, so the budget holds on general
            inputs it never saw (needs `calibration_folds` ≥ 2 and a calibration row per fold). `"energy"`: the same
            budget in-sample (the previous default: on SmolLM2-135M with 80 prompts, unseen general prompts put 5×
            the budget into it, BENCHMARKS.md section 6). `"task"`: under the held-out budget, the directions where
            the training prompts' inputs (prompts of `train_dataset` with the model's greedy answers) have the most
            energy relative to general ones: 6–8× more selective, but at the same ε its update reaches general
            outputs far more (SmolLM2 collapsed at lr 2e-2); use a much smaller ε. `"relative"`: eigen-directions
            with eigenvalue < `null_space_alpha` × the largest (the original NSPO code's rule, the only one that
            can select an exact kernel).
        null_space_alpha (`float`, *optional*, defaults to `5e-5`):
            Relative eigenvalue threshold of the `"relative"` rule.
        null_space_energy (`float`, *optional*, defaults to `1e-3`):
            The budget ε of the `"energy"`, `"heldout"` and `"task"` rules: the share of general-input energy an
            update confined to the null space can reach.
        null_space_max_dim (`int`, *optional*, defaults to `128`):
            Upper bound on every null dimension; the most-null directions are kept. It bounds the projector memory
            (with 128, at most 2.8% of a 7B model's bf16 weights) and must be at least the LoRA rank. `None` keeps
            every direction the rule selects.
        nspo_target_modules (`list[str]`, *optional*):
            Modules to constrain (name suffixes, or one full-match regex). `None`: every LoRA-adapted linear layer,
            or with full fine-tuning every `nn.Linear` and GPT-2-style `Conv1D` except the LM head (the output
            embedding; see the README's refusals).
        projectors_path (`str`, *optional*):
            Projector file (or directory); defaults to `output_dir`. If a projector file is there, it is loaded and
            validated against the model (config and every base weight), the null-space rule and, when given,
            `calibration_dataset` (settings, rows, chat template, prompt tokens), so a restarted run does not
            recalibrate; without `calibration_dataset` it is used as it was made. Otherwise the projectors are
            computed and saved there before training starts. Checkpoints reference this file instead of copying it.
        preservation_sketch_dim (`int`, *optional*, defaults to `64`):
            Columns of the random sketch of each layer's calibration inputs used to log the preservation error
            ‖ΔW·K‖ / ‖W·K‖. `0` disables the metric.
        allow_unconstrained_parameters (`bool`, *optional*, defaults to `False`):
            Accept trainable parameters outside the null-space constraint (`modules_to_save`, or in full fine-tuning
            embeddings, norms and the LM head, as the original NSPO code did) with a warning instead of an error.
        gradient_projection_only (`bool`, *optional*, defaults to `False`):
            Ablation: project gradients only, not the parameters at the start and after each optimizer step. Under
            Adam this does NOT keep the update in the null space; use it to measure why the full method is needed.
    """

    calibration_num_samples: int = field(
        default=1024,
        metadata={"help": "Rows of `calibration_dataset` to use (the first ones)."},
    )
    calibration_max_length: int = field(
        default=256,
        metadata={"help": "Maximum tokens of each calibration prompt or conversation; longer ones are truncated."},
    )
    calibration_generate_completions: bool = field(
        default=True,
        metadata={
            "help": "Append the base model's greedy completion to each calibration `prompt` before collecting layer "
            "inputs, so the preserved behaviour includes responses."
        },
    )
    calibration_completion_length: int = field(
        default=128,
        metadata={"help": "Maximum tokens of each generated calibration completion."},
    )
    calibration_batch_size: int = field(
        default=32,
        metadata={"help": "Sequences per calibration forward pass and per batch of greedy completions."},
    )
    calibration_groups_per_pass: int | None = field(
        default=None,
        metadata={
            "help": "Layer-input covariances held in memory at once (one more forward pass over the data per chunk). "
            "`None` does one pass."
        },
    )
    calibration_folds: int = field(
        default=2,
        metadata={
            "help": "Calibration covariances kept apart, to measure each null space on data it was not computed "
            "from (and for the 'heldout' and 'task' rules); 1 halves calibration memory."
        },
    )
    null_space_rule: str = field(
        default="heldout",
        metadata={
            "help": "How to select each null space: 'energy' (smallest directions holding ≤ energy of the "
            "calibration inputs), 'heldout' (the same budget on held-out calibration folds), 'task' (under that "
            "held-out budget, the directions holding most of the training prompts' inputs) or 'relative' "
            "(eigenvalue < alpha × largest, the original NSPO code's rule).",
            "choices": list(NULL_SPACE_RULES),
        },
    )
    null_space_alpha: float = field(
        default=5e-5,
        metadata={"help": "Relative eigenvalue threshold of the 'relative' rule."},
    )
    null_space_energy: float = field(
        default=1e-3,
        metadata={"help": "Budget ε of the 'energy', 'heldout' and 'task' rules (share of general-input energy)."},
    )
    null_space_max_dim: int | None = field(
        default=128,
        metadata={
            "help": "Upper bound on every null dimension (bounds projector memory; at least the LoRA rank). `None`: "
            "no bound."
        },
    )
    nspo_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules to constrain (name suffixes, or one full-match regex). Default: every LoRA-adapted "
            "linear layer, or with full fine-tuning every linear layer except the LM head."
        },
    )
    projectors_path: str | None = field(
        default=None,
        metadata={
            "help": "Projector file or directory (default: `output_dir`): loaded and validated if it exists, "
            "otherwise computed from the calibration dataset and saved there before training."
        },
    )
    preservation_sketch_dim: int = field(
        default=64,
        metadata={"help": "Sketch columns for logging the preservation error ‖ΔW·K‖/‖W·K‖; 0 disables it."},
    )
    allow_unconstrained_parameters: bool = field(
        default=False,
        metadata={
            "help": "Accept trainable parameters outside the null-space constraint with a warning instead of an error."
        },
    )
    gradient_projection_only: bool = field(
        default=False,
        metadata={
            "help": "Ablation: project gradients only. Under Adam this does NOT keep updates in the null space."
        },
    )

    def __post_init__(self):
        # TRL turns bf16 on wherever it is unset, and transformers then refuses it without an accelerator unless
        # `use_cpu` is set: decide from the hardware instead, so one command runs on a GPU and on a laptop alike.
        if self.bf16 is None:
            self.bf16 = not self.fp16 and bf16_supported()
        if (self.bf16 or self.bf16_full_eval) and not accelerator_available():
            self.use_cpu = True
        super().__post_init__()
        # Build both once so that bad values fail here, at construction, before any model is loaded.
        self.null_space_rule_config()
        self.calibration_settings()

    def null_space_rule_config(self) -> NullSpaceRule:
        return NullSpaceRule(
            rule=self.null_space_rule,
            alpha=self.null_space_alpha,
            energy=self.null_space_energy,
            max_null_dim=self.null_space_max_dim,
        )

    def calibration_settings(self) -> CalibrationSettings:
        return CalibrationSettings(
            num_samples=self.calibration_num_samples,
            max_length=self.calibration_max_length,
            generate_completions=self.calibration_generate_completions,
            completion_length=self.calibration_completion_length,
            batch_size=self.calibration_batch_size,
            sketch_dim=self.preservation_sketch_dim,
            groups_per_pass=self.calibration_groups_per_pass,
            folds=self.calibration_folds,
            seed=self.seed,
        )
