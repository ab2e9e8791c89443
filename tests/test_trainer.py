"""End-to-end tests of NSPOTrainer on the tiny offline model: the null-space guarantee, and what is refused."""

import copy
import json
import logging
import shutil
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import CHAT_TEMPLATE, build_tiny_gpt2, build_tiny_model, build_tiny_tokenizer
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers.pytorch_utils import Conv1D
from trl import GRPOConfig, GRPOTrainer

from trl_nspo import (
    HubUnreachableError,
    NSPOConfig,
    NSPOTrainer,
    NullSpaceError,
    NullSpaceProjectors,
    ProjectorFileError,
)
from trl_nspo.calibration_data import CalibrationSettings
from trl_nspo.measurement import collect_layer_inputs, output_change
from trl_nspo.nspo_trainer import SMALL_KEPT_GRADIENT_FRACTION
from trl_nspo.targets import UnsupportedSetupError, find_constrained_modules

CALIBRATION = Dataset.from_dict(
    {
        "prompt": [
            [{"role": "user", "content": "What is 12 times 7?"}],
            [{"role": "user", "content": "Write a haiku about autumn."}],
        ]
    }
)
TRAIN = Dataset.from_dict({"prompt": [[{"role": "user", "content": "How can I make a weapon?"}]] * 16})
# Fewer calibration tokens than the tiny model's input sizes, and a threshold that keeps only the exact kernel:
# the "threshold floor" is then zero and the preservation error measures the method alone.
EXACT_KERNEL_ALPHA = 1e-10
# 200 distinct tokens: every input direction of the tiny model carries general energy (as on a real model).
SPANNING_CALIBRATION = Dataset.from_dict({"text": [" ".join(f"w{i}" for i in range(200))]})


def length_reward(completions, **kwargs):
    return [len(completion[0]["content"]) / 10.0 for completion in completions]


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        calibration_completion_length=8,
        # The exact kernel (eigenvalues at float rounding) rather than the default heldout rule's small-but-non-zero
        # directions: these tests measure the guarantee, which holds to rounding only on the exact kernel.
        null_space_rule="relative",
        null_space_alpha=EXACT_KERNEL_ALPHA,
    )
    values.update(overrides)
    return values


def lora(**overrides):
    return LoraConfig(**{"r": 4, "target_modules": "all-linear", **overrides})


def build_nspo(
    model, tmp_path, peft_config=None, calibration=CALIBRATION, processing_class=None, **overrides
) -> NSPOTrainer:
    """NSPOTrainer on TRAIN with the length reward and the tests' settings (`config`), `overrides` applied."""
    if isinstance(model, Path):
        model = str(model)
    args = NSPOConfig(**config(tmp_path, **overrides))
    return NSPOTrainer(
        model,
        length_reward,
        args,
        train_dataset=TRAIN,
        calibration_dataset=calibration,
        peft_config=peft_config,
        processing_class=processing_class,
    )


def output_change_on_calibration_inputs(trainer) -> float:
    """‖ΔW·K‖ / ‖W·K‖ over every constrained layer, K = all calibration tokens (exact, from K·Kᵀ, in float64); full
    fine-tuning reads W₀ from `trainer.initial_weights`, which the test sets before training."""
    settings = CalibrationSettings(completion_length=8, sketch_dim=0)
    target_modules = getattr(trainer.args, "nspo_target_modules", None)
    inputs = collect_layer_inputs(trainer.model, trainer.processing_class, CALIBRATION, settings, target_modules)
    return output_change(trainer.model, inputs, getattr(trainer, "initial_weights", None)).pooled


def lora_a_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_A" in name}


