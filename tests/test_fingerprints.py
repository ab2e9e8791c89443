from dataclasses import asdict, replace

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from test_calibration_data import CHAT_PROMPTS

from trl_nspo.calibration_data import CalibrationSettings
from trl_nspo.fingerprints import calibration_record, model_fingerprint


def test_model_fingerprint_ignores_what_cannot_change_outputs_and_sees_every_base_weight(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = model_fingerprint(model)
    # What GRPOTrainer does to the config, and what PEFT adds: neither changes what the base model computes.
    model.config.pad_token_id = None
    model.config.use_cache = False
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert model_fingerprint(peft_model) == before
    with torch.no_grad():
        peft_model.base_model.model.model.norm.weight[0] += 1e-3
    assert before.differences(model_fingerprint(peft_model)) == ["weights of model.norm.weight"]


def test_calibration_record_follows_what_steers_the_completions(tiny_model, tiny_tokenizer):
    dataset = Dataset.from_dict({"prompt": CHAT_PROMPTS})
    settings = CalibrationSettings(completion_length=5)
    before = calibration_record(tiny_model, tiny_tokenizer, dataset, settings)
    tiny_model.generation_config.pad_token_id = None  # GRPOTrainer rewrites it; padding is masked
    assert calibration_record(tiny_model, tiny_tokenizer, dataset, settings) == before
    tiny_model.generation_config.repetition_penalty = 1.3
    after = calibration_record(tiny_model, tiny_tokenizer, dataset, settings)
    assert [key for key, value in asdict(before).items() if getattr(after, key) != value] == ["completion_fingerprint"]
    without = calibration_record(tiny_model, tiny_tokenizer, dataset, replace(settings, generate_completions=False))
    assert without.completion_fingerprint is None
