"""trl-nspo: Null-Space constrained Policy Optimization for TRL.

The public names are imported on first use (PEP 562): `import trl_nspo` and `trl-nspo --help` do not load torch,
transformers or TRL.
"""

import importlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .calibration import compute_projectors, find_constrained_modules
    from .calibration_data import CalibrationSettings
    from .constraint import NullSpaceConstraint, UnsupportedSetupError
    from .nspo_config import NSPOConfig
    from .nspo_trainer import HubUnreachableError, NSPOTrainer
    from .null_space import NullSpaceBasis, NullSpaceError, NullSpaceRule
    from .projectors import NullSpaceProjectors, ProjectorFileError

__version__ = "0.1.0"

# Public name → the submodule defining it.
_PUBLIC_NAMES = {
    "CalibrationSettings": "calibration_data",
    "HubUnreachableError": "nspo_trainer",
    "NSPOConfig": "nspo_config",
    "NSPOTrainer": "nspo_trainer",
    "NullSpaceBasis": "null_space",
    "NullSpaceConstraint": "constraint",
    "NullSpaceError": "null_space",
    "NullSpaceProjectors": "projectors",
    "NullSpaceRule": "null_space",
    "ProjectorFileError": "projectors",
    "UnsupportedSetupError": "constraint",
    "compute_projectors": "calibration",
    "find_constrained_modules": "calibration",
}

__all__ = [
    "CalibrationSettings",
    "HubUnreachableError",
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


def __getattr__(name: str):
    if name not in _PUBLIC_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC_NAMES[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def _is_not_bitsandbytes_kernel_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


# On CPUs with AVX512-bf16, importing bitsandbytes warns that an optional faster 4-bit kernel (package `kernels`) is
# missing. PEFT imports bitsandbytes whatever the model, so every command and import would print it; 4-bit works
# without that kernel. Every submodule import runs this file first, so the filter is in place before PEFT loads.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_is_not_bitsandbytes_kernel_notice)