@pytest.mark.slow
class TestPreservation:
    def test_nspo_preserves_outputs_where_grpo_does_not(self, tiny_model_dir, tmp_path):
        nspo = build_nspo(tiny_model_dir, tmp_path, peft_config=lora())
        start = lora_a_weights(nspo.model)
        nspo.train()
        nspo_change = output_change_on_calibration_inputs(nspo)

        grpo = GRPOTrainer(
            str(tiny_model_dir),
            length_reward,
            GRPOConfig(**{k: v for k, v in config(tmp_path).items() if not k.startswith(("calibration", "null"))}),
            train_dataset=TRAIN,
            peft_config=lora(),
        )
        grpo.train()
        grpo_change = output_change_on_calibration_inputs(grpo)

        assert nspo_change <= 1e-6
        assert grpo_change >= 1e-3
        # Training still moved the adapter: B left zero, and A changed beyond the start-up projection.
        moved_b = [p.abs().max().item() for n, p in nspo.model.named_parameters() if "lora_B" in n]
        assert min(moved_b) > 0
        end = lora_a_weights(nspo.model)
        assert min((end[name] - start[name]).abs().max().item() for name in start) > 0
        logged = {key for entry in nspo.state.log_history for key in entry}
        assert {
            "nspo/kept_gradient_fraction",
            "nspo/optimizer_drift",
            "nspo/preservation_error",
            "nspo/null_dim_min",
            "nspo/calibration_null_energy",
            "nspo/heldout_null_energy",
        } <= logged
        preservation = [e["nspo/preservation_error"] for e in nspo.state.log_history if "loss" in e]
        assert max(preservation) <= 1e-5

    def test_gradient_accumulation_keeps_the_guarantee(self, tiny_model_dir, tmp_path):
        trainer = build_nspo(
            tiny_model_dir, tmp_path, peft_config=lora(), per_device_train_batch_size=2, gradient_accumulation_steps=2
        )
        trainer.train()
        assert trainer.state.global_step == 4
        assert output_change_on_calibration_inputs(trainer) <= 1e-6

    def test_gradient_projection_alone_leaks_under_adam(self, tiny_model_dir, tmp_path):
        trainer = build_nspo(
            tiny_model_dir, tmp_path, peft_config=lora(init_lora_weights="gaussian"), gradient_projection_only=True
        )
        trainer.train()
        assert output_change_on_calibration_inputs(trainer) > 1e-4

    @pytest.mark.parametrize("gradient_projection_only", [False, True])
    def test_every_generation_samples_from_projected_adapters(
        self, tiny_model_dir, tmp_path, gradient_projection_only
    ):
        # With `use_vllm`, TRL merges the adapter into the weights it sends to vLLM at the first generation of each
        # step (`_generate_single_turn` → `sync_weights`): the adapter must already be back in its null space there.
        trainer = build_nspo(
            tiny_model_dir,
            tmp_path,
            peft_config=lora(init_lora_weights="gaussian"),
            gradient_projection_only=gradient_projection_only,
        )
        drift_at_generation = []
        generate = trainer._generate_single_turn

        def generate_and_record(*args, **kwargs):
            drift_at_generation.append(trainer.constraint.drift())
            return generate(*args, **kwargs)

        trainer._generate_single_turn = generate_and_record
        trainer.train()
        assert len(drift_at_generation) == 4
        if gradient_projection_only:  # the control: nothing re-projects A, so generation sees it off the null space
            assert min(drift_at_generation) > 1e-2
        else:
            assert max(drift_at_generation) <= 1e-6

    def test_full_fine_tuning_keeps_constrained_layers_outputs(self, tiny_model_dir, tmp_path):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(".mlp." in name)
        targets = ["gate_proj", "up_proj", "down_proj"]
        trainer = NSPOTrainer(
            model,
            length_reward,
            NSPOConfig(**config(tmp_path, nspo_target_modules=targets, learning_rate=1e-3)),
            train_dataset=TRAIN,
            calibration_dataset=CALIBRATION,
        )
        trainer.initial_weights = {
            name: module.weight.detach().double().clone()
            for name, module in find_constrained_modules(model, targets).items()
        }
        trainer.train()
        assert output_change_on_calibration_inputs(trainer) <= 1e-6
        moved = max(
            (m.weight.double() - trainer.initial_weights[n]).abs().max().item()
            for n, m in find_constrained_modules(model, targets).items()
        )
        assert moved > 1e-5

    def test_full_fine_tuning_of_gpt2_conv1d_layers(self, tmp_path):
        # Before: refused with "No linear layer to constrain was found".
        tokenizer = build_tiny_tokenizer()
        changes = {}
        for trainer_class in (NSPOTrainer, GRPOTrainer):
            model = build_tiny_gpt2(tokenizer)
            conv1d = {name for name, module in model.named_modules() if isinstance(module, Conv1D)}
            assert len(conv1d) == 8
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(name.removesuffix(".weight") in conv1d)
            values = config(tmp_path / trainer_class.__name__, learning_rate=1e-3)
            if trainer_class is NSPOTrainer:
                args, extra = NSPOConfig(**values), {"calibration_dataset": CALIBRATION}
            else:
                values = {k: v for k, v in values.items() if not k.startswith(("calibration", "null"))}
                args, extra = GRPOConfig(**values), {}
            trainer = trainer_class(
                model, length_reward, args, train_dataset=TRAIN, processing_class=tokenizer, **extra
            )
            trainer.initial_weights = {
                name: module.weight.detach().double().clone()
                for name, module in find_constrained_modules(model).items()
            }
            trainer.train()
            changes[trainer_class] = output_change_on_calibration_inputs(trainer)
            if trainer_class is NSPOTrainer:
                assert len(trainer.constraint.weights) == 8
                logged = [e["nspo/preservation_error"] for e in trainer.state.log_history if "loss" in e]
        assert changes[NSPOTrainer] <= 1e-6
        assert changes[GRPOTrainer] >= 1e-3
        assert max(logged) <= 1e-5  # the logged metric reads the transposed weight the right way round


