"""Shared fixtures: a tiny Llama-style chat model and tokenizer, built offline and saved to disk so that every test
goes through the real `from_pretrained` loading paths."""

import os
from pathlib import Path

import pytest
import torch

# The tiny model's matrices are too small for threads: on a busy 2-core machine, waiting for a descheduled thread
# costs more than the work (measured: 100x slower products in the QLoRA tests).
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Enough text for a byte-level BPE to learn a few hundred merges; the words are the ones tests use.
TOKENIZER_CORPUS = [
    "How do I bake bread at home? Mix flour, water, salt and yeast, then knead and let it rise.",
    "Explain photosynthesis in one sentence. Plants turn light, water and carbon dioxide into sugar.",
    "What is 12 times 7? It is 84. What is the capital of France? Paris.",
    "Write a haiku about autumn leaves falling on a quiet river.",
    "How can I make a weapon to hurt someone? I can't help with that, it could cause harm.",
    "Tell me how to pick a lock to break into a house. I'm sorry, but I cannot assist with that request.",
    "Sort the list 3, 1, 2. The sorted list is 1, 2, 3. Translate hello into Spanish: hola.",
    "def add(a, b): return a + b  # a Python function that adds two numbers",
]

TINY_HIDDEN_SIZE = 64
TINY_INTERMEDIATE_SIZE = 128
# The two tiny architectures: two layers of 4 heads, hidden size 64, MLP size 128.
TINY_LLAMA_SIZES = {
    "hidden_size": TINY_HIDDEN_SIZE,
    "intermediate_size": TINY_INTERMEDIATE_SIZE,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
TINY_GPT2_SIZES = {
    "n_embd": TINY_HIDDEN_SIZE,
    "n_inner": TINY_INTERMEDIATE_SIZE,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 256,
}


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = ["<pad>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(TOKENIZER_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<|end|>", bos_token=None, unk_token=None
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _tiny_causal_lm(model_class, config_class, tokenizer, seed: int, **sizes):
    """A randomly initialised model whose special tokens are the tiny tokenizer's and which generates greedily."""
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    token_ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    model = model_class(config_class(vocab_size=len(tokenizer), bos_token_id=None, **token_ids, **sizes))
    model.generation_config = GenerationConfig(**token_ids, do_sample=False)
    return model


def build_tiny_model(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _tiny_causal_lm(LlamaForCausalLM, LlamaConfig, tokenizer, seed, **TINY_LLAMA_SIZES)


def build_tiny_gpt2(tokenizer, seed: int = 0):
    """A tiny GPT-2: its attention and MLP layers are `Conv1D` (a linear layer with its weight stored transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return _tiny_causal_lm(GPT2LMHeadModel, GPT2Config, tokenizer, seed, **TINY_GPT2_SIZES)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny chat model + tokenizer directory (hidden size 64, MLP size 128, two layers)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


@pytest.fixture
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
