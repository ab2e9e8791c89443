"""The offline demo kit: SmolLM2-135M-Instruct from a PyPI package, the embedded prompt sets, held-out evaluation
(refusal, over-refusal, general drift) and `trl-nspo demo`, which runs them end to end. The benchmarks in `bench/`
build on it.

The library itself never imports this package: `NSPOTrainer` and calibration work on any model and data.
"""

from .evaluation import (
    EvaluationPrompts,
    answer_accuracy,
    base_model_context,
    evaluate,
    float32_model,
    greedy_answers,
    next_token_kl,
    refusal_rate,
)
from .prompts import EmbeddedPromptSet, demo_safety_dataset, embedded_prompts
from .run import METRIC_LABELS, DemoArguments, grpo_settings, run_demo
from .smollm2 import SMOLLM2_HUB_ID, prepare_smollm2

__all__ = [
    "METRIC_LABELS",
    "SMOLLM2_HUB_ID",
    "DemoArguments",
    "EmbeddedPromptSet",
    "EvaluationPrompts",
    "answer_accuracy",
    "base_model_context",
    "demo_safety_dataset",
    "embedded_prompts",
    "evaluate",
    "float32_model",
    "greedy_answers",
    "grpo_settings",
    "next_token_kl",
    "refusal_rate",
    "run_demo",
    "prepare_smollm2",
]
