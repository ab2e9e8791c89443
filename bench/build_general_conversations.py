"""Builds the embedded general-task conversations (`trl_nspo/demo/data/general_conversations*.jsonl`) from
SmolLM2-135M-Instruct alone, without any dataset: user turns the model samples after its own chat template's user
prefix (`trl_nspo.calibration_data.sampled_user_prompts`), then its greedy answers (float32, as calibration computes
them). The first 768 become the default calibration set, the rest (226 of the 994 distinct user turns that ended
within 64 tokens) a held-out set of the same kind that nothing calibrates or trains on.

    python bench/build_general_conversations.py   # ~30 min on 2 cores (generation of ~150k tokens)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_nspo.calibration_data import greedy_completions, sampled_user_prompts
from trl_nspo.demo import prepare_smollm2
from trl_nspo.demo.prompts import PROMPTS_DIR

SAMPLED_PROMPTS = 1280
CALIBRATION_CONVERSATIONS = 768
PROMPT_TOKENS = 64
ANSWER_TOKENS = 96
SEED = 1234


def main() -> None:
    path = prepare_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    started = time.perf_counter()
    prompts = sampled_user_prompts(
        model, tokenizer, SAMPLED_PROMPTS, PROMPT_TOKENS, batch_size=128, seed=SEED, description="user turns"
    )
    prompt_ids = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for prompt in prompts
    ]
    answers = greedy_completions(model, tokenizer, prompt_ids, ANSWER_TOKENS, 128, "greedy answers")
    conversations = [
        {
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True).strip()},
            ]
        }
        for prompt, answer in zip(prompts, answers, strict=True)
    ]
    for name, rows in (
        ("general_conversations", conversations[:CALIBRATION_CONVERSATIONS]),
        ("general_conversations_heldout", conversations[CALIBRATION_CONVERSATIONS:]),
    ):
        target = Path(PROMPTS_DIR) / f"{name}.jsonl"
        target.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        print(f"{target}: {len(rows)} conversations")
    print(f"{len(prompts)} distinct user turns of {SAMPLED_PROMPTS} sampled, {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
