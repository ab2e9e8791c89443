"""The model card of an NSPO-aligned adapter: Hub metadata, how to load it, training data, null-space summary and
evaluation table, rendered from `model_cards/nspo_adapter.md`."""

from __future__ import annotations

import os
import textwrap
from importlib.metadata import version
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .projectors import NullSpaceProjectors, file_megabytes

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
NSPO_CITATION = textwrap.dedent("""\
    @inproceedings{niu2026nspo,
        title     = {{Mitigating the Safety Alignment Tax with Null-Space Constrained Policy Optimization}},
        author    = {Niu and Xiao and Liu and Chen and Li},
        booktitle = {International Conference on Learning Representations},
        year      = 2026,
        eprint    = {arXiv:2512.11391},
    }""")


def render_model_card(
    projectors: NullSpaceProjectors,
    model_name: str,
    base_model: str | None = None,
    hub_model_id: str | None = None,
    dataset_name: str | None = None,
    calibration_description: str = "general-task prompts",
    reward_names: list[str] | None = None,
    training_steps: int | None = None,
    evaluation: dict[str, tuple[float | str, float | str]] | None = None,
    tags: list[str] | None = None,
    projectors_file: str | os.PathLike | None = None,
) -> ModelCard:
    """
    Renders the model card of an adapter trained with NSPO.

    Args:
        projectors ([`NullSpaceProjectors`]):
            The projectors the adapter was trained with (null dimensions, rule, calibration statistics).
        model_name (`str`):
            Name of the adapter.
        base_model (`str`, *optional*):
            Hub id of the base model (`base_model` metadata and the loading snippet). Without it, the card says that
            the base model was loaded from a local folder.
        hub_model_id (`str`, *optional*):
            Hub id the adapter is pushed to, used in the loading snippet.
        dataset_name (`str`, *optional*):
            Hub id or description of the safety prompts.
        calibration_description (`str`, *optional*, defaults to `"general-task prompts"`):
            What the calibration data was.
        reward_names (`list[str]`, *optional*):
            Names of the reward functions.
        training_steps (`int`, *optional*):
            Optimizer steps taken.
        evaluation (`dict[str, tuple]`, *optional*):
            `{metric: (base model value, adapter value)}` for the evaluation table.
        tags (`list[str]`, *optional*):
            Extra Hub tags; `trl`, `nspo`, `grpo`, `peft`, `lora` and `safety` are always there.
        projectors_file (`str` or `os.PathLike`, *optional*):
            The projector file published with the adapter: the card states its size on disk.

    Returns:
        [`~huggingface_hub.ModelCard`]
    """
    all_tags = sorted({"trl", "nspo", "grpo", "peft", "lora", "safety", *(tags or [])})
    card_data = ModelCardData(
        base_model=base_model,
        library_name="peft",
        model_name=model_name,
        tags=all_tags,
        datasets=[dataset_name] if dataset_name and "/" in dataset_name else None,
        pipeline_tag="text-generation",
    )
    null_space_rows = [
        {"module": name, "null_dim": null_dim, "input_dim": input_dim}
        for name, (null_dim, input_dim) in projectors.null_dims().items()
    ]
    evaluation_rows = [
        {"metric": metric, "base": _format(base), "adapter": _format(adapter)}
        for metric, (base, adapter) in (evaluation or {}).items()
    ]
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        base_model=base_model,
        hub_model_id=hub_model_id,
        dataset_name=dataset_name,
        trainer_name="NSPO",
        reward_names=", ".join(reward_names) if reward_names else "not recorded",
        training_steps=training_steps,
        calibration_description=calibration_description,
        calibration_tokens=f"{projectors.calibration.token_count or 0:,}",
        generate_completions=bool(projectors.calibration.generate_completions),
        rule_description=projectors.rule.description(),
        constrained_count=len(null_space_rows),
        projectors_file_size=None if projectors_file is None else file_megabytes(projectors_file),
        null_space_rows=null_space_rows,
        evaluation_rows=evaluation_rows,
        trl_nspo_version=version("trl-nspo"),
        trl_version=version("trl"),
        peft_version=version("peft"),
        transformers_version=version("transformers"),
        pytorch_version=version("torch"),
        nspo_citation=NSPO_CITATION,
    )


def _format(value: float | str) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