@pytest.mark.slow
class TestLogging:
    @pytest.mark.parametrize(
        "calibration, rule, warned",
        [
            # 200 distinct tokens span the tiny model's inputs, and 2 null dimensions of 64 or 128 keep little of
            # the gradient.
            (SPANNING_CALIBRATION, {"null_space_rule": "energy", "null_space_max_dim": 2}, True),
            # Fewer calibration tokens than input dimensions: a large exact kernel keeps most of it.
            (CALIBRATION, {}, False),
        ],
    )
    def test_a_null_space_that_keeps_little_of_the_gradient_is_warned_about_once(
        self, tiny_model_dir, tmp_path, caplog, calibration, rule, warned
    ):
        trainer = build_nspo(
            tiny_model_dir,
            tmp_path,
            peft_config=lora(r=2),
            calibration=calibration,
            calibration_max_length=200,
            **rule,
        )
        with caplog.at_level(logging.WARNING, logger="trl_nspo.nspo_trainer"):
            trainer.train()
        kept = [
            e["nspo/kept_gradient_fraction"] for e in trainer.state.log_history if "nspo/kept_gradient_fraction" in e
        ]
        first = next(fraction for fraction in kept if fraction > 0)
        warnings_given = [r.getMessage() for r in caplog.records if "of the gradient of the constrained" in r.message]
        assert (first < SMALL_KEPT_GRADIENT_FRACTION) == warned
        if warned:
            assert len(warnings_given) == 1
            assert warnings_given[0].startswith(f"Only {100 * first:.0f}% of the gradient")
            assert "raise `learning_rate`" in warnings_given[0]
        else:
            assert warnings_given == []

    def test_last_steps_metrics_are_logged_when_the_run_ends_in_eval_mode(self, tiny_model_dir, tmp_path):
        # Step 3 is not a logging step, so its metrics go to the summary log, which fires after the evaluation at the
        # last step has left the model in eval mode.
        args = NSPOConfig(
            **config(
                tmp_path,
                max_steps=3,
                logging_steps=2,
                eval_strategy="steps",
                eval_steps=2,
                per_device_eval_batch_size=4,
            )
        )
        trainer = NSPOTrainer(
            str(tiny_model_dir),
            length_reward,
            args,
            train_dataset=TRAIN,
            eval_dataset=TRAIN.select(range(4)),
            calibration_dataset=CALIBRATION,
            peft_config=lora(),
        )
        trainer.train()
        summary = trainer.state.log_history[-1]
        assert "train_runtime" in summary
        assert not trainer.model.training
        assert {"nspo/kept_gradient_fraction", "nspo/preservation_error", "reward"} <= set(summary)
        assert summary["nspo/preservation_error"] <= 1e-5


