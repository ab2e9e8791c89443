"""The set of null-space projectors of one model, and its safetensors file format.

One file holds every stored basis (`<group>.basis` tensors), the eigenvalues it was selected from
(`<group>.eigenvalues`) and, in the safetensors header, a JSON document with the format version, the selection rule,
the calibration settings and counts, which modules share each basis, a fingerprint of the whole base model (its config
and a hash of every base parameter and buffer) and fingerprints of the calibration rows, chat template and tokens.
Loading uses safetensors only (no pickle) and is validated against the model before any training step.

Checkpoints do not copy the file: they hold a small JSON reference (`nspo_projectors.json`) with its path and the
SHA-256 of its content, which resuming checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .null_space import NullSpaceBasis, NullSpaceError, NullSpaceRule

# Version 2 added the whole-model fingerprint, the eigenvalues and the calibration rows/template/prompt fingerprints.
PROJECTOR_FORMAT_VERSION = 2
# Version 1 files are still read (to inspect them), but never match a model: they lack what proves they belong to it.
READABLE_FORMAT_VERSIONS = (1, 2)
PROJECTORS_FILE_NAME = "nspo_projectors.safetensors"
PROJECTORS_REFERENCE_NAME = "nspo_projectors.json"
_METADATA_KEY = "nspo"


def _checked_as(label: str) -> dict[str, str]:
    # A calibration field compared with this run's before a file is used, named as `NSPOConfig` / the CLI names it.
    return {"checked_as": label}


@dataclass
class CalibrationRecord:
    """
    What the projectors of a file were calibrated on, as its `calibration` metadata records it: the settings, the
    counts, and fingerprints of what reached the layers. `None` means not recorded (files of format version 1, or a
    record of only what a run can check cheaply, from [`~fingerprints.calibration_record`]).

    The fields with a `checked_as` label are compared with this run's, in this order, by
    [`NullSpaceProjectors.validated_for_run`]; together with the model's fingerprint they decide what reaches the
    layers. The others (batch size, sketch, counts) are statistics of the run that made the file.
    """

    num_samples: int | None = field(default=None, metadata=_checked_as("calibration_num_samples"))
    max_length: int | None = field(default=None, metadata=_checked_as("calibration_max_length"))
    generate_completions: bool | None = field(default=None, metadata=_checked_as("calibration_generate_completions"))
    completion_length: int | None = field(default=None, metadata=_checked_as("calibration_completion_length"))
    batch_size: int | None = None
    sketch_dim: int | None = None
    groups_per_pass: int | None = None
    folds: int | None = None
    seed: int | None = None
    rows: int | None = None
    truncated_rows: int | None = None
    empty_rows: int | None = None
    generated_tokens: int | None = None
    token_count: int | None = None
    # SHA-256 of every calibration sequence's tokens (prompts and completions): identical files have the same one.
    data_fingerprint: str | None = None
    rows_fingerprint: str | None = field(default=None, metadata=_checked_as("calibration dataset rows (fingerprint)"))
    chat_template_fingerprint: str | None = field(
        default=None, metadata=_checked_as("tokenizer chat template (fingerprint)")
    )
    prompt_fingerprint: str | None = field(
        default=None, metadata=_checked_as("calibration prompt tokens (fingerprint)")
    )
    completion_fingerprint: str | None = field(
        default=None,
        metadata=_checked_as("generation config and stop tokens of the calibration completions (fingerprint)"),
    )
    # The training prompts a task-aware rule selected with (`None` for the other rules).
    task_rows_fingerprint: str | None = field(
        default=None, metadata=_checked_as("training dataset rows (fingerprint)")
    )
    task_prompt_fingerprint: str | None = field(
        default=None, metadata=_checked_as("training prompt tokens (fingerprint)")
    )

    def to_metadata(self) -> dict[str, Any]:
        """The file's `calibration` JSON object: every field, except those a file may lack (the completion fingerprint
        of a calibration without completions, the training prompts' fingerprints of a rule that does not read them,
        the folds of a file written before they were kept), so a record read back writes the same JSON."""
        metadata = asdict(self)
        for name in ("completion_fingerprint", "task_rows_fingerprint", "task_prompt_fingerprint", "folds"):
            if metadata[name] is None:
                del metadata[name]
        return metadata

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> CalibrationRecord:
        """Reads a file's `calibration` object: keys this version does not know are ignored, missing ones `None`."""
        return cls(**{setting.name: metadata.get(setting.name) for setting in fields(cls)})

    def differences(self, expected: CalibrationRecord) -> list[str]:
        """
        The checked fields `expected` records and this record holds otherwise, each as `"label: value in the file,
        value in this run"`; the completion length and fingerprint only when either side generated completions.
        """
        uses_completions = expected.generate_completions or self.generate_completions
        found = []
        for setting in fields(self):
            label = setting.metadata.get("checked_as")
            recorded, wanted = getattr(self, setting.name), getattr(expected, setting.name)
            if label is None or wanted is None or recorded == wanted:
                continue
            if setting.name in ("completion_length", "completion_fingerprint") and not uses_completions:
                continue
            shown = "(not recorded)" if recorded is None else repr(recorded)
            found.append(f"{label}: {shown} in the file, {wanted!r} in this run")
        return found


