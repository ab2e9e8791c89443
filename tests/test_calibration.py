from dataclasses import asdict, replace

import pytest
import torch
from conftest import build_tiny_gpt2
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from trl_nspo.calibration import (
    CalibrationSettings,
    calibration_record,
    calibration_token_sequences,
    canonical_module_name,
    compute_projectors,
    find_constrained_modules,
    layer_input_covariances,
    model_fingerprint,
)
from trl_nspo.null_space import NullSpaceError, NullSpaceRule

CHAT_PROMPTS = [
    [{"role": "user", "content": "What is 12 times 7?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves falling on a quiet river."}],
]
NO_COMPLETIONS = CalibrationSettings(generate_completions=False, batch_size=2, sketch_dim=0)


def chat_ids(tokenizer, messages, add_generation_prompt=True) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)["input_ids"])


def covariances(model, tokenizer, sequences, settings=NO_COMPLETIONS):
    modules = find_constrained_modules(model)
    return {
        names[0]: (names, accumulator)
        for names, accumulator in layer_input_covariances(
            model, modules, sequences, tokenizer.pad_token_id, settings, show_progress=False
        )
    }


class TestConstrainedModules:
    def test_full_model_constrains_every_linear_layer_but_the_lm_head(self, tiny_model):
        names = list(find_constrained_modules(tiny_model))
        assert len(names) == 14
        assert "lm_head" not in names and "model.layers.1.mlp.down_proj" in names

    def test_peft_model_constrains_lora_layers_under_canonical_names(self, tiny_model):
        peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
        names = list(find_constrained_modules(peft_model))
        assert names == [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.mlp.down_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.mlp.down_proj",
        ]

    def test_targets_filter_by_suffix_or_regex(self, tiny_model):
        assert len(find_constrained_modules(tiny_model, ["gate_proj", "up_proj"])) == 4
        assert list(find_constrained_modules(tiny_model, r".*layers\.0\.mlp\.down_proj")) == [
            "model.layers.0.mlp.down_proj"
        ]

    def test_non_linear_target_is_refused(self, tiny_model):
        with pytest.raises(NullSpaceError, match="only constrain linear layers.*embed_tokens"):
            find_constrained_modules(tiny_model, ["embed_tokens", "q_proj"])

    def test_targeted_output_embedding_is_refused_with_the_reason(self, tiny_model, tiny_tokenizer):
        # Before: "NSPO can only constrain linear layers, but these targeted modules are not: ['lm_head']".
        with pytest.raises(
            NullSpaceError, match=r"`lm_head` is the output embedding.*constraining it is not implemented"
        ):
            find_constrained_modules(tiny_model, ["q_proj", "lm_head"])
        with pytest.raises(NullSpaceError, match=r"`lm_head` is the output embedding.*tied to the input embeddings"):
            find_constrained_modules(build_tiny_gpt2(tiny_tokenizer), r".*(c_attn|lm_head)")

    def test_gpt2_conv1d_layers_are_constrained(self, tiny_tokenizer):
        names = list(find_constrained_modules(build_tiny_gpt2(tiny_tokenizer)))
        assert len(names) == 8 and "transformer.h.1.mlp.c_fc" in names and "lm_head" not in names

    def test_no_match_is_refused(self, tiny_model):
        with pytest.raises(NullSpaceError, match="No linear layer to constrain"):
            find_constrained_modules(tiny_model, ["query_key_value"])

    def test_wrapper_prefixes_are_stripped(self):
        assert canonical_module_name("module.base_model.model.model.layers.0.mlp") == "model.layers.0.mlp"


