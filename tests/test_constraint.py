"""The null-space constraint on its own, on the tiny model: both strategies (LoRA, full fine-tuning), late binding to
a prepared model, and the engine policy."""

import copy
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import build_tiny_gpt2
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

from trl_nspo.calibration import compute_projectors
from trl_nspo.calibration_data import CalibrationSettings
from trl_nspo.constraint import PROJECTED_DRIFT_TOLERANCE, NullSpaceConstraint, check_training_engine
from trl_nspo.null_space import NullSpaceError, NullSpaceRule
from trl_nspo.targets import UnsupportedSetupError, lora_factors, modules_by_canonical_name

# Fewer calibration tokens than the tiny model's input sizes, and the exact kernel: K·Kᵀ has a null space everywhere.
CALIBRATION = Dataset.from_dict({"text": ["How do I bake bread at home?", "What is 12 times 7? It is 84."]})
SETTINGS = CalibrationSettings(generate_completions=False, sketch_dim=16)
RULE = NullSpaceRule(rule="relative", alpha=1e-10)
MLP = ["gate_proj", "up_proj", "down_proj"]
ROUNDING = 1e-6


def projectors_for(model, tokenizer, target_modules=None):
    return compute_projectors(model, tokenizer, CALIBRATION, SETTINGS, RULE, target_modules, show_progress=False)