@dataclass
class ModelFingerprint:
    """
    What the layer inputs of a model depend on, besides the calibration data: its config and all its base weights.

    Args:
        config (`dict[str, Any]`):
            The model config as JSON, without the fields that cannot change outputs (name, versions, `use_cache`, …).
        tensors (`dict[str, str]`):
            SHA-256 (first 16 hex digits) of the bytes, shape and dtype of every base parameter and buffer, by
            canonical name (adapters excluded). Any of them can change a constrained layer's inputs: embeddings,
            norms, earlier layers, the rotary frequencies, and the LM head through the calibration completions.
    """

    config: dict[str, Any]
    tensors: dict[str, str]

    def differences(self, current: ModelFingerprint) -> list[str]:
        """What differs from `current`, each as `"what: value in the file, value in this run"`."""
        found = [
            f"config `{key}`: {self.config.get(key, '(absent)')!r} in the file, "
            f"{current.config.get(key, '(absent)')!r} in this run"
            for key in sorted(self.config.keys() | current.config.keys())
            if self.config.get(key) != current.config.get(key)
        ]
        changed = [
            name for name in self.tensors if name in current.tensors and self.tensors[name] != current.tensors[name]
        ]
        if changed:
            found.append(f"weights of {_abbreviate(changed)}")
        only_file = [name for name in self.tensors if name not in current.tensors]
        if only_file:
            found.append(f"weights only in the file's model: {_abbreviate(only_file)}")
        only_run = [name for name in current.tensors if name not in self.tensors]
        if only_run:
            found.append(f"weights only in this run's model: {_abbreviate(only_run)}")
        return found


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
        eigenvalues (`torch.Tensor`, *optional*):
            The covariance's eigenvalues (ascending, float64) the basis was selected from, so another rule can be
            checked against the file without recalibrating (d numbers: the d × d eigenvectors would be too large).
        calibration_share (`float`, *optional*):
            Share of the calibration inputs' energy inside the null space, tr(Uᵀ·C·U) / tr(C): in-sample.
        heldout_share (`float`, *optional*):
            The same share on calibration data the null space was not computed from (pooled over folds, each measured
            in the null space computed from the others): what the null space lets an update reach of general inputs
            it never saw. `None` when calibration kept one fold.
    """

    module_names: list[str]
    basis: NullSpaceBasis
    token_count: int
    input_sketch: torch.Tensor | None = None
    eigenvalues: torch.Tensor | None = None
    calibration_share: float | None = None
    heldout_share: float | None = None


@dataclass
class NullSpaceProjectors:
    """
    Every null-space basis of a model, with what is needed to check they still belong to it.

    Args:
        groups (`dict[str, ProjectorGroup]`):
            Groups keyed by their first module name.
        rule ([`NullSpaceRule`]):
            The rule that selected the null spaces.
        model_fingerprint ([`ModelFingerprint`], *optional*):
            The calibrated model's config and base weights; `None` only in files of format version 1.
        calibration ([`CalibrationRecord`], *optional*):
            Calibration settings, statistics and fingerprints (rows, chat template, prompt tokens, all tokens).
    """

    groups: dict[str, ProjectorGroup]
    rule: NullSpaceRule
    model_fingerprint: ModelFingerprint | None
    calibration: CalibrationRecord = field(default_factory=CalibrationRecord)

    def basis_by_module(self) -> dict[str, NullSpaceBasis]:
        return {name: group.basis for group in self.groups.values() for name in group.module_names}

    def null_dims(self) -> dict[str, tuple[int, int]]:
        """`{module name: (null dimension, input dimension)}` for every constrained module."""
        return {name: (basis.null_dim, basis.input_dim) for name, basis in self.basis_by_module().items()}

    def null_energy_logs(self) -> dict[str, float]:
        """The median over inputs of the in-sample and held-out shares of general-input energy inside the null
        spaces (`nspo/calibration_null_energy`, `nspo/heldout_null_energy`), where the file records them."""
        logs = {}
        for key, attribute in (("calibration", "calibration_share"), ("heldout", "heldout_share")):
            shares = [getattr(group, attribute) for group in self.groups.values()]
            if shares and all(share is not None for share in shares):
                logs[f"nspo/{key}_null_energy"] = statistics.median(shares)
        return logs

    @property
    def num_bytes(self) -> int:
        return sum(group.basis.num_bytes for group in self.groups.values())

    @property
    def stored_bytes(self) -> int:
        """Bytes of every tensor a saved file holds (bases, sketches, eigenvalues): about the file's size."""
        return sum(tensor.numel() * tensor.element_size() for tensor in self._tensors().values())

    def summary(self) -> str:
        """A table of the null dimension of every constrained module and the stored size, for logs and model cards."""
        lines = [f"{'module':<60} {'null dim':>9} / {'input dim':<9} tokens"]
        for group in self.groups.values():
            for name in group.module_names:
                basis = group.basis
                lines.append(f"{name:<60} {basis.null_dim:>9} / {basis.input_dim:<9} {group.token_count}")
        lines.append(
            f"Projector file size: {self.stored_bytes / 2**20:.1f} MB ({self.num_bytes / 2**20:.1f} MB of bases, "
            f"the rest preservation-metric sketches and eigenvalues)."
        )
        return "\n".join(lines)

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": PROJECTOR_FORMAT_VERSION,
            "rule": asdict(self.rule),
            "model_fingerprint": None if self.model_fingerprint is None else asdict(self.model_fingerprint),
            "calibration": self.calibration.to_metadata(),
            "groups": {
                key: {
                    "module_names": group.module_names,
                    "input_dim": group.basis.input_dim,
                    "null_dim": group.basis.null_dim,
                    "stores_null": group.basis.stores_null,
                    "token_count": group.token_count,
                    "calibration_share": group.calibration_share,
                    "heldout_share": group.heldout_share,
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
        path = projectors_file_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(
            path,
            lambda temporary: save_file(
                self._tensors(), temporary, metadata={_METADATA_KEY: json.dumps(self.metadata())}
            ),
        )
        return path

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for key, group in self.groups.items():
            tensors[f"{key}.basis"] = group.basis.basis.detach().float().cpu().contiguous()
            if group.input_sketch is not None:
                tensors[f"{key}.input_sketch"] = group.input_sketch.detach().float().cpu().contiguous()
            if group.eigenvalues is not None:
                tensors[f"{key}.eigenvalues"] = group.eigenvalues.detach().double().cpu().contiguous()
        return tensors

    @classmethod
    def load(cls, path: str | os.PathLike) -> NullSpaceProjectors:
        """
        Reads projectors written by [`NullSpaceProjectors.save`], checking the file is complete and consistent.

        Args:
            path (`str` or `os.PathLike`):
                A projector file, or a directory holding one (see [`existing_projectors_file`]).
        """
        found = existing_projectors_file(path)
        if found is None:
            raise ProjectorFileError(f"No projector file at {projectors_file_path(path)}.")
        path = found
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
        if version not in READABLE_FORMAT_VERSIONS:
            raise ProjectorFileError(
                f"{path} has projector format version {version}; this trl-nspo reads versions "
                f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}. Recompute the projectors with this version."
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
            eigenvalues = tensors.get(f"{key}.eigenvalues")
            groups[key] = ProjectorGroup(
                entry["module_names"],
                basis,
                entry["token_count"],
                sketch,
                eigenvalues,
                entry.get("calibration_share"),
                entry.get("heldout_share"),
            )
        fingerprint = metadata.get("model_fingerprint")
        return cls(
            groups=groups,
            rule=NullSpaceRule(**metadata["rule"]),
            model_fingerprint=None if fingerprint is None else ModelFingerprint(**fingerprint),
            calibration=CalibrationRecord.from_metadata(metadata["calibration"]),
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

    def validated_for_run(
        self,
        input_dims: dict[str, int],
        model_fingerprint: ModelFingerprint,
        rule: NullSpaceRule,
        calibration: CalibrationRecord | None,
        source: str,
    ) -> NullSpaceProjectors:
        """
        The projectors of the modules in `input_dims`, once shown to belong to this run; raises
        [`ProjectorFileError`] naming what differs otherwise. They must cover these modules with these input sizes
        (projectors computed for more modules are fine), have been computed on this model (same config and every base
        weight: a changed embedding, norm or earlier layer changes a constrained layer's inputs as surely as its own
        weight does), be selected by `rule` and, when `calibration` is given, have been calibrated as it records.

        Args:
            input_dims (`dict[str, int]`):
                Input dimension of every module the trainer will constrain, by canonical name.
            model_fingerprint ([`ModelFingerprint`]):
                Fingerprint of the model being trained.
            rule ([`NullSpaceRule`]):
                The rule this run asks for. Settings the two rules do not use are ignored, and with the stored
                eigenvalues a different rule that selects the same null dimension in every group is accepted (it
                would recompute exactly these bases).
            calibration ([`CalibrationRecord`], *optional*):
                This run's calibration record (settings, dataset rows, chat template, prompt tokens), from
                [`~fingerprints.calibration_record`]; `None` uses the file as it was made.
            source (`str`):
                Where the projectors came from, for the error messages.
        """
        self._check_model(input_dims, model_fingerprint, source)
        self._check_rule(rule, source)
        if calibration is not None:
            self._check_calibration(calibration, source)
        return self.restricted_to(list(input_dims))

    def _check_model(self, input_dims: dict[str, int], model_fingerprint: ModelFingerprint, source: str) -> None:
        if self.model_fingerprint is None:
            raise ProjectorFileError(
                f"{source} has projector format version 1, which records a fingerprint of neither the whole model "
                "(config, embeddings, norms, every layer) nor the calibration prompts' tokens, so it cannot be shown "
                "to belong to this model. Delete it to recalibrate (or run `trl-nspo calibrate` again)."
            )
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
        differences = self.model_fingerprint.differences(model_fingerprint)
        if differences:
            raise ProjectorFileError(
                f"The projectors in {source} were computed on a different model: {'; '.join(differences)}. They "
                "would not preserve this model's outputs. Delete the file to recalibrate, or set `projectors_path` "
                "to another location."
            )

    def _check_rule(self, rule: NullSpaceRule, source: str) -> None:
        differences = self.rule.selection_differences(rule)
        if not differences:
            return
        detail = ""
        # Only between rules that select eigen-directions from eigenvalues alone: the others choose other bases.
        from_eigenvalues = self.rule.selects_from_eigenvalues and rule.selects_from_eigenvalues
        if from_eigenvalues and all(group.eigenvalues is not None for group in self.groups.values()):
            changed = [
                f"{key} ({group.basis.null_dim} → {rule.null_dimension(group.eigenvalues)})"
                for key, group in self.groups.items()
                if rule.null_dimension(group.eigenvalues) != group.basis.null_dim
            ]
            if not changed:
                return
            detail = f" On the stored eigenvalues it selects other null dimensions for {_abbreviate(changed)}."
        described = "; ".join(
            f"null_space_{'max_dim' if name == 'max_null_dim' else name}: {recorded!r} in the file, {wanted!r} in "
            "this run"
            for name, recorded, wanted in differences
        )
        raise ProjectorFileError(
            f"The projectors in {source} were selected with another null-space rule than this run asks for: "
            f"{described}.{detail} Delete the file (or set `projectors_path` elsewhere) to recalibrate with this "
            "run's rule, or set the `null_space_*` options back to the file's."
        )

    def _check_calibration(self, expected: CalibrationRecord, source: str) -> None:
        differences = self.calibration.differences(expected)
        if differences:
            raise ProjectorFileError(
                f"The projectors in {source} were computed from other calibration data or settings than this run's: "
                f"{'; '.join(differences)}. Delete the file to recalibrate, set `projectors_path` to another "
                "location, or run without `calibration_dataset` to use the file as it was made."
            )

    def restricted_to(self, module_names: list[str]) -> NullSpaceProjectors:
        """The projectors of `module_names` only (groups shrink to the listed modules, empty groups are dropped)."""
        wanted = set(module_names)
        groups = {}
        for group in self.groups.values():
            kept = [name for name in group.module_names if name in wanted]
            if kept:
                groups[kept[0]] = replace(group, module_names=kept)
        return NullSpaceProjectors(
            groups=groups, rule=self.rule, model_fingerprint=self.model_fingerprint, calibration=self.calibration
        )


class ProjectorFileError(NullSpaceError):
    """Raised when a projector file is unreadable or does not belong to the model being trained."""


def _abbreviate(names: list[str], limit: int = 6) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def projectors_file_path(location: str | os.PathLike) -> Path:
    """
    Where the projector file of `location` (`projectors_path` or `output_dir`) is, or is saved to: `location` itself
    if it is a file or names a `.safetensors` file, else `nspo_projectors.safetensors` inside the directory.
    """
    location = Path(location)
    if location.is_file() or (location.suffix == ".safetensors" and not location.is_dir()):
        return location
    return location / PROJECTORS_FILE_NAME


def copy_projectors_file(source: Path, directory: str | os.PathLike) -> Path:
    """
    Puts the projector file `source` into `directory` atomically, as a hard link where the file system allows (no
    second copy of the bytes; safe because projector files are only ever replaced by a rename, never edited in place),
    else as a copy.

    Returns:
        `Path`: the file in `directory`.
    """
    target = Path(directory) / PROJECTORS_FILE_NAME
    target.parent.mkdir(parents=True, exist_ok=True)

    def link_or_copy(temporary: str) -> None:
        os.remove(temporary)
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)

    _write_atomically(target, link_or_copy)
    return target


def file_megabytes(path: str | os.PathLike) -> str:
    """A file's size on disk, as the CLI, the logs and the model card all print it: `"90.8 MB"` (MB of 2**20 bytes)."""
    return f"{os.stat(path).st_size / 2**20:.1f} MB"


def existing_projectors_file(location: str | os.PathLike | None) -> Path | None:
    """
    The projector file at `location`, or `None` if there is none: the file [`projectors_file_path`] names, else the
    file a checkpoint's `nspo_projectors.json` references (so `projectors_path` may name a checkpoint).
    """
    if location is None:
        return None
    path = projectors_file_path(location)
    if path.is_file():
        return path
    reference = read_projectors_reference(location) if Path(location).is_dir() else None
    return reference.path if reference is not None and reference.path.is_file() else None


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_projectors_reference(directory: str | os.PathLike, projectors_file: Path, sha256: str) -> Path:
    """
    Writes `nspo_projectors.json` into `directory` (a checkpoint): the projector file's absolute path, its content's
    SHA-256 and its size, so the checkpoint names the null spaces it was trained in without a copy of them.
    """
    path = Path(directory) / PROJECTORS_REFERENCE_NAME
    reference = {
        "path": str(projectors_file.resolve()),
        "sha256": sha256,
        "size_bytes": projectors_file.stat().st_size,
    }
    _write_atomically(path, lambda temporary: Path(temporary).write_text(json.dumps(reference, indent=2) + "\n"))
    return path


@dataclass(frozen=True)
class ProjectorsReference:
    """
    What a checkpoint's `nspo_projectors.json` says about the projector file it was trained with.

    Args:
        path (`Path`):
            The file's absolute path when the checkpoint was written.
        sha256 (`str`):
            SHA-256 of the file's content then.
    """

    path: Path
    sha256: str


def read_projectors_reference(directory: str | os.PathLike) -> ProjectorsReference | None:
    """The reference [`write_projectors_reference`] wrote into `directory`, or `None` if there is none."""
    path = Path(directory) / PROJECTORS_REFERENCE_NAME
    if not path.is_file():
        return None
    try:
        reference = json.loads(path.read_text())
        return ProjectorsReference(Path(reference["path"]), str(reference["sha256"]))
    except (ValueError, KeyError, TypeError) as error:
        raise ProjectorFileError(f"{path} is not a readable projector reference ({error}).") from error


def _write_atomically(path: Path, write) -> None:
    """Calls `write(temporary)` and renames the result to `path`: a crash mid-write never leaves a partial `path`."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