class TestSequences:
    def test_each_dataset_format_is_rendered_as_trl_does(self, tiny_model, tiny_tokenizer):
        settings = CalibrationSettings(generate_completions=False)
        conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        cases = {
            "prompt": (CHAT_PROMPTS[:1], chat_ids(tiny_tokenizer, CHAT_PROMPTS[0])),
            "messages": ([conversation], chat_ids(tiny_tokenizer, conversation, add_generation_prompt=False)),
            "text": (["Plain text."], tiny_tokenizer("Plain text.")["input_ids"]),
        }
        for column, (values, expected) in cases.items():
            dataset = Dataset.from_dict({column: values})
            sequences, counts = calibration_token_sequences(tiny_model, tiny_tokenizer, dataset, settings, False)
            assert sequences == [list(expected)], column
            assert counts["rows"] == 1

    def test_greedy_completions_match_unbatched_generation(self, tiny_model, tiny_tokenizer):
        settings = CalibrationSettings(completion_length=6, batch_size=2)
        dataset = Dataset.from_dict({"prompt": CHAT_PROMPTS})
        sequences, counts = calibration_token_sequences(tiny_model, tiny_tokenizer, dataset, settings, False)
        for prompt, sequence in zip(CHAT_PROMPTS, sequences, strict=True):
            ids = torch.tensor([chat_ids(tiny_tokenizer, prompt)])
            alone = tiny_model.generate(ids, max_new_tokens=6, do_sample=False)[0].tolist()
            assert sequence == alone
        assert counts["generated_tokens"] == sum(len(s) for s in sequences) - sum(
            len(chat_ids(tiny_tokenizer, p)) for p in CHAT_PROMPTS
        )

    def test_truncation_is_applied_and_counted(self, tiny_model, tiny_tokenizer):
        dataset = Dataset.from_dict({"text": ["short", "a much longer text that will not fit in eight tokens at all"]})
        settings = CalibrationSettings(generate_completions=False, max_length=8)
        sequences, counts = calibration_token_sequences(tiny_model, tiny_tokenizer, dataset, settings, False)
        assert max(len(s) for s in sequences) == 8 and counts["truncated_rows"] == 1

    def test_num_samples_takes_the_first_rows(self, tiny_model, tiny_tokenizer):
        dataset = Dataset.from_dict({"text": ["one", "two", "three"]})
        settings = CalibrationSettings(generate_completions=False, num_samples=2)
        sequences, _ = calibration_token_sequences(tiny_model, tiny_tokenizer, dataset, settings, False)
        assert sequences == [tiny_tokenizer(t)["input_ids"] for t in ("one", "two")]

    @pytest.mark.parametrize(
        "data, message",
        [
            ({"text": []}, "calibration dataset is empty"),
            ({"question": ["What?"]}, "needs one of 'prompt'"),
            ({"text": ["", ""]}, "tokenized to nothing"),
        ],
    )
    def test_bad_datasets_are_refused(self, tiny_model, tiny_tokenizer, data, message):
        with pytest.raises(NullSpaceError, match=message):
            calibration_token_sequences(tiny_model, tiny_tokenizer, Dataset.from_dict(data), NO_COMPLETIONS, False)


class TestCovariances:
    def test_padding_is_masked_out(self, tiny_model, tiny_tokenizer):
        sequences = [tiny_tokenizer(t)["input_ids"] for t in ("short", "a much longer sentence about bread")]
        padded = covariances(tiny_model, tiny_tokenizer, sequences, CalibrationSettings(batch_size=2, sketch_dim=0))
        separate = covariances(tiny_model, tiny_tokenizer, sequences, CalibrationSettings(batch_size=1, sketch_dim=0))
        assert len(sequences[0]) < len(sequences[1])
        for key, (_, accumulator) in padded.items():
            assert accumulator.token_count == sum(len(s) for s in sequences)
            torch.testing.assert_close(accumulator.sum, separate[key][1].sum, rtol=1e-5, atol=1e-6)

    def test_modules_reading_the_same_input_share_one_covariance(self, tiny_model, tiny_tokenizer):
        sequences = [tiny_tokenizer("What is 12 times 7?")["input_ids"]]
        groups = [names for names, _ in covariances(tiny_model, tiny_tokenizer, sequences).values()]
        assert len(groups) == 8
        assert [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj",
        ] in groups
        assert ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"] in groups
        assert ["model.layers.1.mlp.down_proj"] in groups

    def test_each_shared_input_is_hooked_once_per_batch(self, tiny_model, tiny_tokenizer):
        sequences = [tiny_tokenizer(t)["input_ids"] for t in ("one", "two", "three")]
        updates = []
        original = layer_input_covariances.__globals__["CovarianceAccumulator"].update

        def counting_update(self, inputs):
            updates.append(self.input_dim)
            original(self, inputs)

        layer_input_covariances.__globals__["CovarianceAccumulator"].update = counting_update
        try:
            covariances(tiny_model, tiny_tokenizer, sequences, CalibrationSettings(batch_size=1, sketch_dim=0))
        finally:
            layer_input_covariances.__globals__["CovarianceAccumulator"].update = original
        assert len(updates) == 8 * 3  # 8 shared inputs × 3 batches, not 14 modules × 3

    def test_several_passes_give_the_same_covariances(self, tiny_model, tiny_tokenizer):
        sequences = [tiny_tokenizer(t)["input_ids"] for t in ("one", "two", "three")]
        one_pass = covariances(tiny_model, tiny_tokenizer, sequences)
        chunked = covariances(tiny_model, tiny_tokenizer, sequences, replace(NO_COMPLETIONS, groups_per_pass=3))
        assert list(one_pass) == list(chunked)
        for key in one_pass:
            torch.testing.assert_close(one_pass[key][1].sum, chunked[key][1].sum, rtol=0, atol=0)

    def test_non_finite_activations_name_the_module(self, tiny_model, tiny_tokenizer):
        with torch.no_grad():
            tiny_model.model.layers[0].mlp.up_proj.weight.fill_(1e38)
        sequences = [tiny_tokenizer("What is 12 times 7?")["input_ids"]]
        with pytest.raises(NullSpaceError, match=r"input of model\.layers\.0\.mlp\.down_proj.*float32"):
            covariances(tiny_model, tiny_tokenizer, sequences)


