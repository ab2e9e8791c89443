"""Calibration: the inputs each constrained linear layer sees on general-task data, turned into null-space projectors.

This is the only module that knows about forward hooks, attention masks, chat templates, PEFT layer types and
adapters-off forward passes. The steps follow PEFT's data-driven LoRA initialisations (EVA, CorDA): collect
statistics with hooks (padding removed with the attention mask) → find layers that read the same input and compute
their statistics once → eigendecompose → keep the smaller basis.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import is_peft_model
from datasets import Dataset
from peft.tuners.lora import LoraLayer
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from .null_space import CovarianceAccumulator, NullSpaceBasis, NullSpaceError, NullSpaceRule, decompose_covariance
from .projectors import CalibrationRecord, ModelFingerprint, NullSpaceProjectors, ProjectorGroup

logger = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("module.", "base_model.model.", "_orig_mod.")


@dataclass(frozen=True)
class CalibrationSettings:
    """
    What calibration data is fed to the model, and how.

    Args:
        num_samples (`int`, *optional*, defaults to `1024`):
            Rows of the calibration dataset to use (the first ones).
        max_length (`int`, *optional*, defaults to `256`):
            Maximum tokens of each prompt (or conversation); longer ones are truncated, and counted.
        generate_completions (`bool`, *optional*, defaults to `True`):
            Append the base model's own greedy completion to every `prompt`, so the preserved behaviour includes
            responses (as the paper does).
        completion_length (`int`, *optional*, defaults to `128`):
            Maximum tokens of each generated completion.
        batch_size (`int`, *optional*, defaults to `8`):
            Sequences per forward pass.
        sketch_dim (`int`, *optional*, defaults to `64`):
            Columns of the random sketch of each layer's inputs kept for the preservation metric; `0` disables it.
        groups_per_pass (`int`, *optional*):
            Covariances held in memory at once. Fewer means more forward passes over the data but less memory (a d×d
            float64 matrix per group); `None` does everything in one pass.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the sketch.
    """

    num_samples: int = 1024
    max_length: int = 256
    generate_completions: bool = True
    completion_length: int = 128
    batch_size: int = 8
    sketch_dim: int = 64
    groups_per_pass: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_samples", "max_length", "completion_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"Calibration setting `{name}` must be a positive integer, got {getattr(self, name)}."
                )
        if self.sketch_dim < 0:
            raise ValueError(f"Calibration setting `sketch_dim` must be ≥ 0, got {self.sketch_dim}.")
        if self.groups_per_pass is not None and self.groups_per_pass < 1:
            raise ValueError(f"Calibration setting `groups_per_pass` must be ≥ 1 or None, got {self.groups_per_pass}.")


def canonical_module_name(name: str) -> str:
    """A module name without DDP/PEFT/compile wrapper prefixes, so projector files work with and without PEFT."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def _name_matches(name: str, targets: str | Sequence[str]) -> bool:
    # Same convention as PEFT's `target_modules`: a string is a full-match regex, a list matches name suffixes.
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith(f".{target}") for target in targets)


def find_constrained_modules(
    model: nn.Module, target_modules: str | Sequence[str] | None = None
) -> dict[str, nn.Module]:
    """
    The linear modules whose updates NSPO keeps in the null space, by canonical name.

    With a PEFT model, these are the LoRA-adapted linear layers (the update is B·A, and A is projected); otherwise the
    `nn.Linear` layers (including bitsandbytes ones) and GPT-2-style `Conv1D` layers (linear, with the weight stored
    transposed), except the output embedding.

    Args:
        model (`nn.Module`):
            The model, plain or PEFT-wrapped.
        target_modules (`str` or `Sequence[str]`, *optional*):
            Restricts the set: a full-match regex, or module-name suffixes (PEFT's convention). `None` keeps all.

    Returns:
        `dict[str, nn.Module]`: the LoRA layers (PEFT) or linear layers, in model order.
    """
    candidates: dict[str, nn.Module] = {}
    not_linear: list[str] = []
    if is_peft_model(model):
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                adapters = [a for a in module.active_adapters if a in module.lora_A]
                if adapters and isinstance(module.lora_A[adapters[0]], nn.Linear):
                    candidates[canonical_module_name(name)] = module
                elif module.active_adapters:
                    not_linear.append(canonical_module_name(name))
    else:
        output_embeddings = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, Conv1D)) and module is not output_embeddings:
                candidates[canonical_module_name(name)] = module
            elif target_modules is not None and _name_matches(canonical_module_name(name), target_modules):
                if len(list(module.children())) == 0 and any(p.requires_grad for p in module.parameters()):
                    if module is output_embeddings:
                        raise NullSpaceError(_output_embedding_message(model, canonical_module_name(name)))
                    not_linear.append(canonical_module_name(name))
    if target_modules is not None:
        candidates = {name: module for name, module in candidates.items() if _name_matches(name, target_modules)}
        not_linear = [name for name in not_linear if _name_matches(name, target_modules)]
    if not_linear:
        raise NullSpaceError(
            f"NSPO can only constrain linear layers, but these targeted modules are not: {not_linear[:6]}. Remove "
            "them from the LoRA `target_modules` / `nspo_target_modules`."
        )
    if not candidates:
        raise NullSpaceError(
            f"No linear layer to constrain was found (target modules: {target_modules!r}). With LoRA, check the "
            "adapter's `target_modules`; otherwise check `nspo_target_modules` against `model.named_modules()`."
        )
    return candidates