class Prepared(torch.nn.Module):
    """What `accelerator.prepare` may return: a wrapper (DDP's `module.` prefix) around new parameter objects (FSDP2
    replaces every parameter)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.module = copy.deepcopy(model)


def range_part(constraint, rows_of) -> float:
    """Largest ‖X·(I − P)‖ / ‖X‖ over the constrained weights, X = `rows_of(entry)` (one row per output)."""
    return max(
        (entry.basis.range_part_norm(rows_of(entry).float()) / torch.linalg.matrix_norm(rows_of(entry).float())).item()
        for entry in constraint.weights
    )


def lora_a_rows(entry) -> torch.Tensor:
    return entry.parameter.detach()


def lora_b_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_B" in name}


@pytest.fixture
def lora_model(tiny_model, tiny_tokenizer):
    model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules="all-linear"))
    return model, projectors_for(model, tiny_tokenizer)


def randomize(tensors, scale: float = 1.0) -> None:
    """An optimizer step, as far as the constraint can tell."""
    with torch.no_grad():
        for tensor in tensors:
            tensor.add_(scale * torch.randn_like(tensor))


class TestLora:
    def test_binding_projects_every_a_and_leaves_b_alone(self, lora_model):
        model, projectors = lora_model
        constraint = NullSpaceConstraint(model, projectors)
        assert range_part(constraint, lambda e: lora_factors(_module(model, e), e.adapter)[0].detach()) > 0.1
        before = lora_b_weights(model)
        assert constraint.bind(model) > 0.1  # LoRA's random A starts outside the null space
        assert range_part(constraint, lora_a_rows) <= ROUNDING
        assert all(torch.equal(before[name], after) for name, after in lora_b_weights(model).items())

    def test_gradients_and_parameters_are_projected_and_b_is_free(self, lora_model):
        model, projectors = lora_model
        constraint = NullSpaceConstraint(model, projectors)
        constraint.bind(model)
        torch.manual_seed(0)
        for parameter in model.parameters():
            parameter.grad = torch.randn_like(parameter) if parameter.requires_grad else None
        b_gradients = {name: p.grad.clone() for name, p in model.named_parameters() if "lora_B" in name}
        kept = constraint.project_gradients()
        assert 0 < kept < 1
        assert range_part(constraint, lambda entry: entry.parameter.grad) <= ROUNDING
        assert all(torch.equal(p.grad, b_gradients[n]) for n, p in model.named_parameters() if "lora_B" in n)
        # An optimizer step moves A out of the null space; B moves freely.
        randomize(entry.parameter for entry in constraint.weights)
        # B of a trained one's size, so that ‖B·A·K‖ compares with ‖W·K‖ (the ratio amplifies A's rounding).
        randomize((p for n, p in model.named_parameters() if "lora_B" in n), scale=0.01)
        b_weights = lora_b_weights(model)
        assert constraint.project_parameters() > 0.1
        assert range_part(constraint, lora_a_rows) <= ROUNDING
        assert all(torch.equal(b_weights[name], after) for name, after in lora_b_weights(model).items())
        # B·A·K = 0: the layers' outputs on the calibration inputs are unchanged, whatever B is.
        assert constraint.preservation_error()["mean"] <= ROUNDING

    def test_ranks_above_a_null_dimension_are_named_before_binding_and_still_trained_in_it(
        self, tiny_model, tiny_tokenizer
    ):
        model = get_peft_model(tiny_model, LoraConfig(r=48, target_modules=["q_proj"]))
        constraint = NullSpaceConstraint(model, projectors_for(model, tiny_tokenizer))
        warning = constraint.rank_warning()
        assert re.search(r"LoRA rank exceeds the null dimension.*\(null dim \d+ < rank 48\).*rank at most", warning)
        # A has more rows than null dimensions, and every one of them is still projected into the null space.
        constraint.bind(model)
        assert range_part(constraint, lora_a_rows) <= ROUNDING
        small = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(r=2, target_modules=["q_proj"]))
        assert NullSpaceConstraint(small, projectors_for(small, tiny_tokenizer)).rank_warning() is None


class TestFullFineTuning:
    def test_the_change_since_the_start_is_projected(self, tiny_model, tiny_tokenizer):
        constraint = NullSpaceConstraint(tiny_model, projectors_for(tiny_model, tiny_tokenizer, MLP), MLP)
        assert constraint.bind(tiny_model) == 0.0  # W = W₀: nothing to project
        start = {entry.module_name: entry.parameter.detach().clone() for entry in constraint.weights}
        torch.manual_seed(0)
        for entry in constraint.weights:
            entry.parameter.grad = torch.randn_like(entry.parameter)
        constraint.project_gradients()
        assert range_part(constraint, lambda entry: entry.parameter.grad) <= ROUNDING
        randomize((entry.parameter for entry in constraint.weights), scale=0.01)
        constraint.project_parameters()

        def change(entry):
            return entry.parameter.detach() - start[entry.module_name]

        assert range_part(constraint, change) <= ROUNDING
        assert min(torch.linalg.matrix_norm(change(entry)).item() for entry in constraint.weights) > 1e-2
        assert constraint.preservation_error()["mean"] <= ROUNDING

    def test_gpt2_conv1d_weights_are_projected_by_their_columns(self, tiny_tokenizer):
        model = build_tiny_gpt2(tiny_tokenizer)
        constraint = NullSpaceConstraint(model, projectors_for(model, tiny_tokenizer))
        constraint.bind(model)
        start = {entry.module_name: entry.parameter.detach().clone() for entry in constraint.weights}
        randomize((entry.parameter for entry in constraint.weights), scale=0.01)
        constraint.project_parameters()
        # Conv1D stores W as (d_in, d_out): the rows that must stay in the null space are its columns.
        columns_change = {e.module_name: (e.parameter.detach() - start[e.module_name]).T for e in constraint.weights}
        assert range_part(constraint, lambda entry: columns_change[entry.module_name]) <= ROUNDING
        assert constraint.preservation_error()["mean"] <= ROUNDING


class TestBinding:
    def test_binding_a_prepared_copy_projects_its_new_parameters(self, lora_model):
        # Before: the constraint held the parameters of the model it was built from, and kept projecting those.
        model, projectors = lora_model
        constraint = NullSpaceConstraint(model, projectors)
        constraint.bind(model)
        prepared = Prepared(model)
        constraint.bind(prepared)
        new_parameters = {id(p) for p in prepared.parameters()}
        assert all(id(entry.parameter) in new_parameters for entry in constraint.weights)
        randomize(entry.parameter for entry in constraint.weights)
        for parameter in prepared.parameters():
            parameter.grad = torch.randn_like(parameter)
        constraint.project_gradients()
        constraint.project_parameters()
        assert range_part(constraint, lora_a_rows) <= ROUNDING
        assert range_part(constraint, lambda entry: entry.parameter.grad) <= ROUNDING
        with torch.no_grad():
            for module in modules_by_canonical_name(prepared).values():
                if hasattr(module, "lora_B"):
                    lora_factors(module, "default")[1].normal_(std=0.01)
        assert constraint.preservation_error()["mean"] <= ROUNDING

    def test_binding_again_changes_nothing(self, lora_model):
        model, projectors = lora_model
        constraint = NullSpaceConstraint(model, projectors)
        constraint.bind(model)
        parameters = [entry.parameter for entry in constraint.weights]
        values = [parameter.detach().clone() for parameter in parameters]
        assert constraint.bind(model) <= PROJECTED_DRIFT_TOLERANCE
        assert constraint.bind(Prepared(model)) <= PROJECTED_DRIFT_TOLERANCE
        assert constraint.bind(model) <= PROJECTED_DRIFT_TOLERANCE
        assert [entry.parameter for entry in constraint.weights] == parameters
        assert all(torch.equal(parameter, value) for parameter, value in zip(parameters, values, strict=True))

    def test_binding_without_projecting_only_measures(self, lora_model):
        model, projectors = lora_model
        constraint = NullSpaceConstraint(model, projectors)
        values = {name: p.detach().clone() for name, p in model.named_parameters()}
        assert constraint.bind(model, project=False) > 0.1
        assert all(torch.equal(p, values[name]) for name, p in model.named_parameters())

    def test_an_unbound_constraint_says_so(self, lora_model):
        constraint = NullSpaceConstraint(*lora_model)
        with pytest.raises(RuntimeError, match=r"call `bind\(model\)` first"):
            constraint.project_gradients()

    def test_a_model_without_the_constrained_modules_is_refused(self, lora_model, tiny_tokenizer):
        model, projectors = lora_model
        constraint = NullSpaceConstraint(model, projectors)
        with pytest.raises(NullSpaceError, match="not in the model being bound"):
            constraint.bind(build_tiny_gpt2(tiny_tokenizer))

    def test_unconstrained_parameters_are_found_by_name_in_a_wrapped_model(self, lora_model):
        model, projectors = lora_model
        constraint = NullSpaceConstraint(model, projectors)
        prepared = Prepared(model)
        assert constraint.unconstrained_trainable_parameters(prepared) == []
        prepared.module.base_model.model.lm_head.weight.requires_grad_(True)
        assert constraint.unconstrained_trainable_parameters(prepared) == ["module.base_model.model.lm_head.weight"]
        code = constraint.freezing_code(prepared)
        assert "if name.endswith(('lm_head.weight',))" in code


class TestEnginePolicy:
    def arguments(self, tmp_path, **overrides):
        return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **overrides)

    def test_single_device_and_ddp_are_exact(self, tmp_path, tiny_model, monkeypatch):
        monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
        monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
        accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=None))
        check_training_engine(self.arguments(tmp_path), accelerator, tiny_model)

    @staticmethod
    def accelerator(**plugins):
        return SimpleNamespace(state=SimpleNamespace(**{"deepspeed_plugin": None, "fsdp_plugin": None, **plugins}))

    @staticmethod
    def fsdp_plugin(version=2, state_dict_type="SHARDED_STATE_DICT", activation_checkpointing=False):
        return SimpleNamespace(
            fsdp_version=version,
            state_dict_type=f"StateDictType.{state_dict_type}",
            activation_checkpointing=activation_checkpointing,
        )

    @pytest.fixture(autouse=True)
    def no_launcher_environment(self, monkeypatch):
        for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_VERSION", "FSDP_STATE_DICT_TYPE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv("FSDP_ACTIVATION_CHECKPOINTING", raising=False)

    @pytest.mark.parametrize(
        "overrides, environment, plugin",
        [
            ({"fsdp": "full_shard", "fsdp_config": {"version": 2}}, {}, None),
            ({}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, None),
            ({}, {}, {}),
            ({}, {}, {"state_dict_type": "FULL_STATE_DICT", "activation_checkpointing": True}),
        ],
        ids=["fsdp2-argument", "fsdp2-launch", "fsdp2-config", "fsdp2-full-state-dict-checkpointing"],
    )
    @pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
    def test_fsdp2_is_accepted_for_lora_and_full_fine_tuning(
        self, tmp_path, monkeypatch, overrides, environment, plugin, peft
    ):
        arguments = self.arguments(tmp_path, **overrides)
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        accelerator = self.accelerator(fsdp_plugin=None if plugin is None else self.fsdp_plugin(**plugin))
        check_training_engine(arguments, accelerator, peft=peft)

    @pytest.mark.parametrize(
        "overrides, environment, plugin",
        [
            ({"fsdp": "full_shard", "fsdp_config": {"version": 1}}, {}, None),
            ({}, {"ACCELERATE_USE_FSDP": "true"}, None),  # Accelerate's default version is 1
            ({}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, None),
            ({}, {}, {"version": 1}),
        ],
        ids=["fsdp1-argument", "fsdp-launch-default", "fsdp1-launch", "fsdp1-config"],
    )
    def test_fsdp1_is_refused(self, tmp_path, monkeypatch, overrides, environment, plugin):
        arguments = self.arguments(tmp_path, **overrides)
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        accelerator = self.accelerator(fsdp_plugin=None if plugin is None else self.fsdp_plugin(**plugin))
        with pytest.raises(UnsupportedSetupError, match="does not support FSDP1") as error:
            check_training_engine(arguments, accelerator)
        assert "fsdp_version: 2" in str(error.value)

    @pytest.mark.parametrize(
        "environment, state",
        [({"ACCELERATE_USE_DEEPSPEED": "true"}, {}), ({}, {"deepspeed_plugin": object()})],
        ids=["deepspeed-launch", "deepspeed-config"],
    )
    def test_deepspeed_is_refused_with_the_reason(self, tmp_path, monkeypatch, environment, state):
        arguments = self.arguments(tmp_path)
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(UnsupportedSetupError, match="does not support DeepSpeed") as error:
            check_training_engine(arguments, self.accelerator(**state))
        assert "master copy" in str(error.value) and "FSDP2" in str(error.value)

    @pytest.mark.parametrize(
        "environment, plugin",
        [
            ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"}, None),
            ({}, {"activation_checkpointing": True}),
        ],
        ids=["launch", "config"],
    )
    def test_lora_with_sharded_checkpoints_and_activation_checkpointing_is_refused(
        self, tmp_path, monkeypatch, environment, plugin
    ):
        arguments = self.arguments(tmp_path)
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        accelerator = self.accelerator(fsdp_plugin=None if plugin is None else self.fsdp_plugin(**plugin))
        with pytest.raises(UnsupportedSetupError, match="hold no adapter") as error:
            check_training_engine(arguments, accelerator, peft=True)
        assert "FULL_STATE_DICT" in str(error.value) and "activation_checkpointing" in str(error.value)
        # Full fine-tuning checkpoints the whole model: nothing is lost.
        check_training_engine(arguments, accelerator, peft=False)

    def test_a_model_sharded_at_load_time_is_refused(self, tmp_path, tiny_model, monkeypatch):
        monkeypatch.setattr("trl_nspo.constraint.DTensor", torch.nn.Parameter)
        with pytest.raises(UnsupportedSetupError, match="models sharded at load time"):
            check_training_engine(self.arguments(tmp_path), self.accelerator(), tiny_model)


def _module(model, entry):
    return modules_by_canonical_name(model)[entry.module_name]


@pytest.fixture
def one_process_mesh(tmp_path):
    """A one-process gloo group and device mesh, destroyed afterwards (DTensors need a mesh)."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        torch.distributed.destroy_process_group()


