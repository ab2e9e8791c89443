from dataclasses import replace

import pytest
import torch
from conftest import build_tiny_gpt2
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from test_calibration_data import CHAT_PROMPTS, NO_COMPLETIONS

from trl_nspo.calibration import (
    canonical_module_name,
    compute_projectors,
    find_constrained_modules,
    layer_input_covariances,
)
from trl_nspo.calibration_data import CalibrationSettings
from trl_nspo.null_space import NullSpaceError, NullSpaceRule


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