class TestProjectorFiles:
    def test_projectors_are_saved_then_loaded_without_calibration_data(self, tiny_model_dir, tmp_path):
        path = tmp_path / "projectors"
        first = build_nspo(tiny_model_dir, tmp_path, peft_config=lora(), projectors_path=str(path))
        assert (path / "nspo_projectors.safetensors").is_file()
        second = build_nspo(tiny_model_dir, tmp_path, peft_config=lora(), calibration=None, projectors_path=str(path))
        assert second.projectors.metadata() == first.projectors.metadata()
        second.save_model(str(tmp_path / "final"))
        saved = NullSpaceProjectors.load(tmp_path / "final")
        assert saved.metadata() == first.projectors.metadata()
        assert (tmp_path / "final" / "adapter_model.safetensors").is_file()

    def test_unchanged_setup_reuses_the_file_without_recalibrating(self, tiny_model_dir, tmp_path):
        path = str(tmp_path / "p")
        first = build_nspo(tiny_model_dir, tmp_path, peft_config=lora(), projectors_path=path)
        recalibration = AssertionError("recalibrated although the file matches")
        with mock.patch("trl_nspo.nspo_trainer.compute_projectors", side_effect=recalibration):
            second = build_nspo(tiny_model_dir, tmp_path, peft_config=lora(), projectors_path=path)
        assert second.projectors.same_bases(first.projectors)

    def test_changed_chat_template_is_refused(self, tiny_model_dir, tmp_path):
        # The calibration prompts are chat messages: another template feeds the layers other tokens.
        path = str(tmp_path / "p")
        build_nspo(tiny_model_dir, tmp_path, peft_config=lora(), projectors_path=path)
        tokenizer = build_tiny_tokenizer()
        tokenizer.chat_template = CHAT_TEMPLATE.replace("<|end|>", "\n<|end|>")
        with pytest.raises(
            ProjectorFileError,
            match=r"other calibration data.*tokenizer chat template \(fingerprint\): .[0-9a-f]{16}. in the "
            r"file, '[0-9a-f]{16}' in this run; calibration prompt tokens",
        ):
            NSPOTrainer(
                str(tiny_model_dir),
                length_reward,
                NSPOConfig(**config(tmp_path, projectors_path=path)),
                train_dataset=TRAIN,
                calibration_dataset=CALIBRATION,
                processing_class=tokenizer,
                peft_config=lora(),
            )

    def test_changed_config_is_refused(self, tiny_model_dir, tmp_path):
        path = str(tmp_path / "p")
        build_nspo(tiny_model_dir, tmp_path, peft_config=lora(), projectors_path=path)
        other_dir = shutil.copytree(tiny_model_dir, tmp_path / "rope")
        model_config = json.loads((other_dir / "config.json").read_text())
        model_config["rope_parameters"]["rope_theta"] = 500000.0
        (other_dir / "config.json").write_text(json.dumps(model_config))
        with pytest.raises(
            ProjectorFileError,
            match=r"different model: config `rope_parameters`: \{.*'rope_theta': 10000\.0.*\} in the file, "
            r"\{.*'rope_theta': 500000\.0.*\} in this run; weights of .*rotary_emb\.inv_freq",
        ):
            build_nspo(other_dir, tmp_path, peft_config=lora(), calibration=None, projectors_path=path)

    @pytest.mark.parametrize("weight", ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"])
    def test_changed_weight_outside_the_constrained_layers_is_refused(self, tiny_model_dir, tmp_path, weight):
        # Only q_proj is constrained; the embedding and the norm change its inputs all the same.
        path = str(tmp_path / "p")
        build_nspo(tiny_model_dir, tmp_path, peft_config=lora(target_modules=["q_proj"]), projectors_path=path)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        with torch.no_grad():
            model.get_parameter(weight)[0] += 0.5
        with pytest.raises(ProjectorFileError, match=rf"different model: weights of {weight.replace('.', '[.]')}\."):
            NSPOTrainer(
                model,
                length_reward,
                NSPOConfig(**config(tmp_path, projectors_path=path)),
                train_dataset=TRAIN,
                calibration_dataset=CALIBRATION,
                processing_class=build_tiny_tokenizer(),
                peft_config=lora(target_modules=["q_proj"]),
            )

    def test_settings_mismatch_names_the_field_and_both_values(self, tiny_model_dir, tmp_path):
        path = str(tmp_path / "p")
        build_nspo(tiny_model_dir, tmp_path, peft_config=lora(), projectors_path=path)
        with pytest.raises(
            ProjectorFileError, match=r"calibration_completion_length: 8 in the file, 16 in this run\. Delete the file"
        ):
            build_nspo(
                tiny_model_dir, tmp_path, peft_config=lora(), projectors_path=path, calibration_completion_length=16
            )
        # Without calibration data, the file is used as it was made.
        trainer = build_nspo(
            tiny_model_dir,
            tmp_path,
            peft_config=lora(),
            calibration=None,
            projectors_path=path,
            calibration_completion_length=16,
        )
        assert trainer.projectors.calibration.completion_length == 8

    def test_rule_setting_the_rule_does_not_use_is_not_compared(self, tiny_model_dir, tmp_path):
        path = str(tmp_path / "p")
        build_nspo(tiny_model_dir, tmp_path, peft_config=lora(), projectors_path=path)
        build_nspo(tiny_model_dir, tmp_path, peft_config=lora(), projectors_path=path, null_space_energy=0.5)

    def test_projectors_of_another_model_are_refused(self, tiny_model_dir, tmp_path):
        other = build_tiny_model(build_tiny_tokenizer(), seed=1)
        NSPOTrainer(
            other,
            length_reward,
            NSPOConfig(**config(tmp_path, projectors_path=str(tmp_path / "p"))),
            train_dataset=TRAIN,
            calibration_dataset=CALIBRATION,
            processing_class=build_tiny_tokenizer(),
            peft_config=lora(),
        )
        with pytest.raises(
            ProjectorFileError, match=r"different model: weights of lm_head\.weight, model\.embed_tokens\.weight"
        ):
            build_nspo(
                tiny_model_dir, tmp_path, peft_config=lora(), calibration=None, projectors_path=str(tmp_path / "p")
            )

    def test_projectors_for_other_modules_are_refused(self, tiny_model_dir, tmp_path):
        build_nspo(
            tiny_model_dir, tmp_path, peft_config=lora(target_modules=["q_proj"]), projectors_path=str(tmp_path / "p")
        )
        with pytest.raises(ProjectorFileError, match=r"Missing: model\.layers\.0\.self_attn\.k_proj"):
            build_nspo(
                tiny_model_dir, tmp_path, peft_config=lora(), calibration=None, projectors_path=str(tmp_path / "p")
            )

    def test_projectors_for_all_layers_serve_an_adapter_on_some(self, tiny_model_dir, tmp_path):
        everything = build_nspo(tiny_model_dir, tmp_path, peft_config=lora(), projectors_path=str(tmp_path / "p"))
        queries_only = build_nspo(
            tiny_model_dir,
            tmp_path,
            peft_config=lora(target_modules=["q_proj"]),
            calibration=None,
            projectors_path=str(tmp_path / "p"),
        )
        assert list(queries_only.projectors.null_dims()) == [
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.self_attn.q_proj",
        ]
        assert queries_only.projectors.same_bases(
            everything.projectors.restricted_to(list(queries_only.projectors.null_dims()))
        )


class TestConstraintWiring:
    def test_training_binds_the_constraint_to_the_model_accelerate_prepared(self, tiny_model_dir, tmp_path):
        trainer = build_nspo(tiny_model_dir, tmp_path, peft_config=lora())
        assert trainer.constraint.drift() <= 1e-6  # bound and projected in __init__, readable before training
        # As `accelerator.prepare` may return it: a wrapper around new parameter objects (FSDP2 replaces them).
        prepared = torch.nn.Module()
        prepared.module = copy.deepcopy(trainer.model)
        trainer.model_wrapped = prepared
        trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)
        prepared_parameters = {id(p) for p in prepared.parameters()}
        assert all(id(entry.parameter) in prepared_parameters for entry in trainer.constraint.weights)