class TestDTensorRows:
    def test_row_shards_and_replicas_give_their_local_tensor_to_write_to(self, one_process_mesh):
        from torch.distributed.tensor import DTensor, Replicate, Shard

        from trl_nspo.constraint import _local_row_range, _local_rows

        for placement in (Shard(0), Replicate()):
            whole = torch.arange(12.0).reshape(4, 3)
            tensor = DTensor.from_local(whole.clone(), one_process_mesh, [placement])
            rows = _local_rows(tensor)
            assert not isinstance(rows, DTensor) and torch.equal(rows, whole)
            rows.zero_()
            assert tensor.to_local().abs().sum() == 0  # a view: writing projects the shard
            assert _local_row_range(tensor) == (0, 4, 1.0)
        plain = torch.ones(2, 2)
        assert _local_rows(plain) is plain

    def test_a_column_shard_is_refused(self, one_process_mesh):
        from torch.distributed.tensor import DTensor, Shard

        from trl_nspo.constraint import _local_rows

        tensor = DTensor.from_local(torch.ones(4, 3), one_process_mesh, [Shard(1)])
        with pytest.raises(UnsupportedSetupError, match="needs whole rows"):
            _local_rows(tensor)


def test_full_fine_tuning_reprojection_keeps_a_small_update_in_the_null_space_whichever_basis_is_stored():
    from trl_nspo.constraint import _FullFineTuningStrategy
    from trl_nspo.null_space import NullSpaceBasis

    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(128, 128, bias=False)
    with torch.no_grad():
        layer.weight.copy_(0.02 * torch.randn(128, 128, generator=generator))  # a language model's initial scale
    eigenvectors, _ = torch.linalg.qr(torch.randn(128, 128, generator=generator, dtype=torch.float64))
    eigenvalues = torch.arange(128.0, dtype=torch.float64)
    start = layer.weight.detach().clone()
    # One optimizer step of a 1e-6 learning rate.
    updated = start + 1e-6 * torch.randn(128, 128, generator=generator)
    outside = {}
    for null_dim in (40, 80):  # 40: the null basis U is stored; 80 > 128 / 2: the range basis R is
        basis = NullSpaceBasis.from_eigh(eigenvalues, eigenvectors, null_dim).to(dtype=torch.float32)
        assert basis.stores_null == (null_dim == 40)
        strategy = _FullFineTuningStrategy()
        (entry,) = strategy.entries("layer", layer, basis)
        change = (strategy.projected_rows(entry, updated) - start).double()
        null = eigenvectors[:, :null_dim]
        left = change - change @ null @ null.T
        outside[null_dim] = (torch.linalg.matrix_norm(left) / torch.linalg.matrix_norm(change)).item()
    # Both branches leave only float32 rounding of the stored weights outside (in float32, W·R − W₀·R of the range
    # branch cancelled badly and left about 10 times more).
    assert outside[40] < 5e-3
    assert outside[80] < 2 * outside[40]
