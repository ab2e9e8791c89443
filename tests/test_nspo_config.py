"""`NSPOConfig` on the machine it runs on: bf16 and `use_cpu` follow the hardware unless the user sets them."""

from dataclasses import fields
from unittest import mock

import pytest

from trl_nspo import NSPOConfig, NullSpaceError
from trl_nspo.null_space import NULL_SPACE_RULES
from trl_nspo.precision import accelerator_available


@pytest.fixture
def cpu_only():
    if accelerator_available():
        pytest.skip("tests the CPU-only decisions")


def test_default_config_builds_on_a_cpu_only_machine(tmp_path, cpu_only):
    for cpu_has_bf16 in (True, False):
        with mock.patch("trl_nspo.precision.cpu_supports_bf16", return_value=cpu_has_bf16):
            args = NSPOConfig(output_dir=str(tmp_path))
        # bf16 autocast only where the CPU computes it natively; it is emulated, and slower, elsewhere.
        assert args.bf16 is cpu_has_bf16
        # transformers refuses bf16 without an accelerator unless `use_cpu` is set.
        assert args.use_cpu is cpu_has_bf16


def test_explicit_precision_wins(tmp_path, cpu_only):
    with mock.patch("trl_nspo.precision.cpu_supports_bf16", return_value=True):
        assert NSPOConfig(output_dir=str(tmp_path), bf16=False).bf16 is False
        assert NSPOConfig(output_dir=str(tmp_path), bf16=False).use_cpu is False
    with mock.patch("trl_nspo.precision.cpu_supports_bf16", return_value=False):
        # Asked for explicitly, bf16 is used even where it is emulated; the CPU is then the only place to run.
        args = NSPOConfig(output_dir=str(tmp_path), bf16=True)
        assert args.bf16 is True and args.use_cpu is True


def test_null_space_rule_is_checked_against_the_registry(tmp_path):
    (rule_field,) = [setting for setting in fields(NSPOConfig) if setting.name == "null_space_rule"]
    assert rule_field.metadata["choices"] == list(NULL_SPACE_RULES)
    with pytest.raises(NullSpaceError, match="Unknown null-space rule 'svd'; use one of 'relative', 'energy'"):
        NSPOConfig(output_dir=str(tmp_path), null_space_rule="svd")
    args = NSPOConfig(output_dir=str(tmp_path), null_space_rule="relative", null_space_alpha=1e-4)
    assert args.null_space_rule_config().parameters() == {"rule": "relative", "alpha": 1e-4, "max_null_dim": 128}
