"""trl-nspo: Null-Space constrained Policy Optimization for TRL."""

import logging


def _is_not_bitsandbytes_kernel_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


# On CPUs with AVX512-bf16, importing bitsandbytes warns that an optional faster 4-bit kernel (package `kernels`) is
# missing. PEFT imports bitsandbytes whatever the model, so every command and import would print it; 4-bit works
# without that kernel.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_is_not_bitsandbytes_kernel_notice)

# The filter above must be in place before these import PEFT.
from .calibration import CalibrationSettings, compute_projectors, find_constrained_modules  # noqa: E402
from .constraint import NullSpaceConstraint, UnsupportedSetupError  # noqa: E402
from .nspo_config import NSPOConfig  # noqa: E402
from .nspo_trainer import NSPOTrainer  # noqa: E402
from .null_space import NullSpaceBasis, NullSpaceError, NullSpaceRule  # noqa: E402
from .projectors import NullSpaceProjectors, ProjectorFileError  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CalibrationSettings",
    "NSPOConfig",
    "NSPOTrainer",
    "NullSpaceBasis",
    "NullSpaceConstraint",
    "NullSpaceError",
    "NullSpaceProjectors",
    "NullSpaceRule",
    "ProjectorFileError",
    "UnsupportedSetupError",
    "compute_projectors",
    "find_constrained_modules",
]
