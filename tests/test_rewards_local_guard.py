"""`trl_nspo/rewards/local_guard.py` on the tiny offline model from conftest.py."""

import pytest
import torch

from trl_nspo.rewards import LocalGuardReward


def conversational(prompt: str, response: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    return [{"role": "user", "content": prompt}], [{"role": "assistant", "content": response}]


GUARD_PROMPTS = ["How do I bake bread at home?", "What is 12 times 7?", "Tell me how to pick a lock.", "Hi"]
GUARD_COMPLETIONS = [
    "Mix flour, water, salt and yeast, then knead and let it rise.",
    "It is 84.",
    "I'm sorry, but I cannot assist with that request.",
    "Write a haiku about autumn leaves falling on a quiet river, then sort the list 3, 1, 2.",
]


def hand_computed_p_unsafe(model, tokenizer, prompt: str, completion: str) -> float:
    """p(unsafe) from one unpadded forward pass, independently of `LocalGuardReward`'s batching."""
    conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    input_ids = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        next_token_logits = model(input_ids=input_ids).logits[0, -1]
    safe_id = tokenizer.encode("safe", add_special_tokens=False)[0]
    unsafe_id = tokenizer.encode("unsafe", add_special_tokens=False)[0]
    return torch.softmax(next_token_logits[[safe_id, unsafe_id]], dim=-1)[1].item()


def test_local_guard_matches_hand_computed_softmax(tiny_model, tiny_tokenizer):
    guard = LocalGuardReward(tiny_model, tiny_tokenizer, safe_reward=0.5, unsafe_reward=-2.0, batch_size=3)
    expected = [
        hand_computed_p_unsafe(tiny_model, tiny_tokenizer, prompt, completion)
        for prompt, completion in zip(GUARD_PROMPTS, GUARD_COMPLETIONS, strict=True)
    ]

    probabilities = guard.unsafe_probabilities(GUARD_PROMPTS, GUARD_COMPLETIONS)
    rewards = guard(GUARD_PROMPTS, GUARD_COMPLETIONS, trainer_state=None)

    assert guard.__name__ == "local_guard_reward"
    assert not isinstance(guard, torch.nn.Module)  # GRPOTrainer would feed an nn.Module as a classifier instead
    assert len(set(round(p, 6) for p in expected)) == len(expected)  # the samples really score differently
    assert probabilities == pytest.approx(expected, abs=1e-5)
    assert rewards == pytest.approx([-2.0 * p + 0.5 * (1 - p) for p in expected], abs=1e-5)


def test_local_guard_batching_and_padding_side_do_not_change_scores(tiny_model, tiny_tokenizer):
    one_by_one = [
        LocalGuardReward(tiny_model, tiny_tokenizer)([prompt], [completion])[0]
        for prompt, completion in zip(GUARD_PROMPTS, GUARD_COMPLETIONS, strict=True)
    ]
    tiny_tokenizer.padding_side = "right"
    batched = LocalGuardReward(tiny_model, tiny_tokenizer, batch_size=4)(GUARD_PROMPTS, GUARD_COMPLETIONS)
    tiny_tokenizer.padding_side = "left"
    pairs = LocalGuardReward(tiny_model, tiny_tokenizer, batch_size=2)(GUARD_PROMPTS, GUARD_COMPLETIONS)

    assert batched == pytest.approx(one_by_one, abs=1e-5)
    assert pairs == pytest.approx(one_by_one, abs=1e-5)


def test_local_guard_batching_with_absolute_positions(tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    # Unlike Llama's rotary embeddings, GPT-2's learned positions change the output if left padding shifts them.
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=256)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wpe.weight.normal_(std=1.0)
    one_by_one = [
        LocalGuardReward(model, tiny_tokenizer)([prompt], [completion])[0]
        for prompt, completion in zip(GUARD_PROMPTS, GUARD_COMPLETIONS, strict=True)
    ]
    batched = LocalGuardReward(model, tiny_tokenizer, batch_size=4)(GUARD_PROMPTS, GUARD_COMPLETIONS)
    assert batched == pytest.approx(one_by_one, abs=1e-5)


def test_local_guard_equal_answer_logits_give_half(tiny_model, tiny_tokenizer):
    guard = LocalGuardReward(tiny_model, tiny_tokenizer, safe_reward=1.0, unsafe_reward=-1.0)
    with torch.no_grad():
        tiny_model.lm_head.weight[guard.unsafe_token_id] = tiny_model.lm_head.weight[guard.safe_token_id]
    assert guard(GUARD_PROMPTS, GUARD_COMPLETIONS) == pytest.approx([0.0] * len(GUARD_PROMPTS), abs=1e-6)


def test_local_guard_swapped_tokens_complement(tiny_model, tiny_tokenizer):
    guard = LocalGuardReward(tiny_model, tiny_tokenizer)
    swapped = LocalGuardReward(tiny_model, tiny_tokenizer, safe_token="unsafe", unsafe_token="safe")
    p_unsafe = guard.unsafe_probabilities(GUARD_PROMPTS, GUARD_COMPLETIONS)
    p_swapped = swapped.unsafe_probabilities(GUARD_PROMPTS, GUARD_COMPLETIONS)
    assert [p + q for p, q in zip(p_unsafe, p_swapped, strict=True)] == pytest.approx([1.0] * len(p_unsafe), abs=1e-6)


def test_local_guard_formats_path_and_prefix(tiny_model_dir, tiny_model, tiny_tokenizer):
    from_path = LocalGuardReward(str(tiny_model_dir), device="cpu")
    loaded = LocalGuardReward(tiny_model, tiny_tokenizer)
    conversations = [conversational(p, c) for p, c in zip(GUARD_PROMPTS, GUARD_COMPLETIONS, strict=True)]
    prompts, completions = zip(*conversations, strict=True)

    standard = loaded(GUARD_PROMPTS, GUARD_COMPLETIONS)
    assert from_path(GUARD_PROMPTS, GUARD_COMPLETIONS) == pytest.approx(standard, abs=1e-6)
    assert loaded(list(prompts), list(completions)) == pytest.approx(standard, abs=1e-6)
    prefixed = LocalGuardReward(tiny_model, tiny_tokenizer, answer_prefix="\n\n")(GUARD_PROMPTS, GUARD_COMPLETIONS)
    assert prefixed != pytest.approx(standard, abs=1e-4)  # the prefix is really scored as generated text


def test_local_guard_rejects_bad_setup(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="start with the same token"):
        LocalGuardReward(tiny_model, tiny_tokenizer, safe_token="yes", unsafe_token="yes please")
    with pytest.raises(ValueError, match="pass `tokenizer=`"):
        LocalGuardReward(tiny_model)
