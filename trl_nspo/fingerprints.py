"""Fingerprints of what reaches the constrained layers in calibration: the model (config and every base weight), the
calibration rows, chat template and tokens. A projector file records them ([`~projectors.CalibrationRecord`],
[`~projectors.ModelFingerprint`]) so that a later run can show the file belongs to it without recalibrating.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
from datasets import Dataset
from torch import nn

from .calibration_data import CalibrationSettings, calibration_prompts, stop_token_ids, tokenizer_of
from .projectors import CalibrationRecord, ModelFingerprint

# Config fields that cannot change what a layer computes; everything else (rope, norms' eps, sizes…) is compared.
_CONFIG_FIELDS_WITHOUT_EFFECT = {
    "_name_or_path",
    "_commit_hash",
    "architectures",
    "transformers_version",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    # The weights' bytes carry their dtype; the config's copy differs with how the model was loaded.
    "dtype",
    "torch_dtype",
    # Padding is masked out; GRPOTrainer copies the tokenizer's pad id into the config, `trl-nspo calibrate` does not.
    "pad_token_id",
}
_HASH_BLOCK_ELEMENTS = 1 << 24


def model_fingerprint(model: nn.Module) -> ModelFingerprint:
    """
    The config and a hash of every base parameter and buffer of `model` (PEFT adapters excluded), by canonical name,
    so projectors from a PEFT-wrapped model match the plain model and any adapter on it.

    Every byte of every base tensor is hashed (SHA-256, in 16M-element blocks to bound device memory): sampling values
    would miss an edit to a few rows. The cost is O(model bytes), paid once per run start: about 1.7 GB/s on one CPU
    core, i.e. ~10 s for a 7B model in bfloat16 (15 GB), plus the device-to-host copy.
    """
    # Imported here: calibration.py, which owns it, imports this module.
    from .calibration import _adapter_tensor_ids

    adapter_tensors = _adapter_tensor_ids(model)
    tensors = {}
    named = [*model.named_parameters(remove_duplicate=True), *model.named_buffers(remove_duplicate=True)]
    for name, tensor in named:
        if id(tensor) in adapter_tensors:
            continue
        tensors[_base_tensor_name(name)] = _tensor_sha256(tensor)
    config = getattr(model, "config", None)
    config_values = {} if config is None else _config_with_effect(json.loads(config.to_json_string(use_diff=False)))
    return ModelFingerprint(config=config_values, tensors=dict(sorted(tensors.items())))


def _config_with_effect(values: dict[str, Any]) -> dict[str, Any]:
    # Nested configs (a multimodal model's `text_config`) carry the same fields.
    return {
        key: _config_with_effect(value) if isinstance(value, dict) else value
        for key, value in values.items()
        if key not in _CONFIG_FIELDS_WITHOUT_EFFECT
    }


def _base_tensor_name(name: str) -> str:
    # Imported here: calibration.py, which owns it, imports this module.
    from .calibration import canonical_module_name

    # PEFT keeps the wrapped layer as `…q_proj.base_layer` (LoRA) or `….original_module` (modules_to_save).
    parts = canonical_module_name(name).split(".")
    return ".".join(part for part in parts if part not in ("base_layer", "original_module"))


def _tensor_sha256(tensor: torch.Tensor) -> str:
    tensor = tensor.detach()
    digest = hashlib.sha256(f"{tuple(tensor.shape)}:{tensor.dtype};".encode())
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), _HASH_BLOCK_ELEMENTS):
        block = flat[start : start + _HASH_BLOCK_ELEMENTS].contiguous().cpu()
        digest.update(block.view(torch.uint8).numpy())  # the buffer itself: no copy to bytes
    return digest.hexdigest()[:16]


def tokens_fingerprint(sequences: Sequence[Sequence[int]]) -> str:
    digest = hashlib.sha256()
    for sequence in sequences:
        digest.update(torch.tensor(sequence, dtype=torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def calibration_record(
    model: nn.Module, processing_class, dataset: Dataset, settings: CalibrationSettings
) -> CalibrationRecord:
    """
    What reaches the layers in calibration, given the model: the settings that shape the sequences, and fingerprints
    of the dataset rows used, of the chat template, of the prompts' token ids and, with completions, of what steers
    greedy decoding (generation config, stop tokens). Cheap (tokenization only, no generation), so a saved projector
    file can be checked against the data a run is given.
    """
    tokenizer = tokenizer_of(processing_class)
    rows = dataset.select(range(min(settings.num_samples, len(dataset))))
    rows_digest = hashlib.sha256()
    for row in rows:
        rows_digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    prompts, _, _ = calibration_prompts(processing_class, dataset, settings)
    template = json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True)
    record = CalibrationRecord(
        num_samples=settings.num_samples,
        max_length=settings.max_length,
        generate_completions=settings.generate_completions,
        completion_length=settings.completion_length,
        rows_fingerprint=rows_digest.hexdigest()[:16],
        chat_template_fingerprint=hashlib.sha256(template.encode()).hexdigest()[:16],
        prompt_fingerprint=hashlib.sha256(tokens_fingerprint(prompts).encode()).hexdigest()[:16],
    )
    if settings.generate_completions:
        # Greedy decoding also follows the generation config (repetition penalty, suppressed tokens…) and stops at
        # its EOS ids; the pad id only fills masked positions (and GRPOTrainer rewrites it).
        generation = {
            key: value
            for key, value in model.generation_config.to_diff_dict().items()
            if key not in ("pad_token_id", "transformers_version", "_from_model_config")
        }
        generation["stop_token_ids"] = sorted(stop_token_ids(model, tokenizer))
        record.completion_fingerprint = hashlib.sha256(
            json.dumps(generation, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
    return record


def projectors_calibration_record(
    model: nn.Module,
    processing_class,
    dataset: Dataset,
    settings: CalibrationSettings,
    sequences: Sequence[Sequence[int]],
    counts: dict[str, int],
) -> CalibrationRecord:
    """
    The record a projector file keeps: [`calibration_record`] with every setting, the counts of
    [`~calibration_data.calibration_token_sequences`], and the token count and fingerprint of all the calibration
    `sequences`.
    """
    return replace(
        calibration_record(model, processing_class, dataset, settings),
        **asdict(settings),
        **counts,
        token_count=sum(len(ids) for ids in sequences),
        data_fingerprint=tokens_fingerprint(sequences),
    )
