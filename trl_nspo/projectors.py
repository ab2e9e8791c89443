"""The set of null-space projectors of one model, and its safetensors file format.

One file holds every stored basis (`<group>.basis` tensors) and, in the safetensors header, a JSON document with the
format version, the selection rule, the calibration settings, the token count, which modules share each basis, and
fingerprints of the base weights and of the calibration tokens. Loading uses safetensors only (no pickle) and is
validated against the model before any training step.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .null_space import NullSpaceBasis, NullSpaceError, NullSpaceRule

PROJECTOR_FORMAT_VERSION = 1
PROJECTORS_FILE_NAME = "nspo_projectors.safetensors"
_METADATA_KEY = "nspo"


@dataclass
class ProjectorGroup:
    """
    One null-space basis and the linear modules that share it because they read the same input.

    Args:
        module_names (`list[str]`):
            Canonical names (no PEFT wrapper prefix) of the modules, e.g. `model.layers.0.self_attn.q_proj`.
        basis ([`NullSpaceBasis`]):
            The stored basis of the shared input's null space.
        token_count (`int`):
            Calibration tokens that went into the covariance.
        input_sketch (`torch.Tensor`, *optional*):
            Gaussian sketch K·S (d × m) of the calibration inputs, for measuring ‖dW·K‖ / ‖W·K‖ during training.
    """

    module_names: list[str]
    basis: NullSpaceBasis
    token_count: int
    input_sketch: torch.Tensor | None = None


@dataclass
class NullSpaceProjectors:
    """
    Every null-space basis of a model, with what is needed to check they still belong to it.

    Args:
        groups (`dict[str, ProjectorGroup]`):
            Groups keyed by their first module name.
        rule ([`NullSpaceRule`]):
            The rule that selected the null spaces.
        base_weight_fingerprints (`dict[str, str]`):
            Fingerprint of each constrained module's base weight at calibration time.
        calibration (`dict[str, Any]`):
            Calibration settings and statistics (samples, max length, completions, token count, data fingerprint).
    """

    groups: dict[str, ProjectorGroup]
    rule: NullSpaceRule
    base_weight_fingerprints: dict[str, str]
    calibration: dict[str, Any] = field(default_factory=dict)

    def basis_by_module(self) -> dict[str, NullSpaceBasis]:
        return {name: group.basis for group in self.groups.values() for name in group.module_names}

    def null_dims(self) -> dict[str, tuple[int, int]]:
        """`{module name: (null dimension, input dimension)}` for every constrained module."""
        return {name: (basis.null_dim, basis.input_dim) for name, basis in self.basis_by_module().items()}

    @property
    def num_bytes(self) -> int:
        return sum(group.basis.num_bytes for group in self.groups.values())

    def summary(self) -> str:
        """A table of the null dimension of every constrained module, for logs and model cards."""
        lines = [f"{'module':<60} {'null dim':>9} / {'input dim':<9} tokens"]
        for group in self.groups.values():
            for name in group.module_names:
                basis = group.basis
                lines.append(f"{name:<60} {basis.null_dim:>9} / {basis.input_dim:<9} {group.token_count}")
        return "\n".join(lines)

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": PROJECTOR_FORMAT_VERSION,
            "rule": asdict(self.rule),
            "base_weight_fingerprints": self.base_weight_fingerprints,
            "calibration": self.calibration,
            "groups": {
                key: {
                    "module_names": group.module_names,
                    "input_dim": group.basis.input_dim,
                    "null_dim": group.basis.null_dim,
                    "stores_null": group.basis.stores_null,
                    "token_count": group.token_count,
                }
                for key, group in self.groups.items()
            },
        }

    def save(self, path: str | os.PathLike) -> Path:
        """
        Writes the projectors to `path` atomically: a crash mid-write never leaves a file a later run would load.

        Args:
            path (`str` or `os.PathLike`):
                A `.safetensors` file, or a directory to write `nspo_projectors.safetensors` into.

        Returns:
            `Path`: the file written.
        """
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / PROJECTORS_FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for key, group in self.groups.items():
            tensors[f"{key}.basis"] = group.basis.basis.detach().float().cpu().contiguous()
            if group.input_sketch is not None:
                tensors[f"{key}.input_sketch"] = group.input_sketch.detach().float().cpu().contiguous()
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(descriptor)
        try:
            save_file(tensors, temporary, metadata={_METADATA_KEY: json.dumps(self.metadata())})
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> NullSpaceProjectors:
        """
        Reads projectors written by [`NullSpaceProjectors.save`], checking the file is complete and consistent.

        Args:
            path (`str` or `os.PathLike`):
                A `.safetensors` file, or a directory containing `nspo_projectors.safetensors`.
        """
        path = Path(path)
        if path.is_dir():
            path = path / PROJECTORS_FILE_NAME
        if not path.is_file():
            raise ProjectorFileError(f"No projector file at {path}.")
        try:
            with safe_open(str(path), framework="pt") as reader:
                header = reader.metadata() or {}
                tensors = {key: reader.get_tensor(key) for key in reader.keys()}
        except (SafetensorError, OSError, ValueError) as error:
            raise ProjectorFileError(
                f"{path} is not a readable safetensors file ({error}); it may be truncated or corrupt. Delete it and "
                "recompute the projectors."
            ) from error
        if _METADATA_KEY not in header:
            raise ProjectorFileError(f"{path} is a safetensors file but holds no NSPO projector metadata.")
        metadata = json.loads(header[_METADATA_KEY])
        version = metadata.get("format_version")
        if version != PROJECTOR_FORMAT_VERSION:
            raise ProjectorFileError(
                f"{path} has projector format version {version}; this trl-nspo reads version "
                f"{PROJECTOR_FORMAT_VERSION}. Recompute the projectors with this version."
            )
        groups = {}
        for key, entry in metadata["groups"].items():
            tensor_name = f"{key}.basis"
            if tensor_name not in tensors:
                raise ProjectorFileError(f"{path} lists group {key!r} but has no tensor {tensor_name!r}.")
            basis = NullSpaceBasis(tensors[tensor_name], stores_null=entry["stores_null"])
            if basis.input_dim != entry["input_dim"] or basis.null_dim != entry["null_dim"]:
                raise ProjectorFileError(
                    f"{path}: tensor {tensor_name!r} has shape {tuple(basis.basis.shape)}, which does not match the "
                    f"recorded input dimension {entry['input_dim']} and null dimension {entry['null_dim']}."
                )
            sketch = tensors.get(f"{key}.input_sketch")
            groups[key] = ProjectorGroup(entry["module_names"], basis, entry["token_count"], sketch)
        return cls(
            groups=groups,
            rule=NullSpaceRule(**metadata["rule"]),
            base_weight_fingerprints=metadata["base_weight_fingerprints"],
            calibration=metadata["calibration"],
        )

    def same_bases(self, other: NullSpaceProjectors, tolerance: float = 1e-4) -> bool:
        """Whether `other` holds the same groups spanning the same null spaces (up to the basis' sign and rotation)."""
        if self.groups.keys() != other.groups.keys():
            return False
        for key, group in self.groups.items():
            mine, theirs = group.basis, other.groups[key].basis
            if group.module_names != other.groups[key].module_names or mine.null_dim != theirs.null_dim:
                return False
            # Two orthonormal d × m bases span the same subspace iff ‖B₁ᵀ·B₂‖²_F = m.
            overlap = torch.linalg.matrix_norm(mine.basis.double().T @ theirs.basis.double()).item() ** 2
            if mine.stores_null != theirs.stores_null or overlap < mine.basis.shape[1] * (1 - tolerance):
                return False
        return True

    def check_matches(self, input_dims: dict[str, int], base_weight_fingerprints: dict[str, str], source: str) -> None:
        """
        Raises [`ProjectorFileError`] unless these projectors cover these modules, with these input sizes and base
        weights. Projectors computed for more modules are fine (see [`NullSpaceProjectors.restricted_to`]).

        Args:
            input_dims (`dict[str, int]`):
                Input dimension of every module the trainer will constrain, by canonical name.
            base_weight_fingerprints (`dict[str, str]`):
                Fingerprint of those modules' current base weights.
            source (`str`):
                Where the projectors came from, for the error message.
        """
        recorded = self.null_dims()
        missing = [name for name in input_dims if name not in recorded]
        if missing:
            raise ProjectorFileError(
                f"The projectors in {source} do not cover every module to constrain. Missing: {_abbreviate(missing)}. "
                "Recompute them for this model and these target modules."
            )
        wrong_shape = [
            f"{name} (file {recorded[name][1]}, model {dim})"
            for name, dim in input_dims.items()
            if recorded[name][1] != dim
        ]
        if wrong_shape:
            raise ProjectorFileError(
                f"The projectors in {source} have the wrong input dimension for {_abbreviate(wrong_shape)}."
            )
        other_weights = [
            name for name in input_dims if self.base_weight_fingerprints.get(name) != base_weight_fingerprints[name]
        ]
        if other_weights:
            raise ProjectorFileError(
                f"The projectors in {source} were computed on different base weights for "
                f"{_abbreviate(other_weights)}. They would not preserve this model's outputs: recompute them for this "
                "model."
            )

    def restricted_to(self, module_names: list[str]) -> NullSpaceProjectors:
        """The projectors of `module_names` only (groups shrink to the listed modules, empty groups are dropped)."""
        wanted = set(module_names)
        groups = {}
        for group in self.groups.values():
            kept = [name for name in group.module_names if name in wanted]
            if kept:
                groups[kept[0]] = ProjectorGroup(kept, group.basis, group.token_count, group.input_sketch)
        return NullSpaceProjectors(
            groups=groups,
            rule=self.rule,
            base_weight_fingerprints={name: self.base_weight_fingerprints[name] for name in module_names},
            calibration=self.calibration,
        )


class ProjectorFileError(NullSpaceError):
    """Raised when a projector file is unreadable or does not belong to the model being trained."""


def _abbreviate(names: list[str], limit: int = 6) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
