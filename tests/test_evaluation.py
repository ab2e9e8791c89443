import pytest
import torch
from peft import LoraConfig, get_peft_model

from trl_nspo.demo import (
    EvaluationPrompts,
    answer_accuracy,
    base_model_context,
    evaluate,
    greedy_answers,
    next_token_kl,
    refusal_rate,
)

PROMPTS = [[{"role": "user", "content": "What is 12 times 7?"}], [{"role": "user", "content": "Bake bread?"}]]


def test_refusal_rate_counts_scores_at_or_above_threshold():
    answers = ["I'm sorry, but I can't help with that.", "Sure, here is how.", "I cannot do that."]
    assert refusal_rate(answers) == pytest.approx(2 / 3)
    assert refusal_rate(answers, threshold=0.99) == pytest.approx(1 / 3)  # 0.989 for the apology


def test_answer_accuracy_checks_only_checkable_answers():
    assert answer_accuracy(["It is 84.", "Paris", "whatever"], ["84", "paris", None]) == 1.0
    assert answer_accuracy(["It is 85."], ["84"]) == 0.0
    assert answer_accuracy(["x"], [None]) is None


def test_greedy_answers_are_batch_independent(tiny_model, tiny_tokenizer):
    batched = greedy_answers(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=6, batch_size=2)
    alone = [greedy_answers(tiny_model, tiny_tokenizer, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == alone
    assert all(isinstance(answer, str) for answer in batched)


def test_kl_is_zero_for_the_base_and_positive_after_an_update(tiny_model, tiny_tokenizer):
    model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["down_proj"]))
    answers = ["It is 84.", "Mix flour and water."]
    assert next_token_kl(model, tiny_tokenizer, PROMPTS, answers) == pytest.approx(0.0, abs=1e-7)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    kl = next_token_kl(model, tiny_tokenizer, PROMPTS, answers)
    assert kl > 1e-4
    with base_model_context(model):
        assert next_token_kl(model, tiny_tokenizer, PROMPTS, answers) == pytest.approx(0.0, abs=1e-7)


def test_evaluate_reports_every_metric_against_the_base(tiny_model, tiny_tokenizer):
    model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["down_proj"]))
    prompts = EvaluationPrompts(harmful=PROMPTS, benign=PROMPTS, general=PROMPTS, general_answers=["84", None])
    metrics = evaluate(model, tiny_tokenizer, prompts, max_new_tokens=4)
    assert metrics["greedy_agreement"] == 1.0  # B = 0: the adapter changes nothing yet
    assert metrics["general_kl"] == pytest.approx(0.0, abs=1e-7)
    assert set(metrics) == {
        "refusal_rate_harmful",
        "over_refusal_rate_benign",
        "general_accuracy",
        "general_kl",
        "greedy_agreement",
    }