def _output_embedding_message(model: PreTrainedModel, name: str) -> str:
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        reason = (
            "its weight is tied to the input embeddings (`tie_word_embeddings=True`), so changing it would also move "
            "the embedding of every input token, which no null space of layer inputs can constrain"
        )
    else:
        reason = (
            "like the original method, NSPO leaves the output embedding out, and constraining it is not implemented"
        )
    return (
        f"`{name}` is the output embedding (an `nn.Linear`), which NSPO does not constrain in full fine-tuning: "
        f"{reason}. Remove it from `nspo_target_modules`, then freeze it "
        "(`model.get_output_embeddings().requires_grad_(False)`) or let it train unconstrained "
        "(`allow_unconstrained_parameters=True`)."
    )


def base_linear(module: nn.Module) -> nn.Module:
    """The frozen base layer of a LoRA layer, or the layer itself."""
    return module.get_base_layer() if isinstance(module, LoraLayer) else module


def constrained_input_dim(module: nn.Module) -> int:
    """Input size d of a constrained LoRA layer, linear layer or GPT-2 `Conv1D` (which calls it `nx`)."""
    return module.nx if isinstance(module, Conv1D) else module.in_features


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


def _adapter_tensor_ids(model: nn.Module) -> set[int]:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    ids = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attribute in (*module.adapter_layer_names, *module.other_param_names):
                value = getattr(module, attribute, None)
                if isinstance(value, nn.Module):
                    ids.update(id(tensor) for tensor in (*value.parameters(), *value.buffers()))
        elif isinstance(module, ModulesToSaveWrapper):
            ids.update(id(tensor) for tensor in module.modules_to_save.parameters())
    return ids


