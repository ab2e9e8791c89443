"""trl-nspo: Null-Space constrained Policy Optimization for TRL."""

from .calibration import CalibrationSettings, compute_projectors, find_constrained_modules
from .constraint import NullSpaceConstraint, UnsupportedSetupError
from .nspo_config import NSPOConfig
from .nspo_trainer import NSPOTrainer
from .null_space import NullSpaceBasis, NullSpaceError, NullSpaceRule
from .projectors import NullSpaceProjectors, ProjectorFileError

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