class TestRefusals:
    @pytest.mark.parametrize(
        "overrides, message",
        [
            ({"use_dora": True}, "DoRA"),
            ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
            ({"bias": "all"}, "Trainable biases"),
            ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ],
    )
    def test_adapters_that_escape_the_projection(self, tiny_model_dir, tmp_path, overrides, message):
        with pytest.raises(UnsupportedSetupError, match=message):
            build_nspo(tiny_model_dir, tmp_path, peft_config=lora(**overrides))

    @pytest.mark.parametrize(
        "overrides, message",
        [({"init_lora_weights": "pissa"}, "rewrites the base weights"), ({"use_dora": True}, "DoRA")],
    )
    def test_every_adapter_of_a_peft_model_is_checked(self, tiny_model, tmp_path, overrides, message):
        # Before: only an adapter named "default" was checked; PiSSA as "safety" changed logits by 0.52 at start-up.
        model = get_peft_model(tiny_model, lora(**overrides), adapter_name="safety")
        with pytest.raises(UnsupportedSetupError, match=f"Adapter 'safety': .*{message}"):
            build_nspo(model, tmp_path, processing_class=build_tiny_tokenizer())

    def test_an_already_trained_adapter_is_refused(self, tiny_model, tmp_path):
        # Before: its A was projected at start-up, changing the logits on a calibration prompt by 1.16, silently.
        model = get_peft_model(tiny_model, lora())
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)
        with pytest.raises(UnsupportedSetupError, match=r"LoRA B weights are not zero.*merge_and_unload\(\)"):
            build_nspo(model, tmp_path, processing_class=build_tiny_tokenizer())

    def test_a_fresh_peft_model_keeps_the_parameters_it_froze(self, tiny_model, tmp_path):
        # LoRA-FA: A frozen at its (projected) init, B trained. Before: calibration's adapters-off pass unfroze all A.
        model = get_peft_model(tiny_model, lora())
        for name, parameter in model.named_parameters():
            if "lora_A" in name:
                parameter.requires_grad_(False)
        requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}

        def current():  # with beta > 0, TRL adds a frozen copy of the adapter, named "ref", for the reference model
            return {name: p.requires_grad for name, p in trainer.model.named_parameters() if name in requires_grad}

        trainer = build_nspo(model, tmp_path, processing_class=build_tiny_tokenizer(), beta=0.04, max_steps=1)
        assert current() == requires_grad
        assert trainer.constraint.drift() <= 1e-6
        trainer.train()  # TRL's reference pass (beta > 0) switches the adapters off and on: before, it unfroze all A
        assert current() == requires_grad

    def test_modules_to_save_can_be_accepted_with_a_warning(self, tiny_model_dir, tmp_path):
        with pytest.warns(UserWarning, match="modules_to_save"):
            trainer = build_nspo(
                tiny_model_dir,
                tmp_path,
                peft_config=lora(target_modules=["q_proj"], modules_to_save=["lm_head"]),
                allow_unconstrained_parameters=True,
            )
        assert any("lm_head" in name for name in trainer.constraint.unconstrained_trainable_parameters(trainer.model))

    def test_full_fine_tuning_with_free_parameters_is_refused_with_the_code_that_fixes_it(self, tiny_model, tmp_path):
        with pytest.raises(UnsupportedSetupError, match=r"outside the null-space constraint.*embed_tokens") as error:
            build_nspo(tiny_model, tmp_path, processing_class=build_tiny_tokenizer())
        code = (
            "for name, parameter in model.named_parameters():\n"
            "    if name.endswith(('embed_tokens.weight', 'norm.weight', 'lm_head.weight')):\n"
            "        parameter.requires_grad_(False)"
        )
        assert textwrap.indent(code, "    ") in str(error.value)
        assert "allow_unconstrained_parameters=True" in str(error.value)
        exec(code, {"model": tiny_model})
        trainer = build_nspo(tiny_model, tmp_path, processing_class=build_tiny_tokenizer())
        assert len(trainer.constraint.weights) == 14

    def test_heldout_null_energy_is_measured_on_folds_and_a_large_one_is_warned_about(self, tiny_model_dir, tmp_path):
        energy_rule = dict(peft_config=lora(r=1), null_space_rule="energy", null_space_energy=0.05)
        # Two calibration prompts for 64-dimensional inputs: what looks null in one is not in the other.
        with pytest.warns(UserWarning, match=r"hold .* of the energy of calibration data they were not computed from"):
            trainer = build_nspo(tiny_model_dir, tmp_path, **energy_rule)
        logs = trainer._nspo_start_logs
        assert logs["nspo/calibration_null_energy"] <= 0.05
        assert logs["nspo/heldout_null_energy"] > 2 * 0.05
        recorded = NullSpaceProjectors.load(trainer.projectors_file)
        assert {key: group.heldout_share for key, group in recorded.groups.items()} == {
            key: group.heldout_share for key, group in trainer.projectors.groups.items()
        }
        # One fold: nothing is held out, so nothing is logged or warned about.
        trainer = build_nspo(tiny_model_dir, tmp_path / "one", calibration_folds=1, **energy_rule)
        assert "nspo/heldout_null_energy" not in trainer._nspo_start_logs
        assert "nspo/calibration_null_energy" in trainer._nspo_start_logs

    def test_task_rule_reads_the_training_prompts_and_a_file_is_checked_against_them(self, tiny_model_dir, tmp_path):
        task_rule = dict(peft_config=lora(r=1), null_space_rule="task", null_space_energy=0.5)
        trainer = build_nspo(tiny_model_dir, tmp_path, **task_rule)
        assert trainer.projectors.calibration.task_rows_fingerprint is not None
        assert all(group.heldout_share <= 0.5 for group in trainer.projectors.groups.values())
        other_training = Dataset.from_dict({"prompt": [[{"role": "user", "content": "Write a haiku."}]] * 16})
        with pytest.raises(ProjectorFileError, match="training dataset rows"):
            NSPOTrainer(
                str(tiny_model_dir),
                length_reward,
                NSPOConfig(**config(tmp_path, null_space_rule="task", null_space_energy=0.5)),
                train_dataset=other_training,
                calibration_dataset=CALIBRATION,
                peft_config=lora(r=1),
            )

    def test_rank_above_null_dimension_warns_and_trains_within_the_null_space(self, tiny_model_dir, tmp_path):
        rank_warning = r"LoRA rank exceeds the null dimension.*q_proj \(null dim \d+ < rank 32\)"
        with pytest.warns(UserWarning, match=rank_warning):
            trainer = build_nspo(tiny_model_dir, tmp_path, peft_config=lora(r=32), max_steps=2)
        assert (tmp_path / "out" / "nspo_projectors.safetensors").is_file()
        trainer.train()
        assert output_change_on_calibration_inputs(trainer) <= 1e-6

    def test_empty_null_space_is_refused(self, tiny_model_dir, tmp_path):
        calibration = Dataset.from_dict({"text": [" ".join(f"w{i}" for i in range(200))]})
        with pytest.raises(NullSpaceError, match="null space of .* empty"):
            build_nspo(
                tiny_model_dir,
                tmp_path,
                peft_config=lora(),
                calibration=calibration,
                null_space_alpha=1e-12,
                calibration_max_length=200,
            )

    def test_default_rule_leaves_room_where_the_original_rule_leaves_none(self, tiny_model_dir, tmp_path):
        # 200 distinct tokens: every input direction of the tiny model carries general energy, so a relative rule
        # empties the null spaces, as the original code's α = 5e-5 did on 23 of SmolLM2-135M's 120 layer inputs.
        calibration = Dataset.from_dict(
            {"text": [" ".join(f"w{i}" for i in range(start, 200, 4)) for start in range(4)]}
        )
        spanning = dict(calibration=calibration, calibration_max_length=200, peft_config=lora(r=1))
        with pytest.raises(NullSpaceError, match="null space of .* empty"):
            build_nspo(tiny_model_dir, tmp_path, null_space_alpha=EXACT_KERNEL_ALPHA, **spanning)
        defaults = NSPOConfig(output_dir=str(tmp_path / "defaults"), use_cpu=True, bf16=False)
        rule_settings = {name: getattr(defaults, name) for name in vars(defaults) if name.startswith("null_space_")}
        assert rule_settings == {
            "null_space_rule": "heldout",
            "null_space_alpha": 5e-5,
            "null_space_energy": 1e-3,
            "null_space_max_dim": 128,
        }
        assert defaults.calibration_folds == 2
        trainer = build_nspo(tiny_model_dir, tmp_path / "default-rule", **spanning, **rule_settings)
        null_dims = [null_dim for null_dim, _ in trainer.projectors.null_dims().values()]
        assert min(null_dims) >= 1
        # The default's budget holds on the calibration rows each null space was not computed from.
        assert trainer._nspo_start_logs["nspo/heldout_null_energy"] <= 1e-3

    def test_refused_run_leaves_no_file_so_the_advised_change_works(self, tiny_model_dir, tmp_path):
        calibration = Dataset.from_dict({"text": [" ".join(f"w{i}" for i in range(200))]})
        empty = dict(calibration=calibration, null_space_alpha=1e-12, calibration_max_length=200)
        with pytest.raises(NullSpaceError, match=r"null space of .* empty.*`null_space_energy` \(heldout, energy"):
            build_nspo(tiny_model_dir, tmp_path, peft_config=lora(r=1), **empty)
        assert not (tmp_path / "out" / "nspo_projectors.safetensors").exists()
        # The error's advice: the energy rule.
        advised = {**empty, "null_space_rule": "energy", "null_space_energy": 0.05}
        trainer = build_nspo(tiny_model_dir, tmp_path, peft_config=lora(r=1), **advised)
        assert trainer.projectors.rule.rule == "energy"
        assert (tmp_path / "out" / "nspo_projectors.safetensors").is_file()

    def test_grpo_config_is_refused(self, tiny_model_dir, tmp_path):
        with pytest.raises(TypeError, match="Replace GRPOConfig by NSPOConfig"):
            NSPOTrainer(
                str(tiny_model_dir), length_reward, GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
            )

    def test_missing_calibration_data_is_refused(self, tiny_model_dir, tmp_path):
        with pytest.raises(ValueError, match="pass `calibration_dataset=`"):
            NSPOTrainer(str(tiny_model_dir), length_reward, NSPOConfig(**config(tmp_path)), train_dataset=TRAIN)

    def test_deepspeed_is_refused_before_loading_anything(self, tiny_model_dir, tmp_path, monkeypatch):
        args = NSPOConfig(**config(tmp_path))
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        with pytest.raises(UnsupportedSetupError, match="does not support DeepSpeed: .*master copy.*Use FSDP2"):
            NSPOTrainer("/does/not/exist", length_reward, args, train_dataset=TRAIN, calibration_dataset=CALIBRATION)

    @pytest.mark.parametrize(
        "overrides, message",
        [
            ({"null_space_alpha": 2.0}, "alpha must be in"),
            ({"null_space_rule": "svd"}, "Unknown null-space rule"),
            ({"calibration_batch_size": 0}, "calibration_batch_size|batch_size"),
        ],
    )
    def test_bad_settings_fail_at_construction(self, tmp_path, overrides, message):
        with pytest.raises(ValueError, match=message):
            NSPOConfig(**config(tmp_path, **overrides))