def _base_tensor_name(name: str) -> str:
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
    tokenizer = _tokenizer_of(processing_class)
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
    [`calibration_token_sequences`], and the token count and fingerprint of all the calibration `sequences`.
    """
    return replace(
        calibration_record(model, processing_class, dataset, settings),
        **asdict(settings),
        **counts,
        token_count=sum(len(ids) for ids in sequences),
        data_fingerprint=tokens_fingerprint(sequences),
    )


@contextlib.contextmanager
def requires_grad_kept(model: nn.Module) -> Iterator[None]:
    """
    Puts back every parameter's `requires_grad` on exit. PEFT's `disable_adapter()` and `set_adapter()` make every
    active adapter weight trainable again, which would unfreeze weights frozen on purpose (LoRA-FA's A).
    """
    requires_grad = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        yield
    finally:
        for parameter, flag in requires_grad:
            parameter.requires_grad_(flag)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """A context in which `model` runs as its base model (PEFT adapters disabled); a no-op for plain models."""
    if not is_peft_model(model):
        yield
        return
    with requires_grad_kept(model), model.disable_adapter():
        yield


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _tokenizer_of(processing_class) -> PreTrainedTokenizerBase:
    return getattr(processing_class, "tokenizer", processing_class)


def calibration_prompts(
    processing_class, dataset: Dataset, settings: CalibrationSettings
) -> tuple[list[list[int]], dict[str, int], str]:
    """
    Token ids of every calibration prompt (or conversation, or text), chat template applied and truncated to
    `settings.max_length`; empty ones dropped.

    Returns:
        `tuple[list[list[int]], dict[str, int], str]`: the sequences, counts (rows, truncated rows, empty rows) and
        the column they came from.
    """
    tokenizer = _tokenizer_of(processing_class)
    if len(dataset) == 0:
        raise NullSpaceError("The calibration dataset is empty; pass general-task prompts (`calibration_dataset`).")
    rows = dataset.select(range(min(settings.num_samples, len(dataset))))
    column = next((c for c in ("prompt", "messages", "text") if c in rows.column_names), None)
    if column is None:
        raise NullSpaceError(
            f"The calibration dataset has columns {rows.column_names}; NSPO needs one of 'prompt' (text or chat "
            "messages), 'messages' (conversations) or 'text'. Rename a column or use `trl_nspo.data`."
        )
    texts = []
    for value in rows[column]:
        if isinstance(value, str):
            texts.append((value, True))
        else:
            # Chat templates add their own special tokens, so the rendered text must not get them twice.
            rendered = tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=column == "prompt")
            texts.append((rendered, False))
    sequences = []
    truncated = 0
    for text, add_special_tokens in texts:
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        if len(ids) > settings.max_length:
            truncated += 1
            ids = ids[: settings.max_length]
        sequences.append(ids)
    empty = sum(1 for ids in sequences if not ids)
    sequences = [ids for ids in sequences if ids]
    if not sequences:
        raise NullSpaceError("Every calibration row tokenized to nothing; check the dataset's text column.")
    return sequences, {"rows": len(texts), "truncated_rows": truncated, "empty_rows": empty}, column


def calibration_token_sequences(
    model: nn.Module,
    processing_class,
    dataset: Dataset,
    settings: CalibrationSettings,
    show_progress: bool = True,
) -> tuple[list[list[int]], dict[str, int]]:
    """
    Token ids of every calibration sequence: prompts (optionally followed by the model's greedy completion), or
    whole conversations.

    Accepts the dataset formats TRL does: `prompt` (text, or a list of chat messages), `messages` (full
    conversations) or `text`.

    Returns:
        `tuple[list[list[int]], dict[str, int]]`: the sequences, and counts (rows, truncated rows, generated tokens).
    """
    tokenizer = _tokenizer_of(processing_class)
    sequences, counts, column = calibration_prompts(processing_class, dataset, settings)
    generated_tokens = 0
    if settings.generate_completions and column == "prompt":
        with adapters_disabled(model):
            completions = greedy_completions(
                model,
                tokenizer,
                sequences,
                settings.completion_length,
                settings.batch_size,
                "NSPO calibration: greedy completions" if show_progress else None,
            )
        sequences = [prompt + completion for prompt, completion in zip(sequences, completions, strict=True)]
        generated_tokens = sum(len(completion) for completion in completions)
    if counts["truncated_rows"]:
        logger.warning(
            "%d of %d calibration rows were longer than calibration_max_length=%d tokens and were truncated.",
            counts["truncated_rows"],
            counts["rows"],
            settings.max_length,
        )
    return sequences, {**counts, "generated_tokens": generated_tokens}


def stop_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokens that end a greedy calibration completion: the generation config's and the tokenizer's EOS."""
    eos_ids = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else []
    return set([eos_ids] if isinstance(eos_ids, int) else eos_ids) | {tokenizer.eos_token_id}


@torch.no_grad()
def greedy_completions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    description: str | None = None,
) -> list[list[int]]:
    """
    Token ids of `model`'s greedy completion of each prompt (ids), up to and including the first end-of-sequence
    token. Runs in eval mode with the model's current adapter state; a progress bar is shown if `description` is set.
    """
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    eos_ids = stop_token_ids(model, tokenizer)
    completions = []
    batches = range(0, len(prompts), batch_size)
    with eval_mode(model):
        for start in tqdm(batches, desc=description, disable=description is None):
            batch = prompts[start : start + batch_size]
            width = max(len(ids) for ids in batch)
            # Left padding, so every completion starts right after its prompt.
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in batch], device=device)
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
            for row in output[:, width:].tolist():
                completion = []
                for token in row:
                    completion.append(token)
                    if token in eos_ids:
                        break
                completions.append(completion)
    return completions


