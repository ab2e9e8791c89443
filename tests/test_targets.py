"""Which modules are constrained, and what is read from PEFT: matching, wrappers, adapter settings and switching."""

import pytest
import torch
from conftest import build_tiny_gpt2
from peft import LoHaConfig, LoraConfig, get_peft_model

from trl_nspo.null_space import NullSpaceError
from trl_nspo.targets import (
    UnsupportedSetupError,
    adapter_tensor_ids,
    adapters_disabled,
    base_linear,
    base_tensor_name,
    canonical_module_name,
    check_peft_config,
    check_peft_model,
    constrained_input_dim,
    find_constrained_modules,
    lora_adapters,
    lora_factors,
    modules_by_canonical_name,
    recorded_base_model,
)


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

    def test_wrapped_models_list_their_modules_under_the_plain_models_names(self, tiny_model):
        peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"]))
        wrapped = torch.nn.Module()
        wrapped.module = peft_model  # as DDP holds it
        names = modules_by_canonical_name(wrapped)
        assert names["model.layers.0.self_attn.q_proj"] is peft_model.base_model.model.model.layers[0].self_attn.q_proj

    def test_input_sizes_of_lora_linear_and_conv1d_layers(self, tiny_model, tiny_tokenizer):
        peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["down_proj"]))
        assert {constrained_input_dim(m) for m in find_constrained_modules(peft_model).values()} == {128}
        gpt2 = find_constrained_modules(build_tiny_gpt2(tiny_tokenizer))
        assert constrained_input_dim(gpt2["transformer.h.0.mlp.c_proj"]) == 128


class TestPeftInternals:
    def test_lora_factors_of_every_active_adapter(self, tiny_model):
        peft_model = get_peft_model(tiny_model, LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"]))
        module = find_constrained_modules(peft_model)["model.layers.0.self_attn.q_proj"]
        assert lora_adapters(module) == ["default"]
        lora_a, lora_b, scaling = lora_factors(module, "default")
        assert lora_a.shape == (2, 64) and lora_b.shape[1] == 2 and scaling == 4.0
        assert isinstance(base_linear(module), torch.nn.Linear)
        assert base_linear(base_linear(module)) is base_linear(module)  # a plain layer is its own base

    def test_adapter_tensors_are_told_apart_from_base_tensors(self, tiny_model):
        plain_names = {name for name, _ in tiny_model.named_parameters()}
        peft_model = get_peft_model(
            tiny_model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
        )
        adapters = adapter_tensor_ids(peft_model)
        names = {name for name, p in peft_model.named_parameters() if id(p) in adapters}
        assert names and all("lora_" in name or "modules_to_save" in name for name in names)
        base = {base_tensor_name(name) for name, p in peft_model.named_parameters() if id(p) not in adapters}
        assert base == plain_names

    def test_base_model_recorded_by_the_adapter(self, tiny_model):
        assert recorded_base_model(tiny_model) is None
        peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"]))
        peft_model.active_peft_config.base_model_name_or_path = "org/tiny"
        assert recorded_base_model(peft_model) == "org/tiny"

    def test_adapters_disabled_runs_the_base_model_and_keeps_frozen_adapters_frozen(self, tiny_model):
        input_ids = torch.tensor([[5, 6, 7]])
        with adapters_disabled(tiny_model):  # a plain model runs as it is
            base_logits = tiny_model(input_ids=input_ids).logits.detach()
        peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        for name, parameter in peft_model.named_parameters():
            if "lora_A" in name:
                parameter.requires_grad_(False)
        before = {name: p.requires_grad for name, p in peft_model.named_parameters()}
        with adapters_disabled(peft_model):
            assert torch.equal(peft_model(input_ids=input_ids).logits, base_logits)
        assert not torch.equal(peft_model(input_ids=input_ids).logits, base_logits)
        assert {name: p.requires_grad for name, p in peft_model.named_parameters()} == before


class TestAdapterSettings:
    @pytest.mark.parametrize(
        "config, message",
        [
            (LoHaConfig(target_modules=["q_proj"]), "LoHaConfig is not supported"),
            (LoraConfig(target_modules=["q_proj"], lora_bias=True), "Trainable biases"),
            (LoraConfig(target_parameters=["mlp.experts.gate_up_proj"]), "target_parameters"),
        ],
    )
    def test_settings_that_escape_the_projection_are_refused(self, config, message):
        with pytest.raises(UnsupportedSetupError, match=message):
            check_peft_config(config)

    def test_full_fine_tuning_and_a_plain_lora_pass(self):
        assert check_peft_config(None) == []
        assert check_peft_config(LoraConfig(target_modules=["q_proj"], init_lora_weights="gaussian")) == []

    def test_modules_to_save_become_a_warning_when_accepted(self):
        config = LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])
        with pytest.raises(UnsupportedSetupError, match="allow_unconstrained_parameters=True"):
            check_peft_config(config)
        (warning,) = check_peft_config(config, allow_unconstrained_parameters=True)
        assert "modules_to_save=['lm_head']" in warning

    def test_only_peft_models_are_checked(self, tiny_model):
        assert check_peft_model(tiny_model) == [] and check_peft_model("some/hub-id") == []