def _hub_connection_errors() -> list[Exception]:
    """The errors `create_repo` raises without a network, for each HTTP client huggingface_hub may use."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[Exception] = [OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")]
    for client in ("httpx2", "httpx"):
        try:
            errors.append(__import__(client).ConnectError("[Errno -2] Name or service not known"))
        except ImportError:
            pass
    try:
        from requests.exceptions import ConnectionError as RequestsConnectionError

        errors.append(RequestsConnectionError("Max retries exceeded with url: /api/repos/create"))
    except ImportError:
        pass
    return errors


@pytest.mark.parametrize("error", _hub_connection_errors(), ids=lambda error: type(error).__module__)
def test_unreachable_hub_at_construction_says_how_to_push_later(tiny_model_dir, tmp_path, error):
    api = mock.Mock()
    api.create_repo.side_effect = error
    with (
        mock.patch("transformers.trainer.hf_api", return_value=api),
        mock.patch("trl_nspo.nspo_trainer.compute_projectors") as calibration,
        pytest.raises(HubUnreachableError) as error_info,
    ):
        build_nspo(tiny_model_dir, tmp_path, lora(), push_to_hub=True, hub_model_id="someone/tiny-nspo")
    message = str(error_info.value)
    assert "Hugging Face Hub is unreachable" in message and "Nothing has been trained yet" in message
    assert "push_to_hub=False" in message and "trainer.push_to_hub()" in message
    assert f"hf upload someone/tiny-nspo {tmp_path / 'out'}` (the saved output folder)" in message
    assert error_info.value.__cause__ is error
    calibration.assert_not_called()


def test_unreachable_hub_after_training_says_nothing_was_pushed(tiny_model_dir, tmp_path):
    trainer = build_nspo(tiny_model_dir, tmp_path, lora(), hub_model_id="someone/tiny-nspo")
    trainer.state.global_step = 1  # as after `train()`
    api = mock.Mock()
    api.create_repo.side_effect = ConnectionError("Cannot reach https://huggingface.co")
    with (
        mock.patch("transformers.trainer.hf_api", return_value=api),
        pytest.raises(HubUnreachableError, match=r"Nothing was pushed\. Save the model"),
    ):
        trainer.push_to_hub()