def right_padded_batches(
    sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # Right padding: under causal attention, pads after a sequence cannot change its real tokens' activations.
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([list(ids) + [pad_id] * (width - len(ids)) for ids in batch], device=device)
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch], device=device)
        yield input_ids, attention_mask


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _shared_input_groups(
    model: nn.Module, modules: dict[str, nn.Module], input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> list[list[str]]:
    """Groups modules that receive identical inputs (q/k/v, gate/up), found on one batch as PEFT's EVA does."""
    seen: dict[str, torch.Tensor] = {}

    def remember(name: str):
        def hook(module, args, kwargs):
            seen[name] = _layer_input(args, kwargs)

        return hook

    handles = [m.register_forward_pre_hook(remember(n), with_kwargs=True) for n, m in modules.items()]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    for name in modules:
        if name not in seen:
            raise NullSpaceError(f"Module {name} was not called in a forward pass, so it cannot be calibrated.")
        current = seen[name]
        for group in groups:
            first = seen[group[0]]
            if first is current or (first.shape == current.shape and torch.equal(first, current)):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def _all_reduce_sum(tensor: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


@torch.no_grad()
def _accumulate_covariances(
    model: nn.Module,
    modules: dict[str, nn.Module],
    groups: list[list[str]],
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    settings: CalibrationSettings,
    show_progress: bool,
    description: str,
) -> dict[str, CovarianceAccumulator]:
    device = next(model.parameters()).device
    accumulators: dict[str, CovarianceAccumulator] = {}
    current_mask: list[torch.Tensor] = []

    def accumulate(name: str):
        def hook(module, args, kwargs):
            inputs = _layer_input(args, kwargs)
            real_tokens = inputs[current_mask[0]]
            if not torch.isfinite(real_tokens).all():
                raise NullSpaceError(
                    f"Non-finite activations at the input of {name} during calibration (float16 overflow?). Load the "
                    "model in float32 or bfloat16 for calibration."
                )
            if name not in accumulators:
                accumulators[name] = CovarianceAccumulator(
                    inputs.shape[-1], settings.sketch_dim, device=device, seed=settings.seed + _rank()
                )
            accumulators[name].update(real_tokens)

        return hook

    handles = [modules[group[0]].register_forward_pre_hook(accumulate(group[0]), with_kwargs=True) for group in groups]
    try:
        batches = right_padded_batches(sequences, settings.batch_size, pad_id, device)
        total = (len(sequences) + settings.batch_size - 1) // settings.batch_size
        for input_ids, attention_mask in tqdm(batches, total=total, desc=description, disable=not show_progress):
            current_mask[:] = [attention_mask.bool()]
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for accumulator in accumulators.values():
        _all_reduce_sum(accumulator.sum)
        _all_reduce_sum(accumulator.sketch)
        token_count = torch.tensor(accumulator.token_count, device=device)
        _all_reduce_sum(token_count)
        accumulator.token_count = int(token_count.item())
    return accumulators


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def layer_input_covariances(
    model: nn.Module,
    modules: dict[str, nn.Module],
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    settings: CalibrationSettings,
    show_progress: bool = True,
) -> Iterator[tuple[list[str], CovarianceAccumulator]]:
    """
    Runs token sequences through the model (adapters disabled, eval mode) and yields, for each set of modules that
    read the same input, that input's covariance (summed across ranks under `torch.distributed`).

    Yields one group at a time, doing one forward pass over the data per `settings.groups_per_pass` groups, so at
    most that many d × d covariances are alive at once.

    Args:
        model (`nn.Module`):
            The model, plain or PEFT-wrapped.
        modules (`dict[str, nn.Module]`):
            The modules whose inputs to collect (see [`find_constrained_modules`]).
        sequences (`Sequence[Sequence[int]]`):
            Token ids of this rank's sequences (see [`calibration_token_sequences`]).
        pad_id (`int`):
            Token id used for (right) padding; padded positions are masked out.
        settings ([`CalibrationSettings`]):
            Batch size, sketch size, groups per pass and seed.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar.

    Yields:
        `tuple[list[str], CovarianceAccumulator]`: the module names sharing the input, and its statistics.
    """
    device = next(model.parameters()).device
    with eval_mode(model), adapters_disabled(model):
        first_ids, first_mask = next(right_padded_batches(sequences, settings.batch_size, pad_id, device))
        groups = _shared_input_groups(model, modules, first_ids, first_mask)
        groups_per_pass = settings.groups_per_pass or len(groups)
        passes = [groups[i : i + groups_per_pass] for i in range(0, len(groups), groups_per_pass)]
        for index, pass_groups in enumerate(passes):
            description = "NSPO calibration: layer inputs"
            if len(passes) > 1:
                description += f" (pass {index + 1}/{len(passes)})"
            accumulators = _accumulate_covariances(
                model, modules, pass_groups, sequences, pad_id, settings, show_progress, description
            )
            # The caller decomposes each covariance between two yields: this bar shows that work.
            for group in tqdm(pass_groups, desc="NSPO calibration: null spaces", disable=not show_progress):
                yield group, accumulators.pop(group[0])


def compute_projectors(
    model: nn.Module,
    processing_class,
    dataset: Dataset,
    settings: CalibrationSettings | None = None,
    rule: NullSpaceRule | None = None,
    target_modules: str | Sequence[str] | None = None,
    show_progress: bool = True,
) -> NullSpaceProjectors:
    """
    Calibrates a model on general-task data and returns the null-space projectors of its constrained layers.

    Under `torch.distributed`, each rank calibrates on its share of the rows, the covariances are summed across
    ranks, and every rank decomposes the same summed covariance, so the projectors are identical everywhere.

    Args:
        model (`nn.Module`):
            The model (plain or PEFT-wrapped). Calibration runs with adapters disabled, in eval mode, without
            gradients.
        processing_class ([`~transformers.PreTrainedTokenizerBase`] or processor):
            Tokenizer (with a chat template for conversational data).
        dataset ([`~datasets.Dataset`]):
            General-task data with a `prompt`, `messages` or `text` column.
        settings ([`CalibrationSettings`], *optional*):
            What to feed the model; defaults follow the paper.
        rule ([`NullSpaceRule`], *optional*):
            How to select each null space; defaults to α = 5e-5 of the largest eigenvalue.
        target_modules (`str` or `Sequence[str]`, *optional*):
            Restricts the constrained modules (see [`find_constrained_modules`]).
        show_progress (`bool`, *optional*, defaults to `True`):
            Show progress bars (on the main rank).

    Returns:
        [`NullSpaceProjectors`]
    """
    settings = settings or CalibrationSettings()
    rule = rule or NullSpaceRule()
    show_progress = show_progress and _rank() == 0
    modules = find_constrained_modules(model, target_modules)
    fingerprint = model_fingerprint(model)
    sequences, counts = calibration_token_sequences(model, processing_class, dataset, settings, show_progress)
    local_sequences = sequences[_rank() :: _world_size()]
    if not local_sequences:
        raise NullSpaceError(
            f"{len(sequences)} calibration sequences cannot be shared among {_world_size()} processes; pass at least "
            "one row per process."
        )
    groups: dict[str, ProjectorGroup] = {}
    pad_id = pad_token_id(processing_class)
    for names, accumulator in layer_input_covariances(
        model, modules, local_sequences, pad_id, settings, show_progress
    ):
        try:
            eigenvalues, eigenvectors = decompose_covariance(accumulator.sum)
            basis = NullSpaceBasis.from_eigh(eigenvalues, eigenvectors, rule.null_dimension(eigenvalues))
        except NullSpaceError as error:
            raise NullSpaceError(f"{names[0]}: {error}") from error
        sketch = accumulator.sketch.float().cpu() if settings.sketch_dim else None
        groups[names[0]] = ProjectorGroup(
            names, basis.to(device="cpu", dtype=torch.float32), accumulator.token_count, sketch, eigenvalues.cpu()
        )
    projectors = NullSpaceProjectors(
        groups=groups,
        rule=rule,
        model_fingerprint=fingerprint,
        calibration=projectors_calibration_record(model, processing_class, dataset, settings, sequences, counts),
    )
    _warn_about_thin_calibration(projectors)
    return projectors


def pad_token_id(processing_class) -> int:
    tokenizer = _tokenizer_of(processing_class)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _warn_about_thin_calibration(projectors: NullSpaceProjectors) -> None:
    thin = [
        f"{key} ({group.token_count} tokens < input size {group.basis.input_dim})"
        for key, group in projectors.groups.items()
        if group.token_count < group.basis.input_dim
    ]
    if thin:
        warnings.warn(
            "Calibration saw fewer tokens than the input size of some layers, so their null space is (in part) an "
            f"artefact of too little data rather than a property of general-task inputs: {'; '.join(thin[:4])}"
            f"{' …' if len(thin) > 4 else ''}. Use more calibration samples or longer completions.",
            stacklevel=2,
        )