class TestComputeProjectors:
    def test_deterministic_and_equal_with_or_without_an_adapter(self, tiny_model_dir, tiny_tokenizer):
        from transformers import AutoModelForCausalLM

        dataset = Dataset.from_dict({"prompt": CHAT_PROMPTS})
        settings = CalibrationSettings(completion_length=5, sketch_dim=8)
        plain = compute_projectors(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_tokenizer, dataset, settings
        )
        again = compute_projectors(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_tokenizer, dataset, settings
        )
        peft_model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules="all-linear")
        )
        for module in peft_model.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                torch.nn.init.normal_(module.lora_B["default"].weight)  # adapters must not leak into calibration
        adapted = compute_projectors(peft_model, tiny_tokenizer, dataset, settings)
        assert plain.model_fingerprint == again.model_fingerprint == adapted.model_fingerprint
        assert plain.calibration.data_fingerprint == adapted.calibration.data_fingerprint
        assert list(plain.groups) == list(adapted.groups)
        for key, group in plain.groups.items():
            torch.testing.assert_close(group.basis.basis, again.groups[key].basis.basis, rtol=0, atol=0)
            projection = group.basis.project_rows(torch.eye(group.basis.input_dim))
            adapted_projection = adapted.groups[key].basis.project_rows(torch.eye(group.basis.input_dim))
            torch.testing.assert_close(projection, adapted_projection, atol=1e-5, rtol=0)

    def test_adapters_off_passes_keep_every_requires_grad(self, tiny_model, tiny_tokenizer):
        # PEFT's `disable_adapter()` makes adapter weights trainable on exit; LoRA-FA's frozen A must stay frozen.
        peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules="all-linear"))
        for name, parameter in peft_model.named_parameters():
            if "lora_A" in name:
                parameter.requires_grad_(False)
        requires_grad = {name: p.requires_grad for name, p in peft_model.named_parameters()}
        dataset = Dataset.from_dict({"prompt": CHAT_PROMPTS})
        compute_projectors(
            peft_model, tiny_tokenizer, dataset, CalibrationSettings(completion_length=3), show_progress=False
        )
        assert {name: p.requires_grad for name, p in peft_model.named_parameters()} == requires_grad

    def test_null_dimension_follows_the_token_count(self, tiny_model, tiny_tokenizer):
        dataset = Dataset.from_dict({"text": ["What is 12 times 7? It is 84."]})
        settings = CalibrationSettings(generate_completions=False, sketch_dim=0)
        with pytest.warns(UserWarning, match="fewer tokens than the input size"):
            projectors = compute_projectors(tiny_model, tiny_tokenizer, dataset, settings, NullSpaceRule(alpha=1e-10))
        ids = tiny_tokenizer("What is 12 times 7? It is 84.")["input_ids"]
        tokens = len(ids)
        assert projectors.calibration.token_count == tokens
        null_dims = projectors.null_dims()
        # Layer 0's attention input is the token embedding alone, so a repeated token adds no direction.
        assert len(set(ids)) < tokens
        assert null_dims["model.layers.0.self_attn.q_proj"] == (64 - len(set(ids)), 64)
        assert null_dims["model.layers.1.self_attn.q_proj"] == (64 - tokens, 64)
        assert null_dims["model.layers.0.mlp.down_proj"] == (128 - tokens, 128)
        assert "model.layers.1.mlp.down_proj" in projectors.summary()


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
