import json
from unittest import mock

import pytest
import torch
from safetensors.torch import save_file

from trl_nspo.null_space import NullSpaceBasis, NullSpaceRule
from trl_nspo.projectors import (
    PROJECTORS_FILE_NAME,
    NullSpaceProjectors,
    ProjectorFileError,
    ProjectorGroup,
)


def make_projectors() -> NullSpaceProjectors:
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    return NullSpaceProjectors(
        groups={
            "layers.0.attn.q": ProjectorGroup(
                ["layers.0.attn.q", "layers.0.attn.k"], NullSpaceBasis(q[:, :3], True), 40, torch.randn(8, 4)
            ),
            "layers.0.mlp.down": ProjectorGroup(["layers.0.mlp.down"], NullSpaceBasis(q[:, :2], False), 40),
        },
        rule=NullSpaceRule(rule="energy", energy=1e-3, max_null_dim=7),
        base_weight_fingerprints=dict.fromkeys(["layers.0.attn.q", "layers.0.attn.k", "layers.0.mlp.down"], "f" * 16),
        calibration={"num_samples": 2, "token_count": 40, "data_fingerprint": "d" * 64},
    )


INPUT_DIMS = {"layers.0.attn.q": 8, "layers.0.attn.k": 8, "layers.0.mlp.down": 8}
FINGERPRINTS = dict.fromkeys(INPUT_DIMS, "f" * 16)


def test_round_trip_keeps_bases_sketches_and_metadata(tmp_path):
    projectors = make_projectors()
    path = projectors.save(tmp_path)
    assert path == tmp_path / PROJECTORS_FILE_NAME
    loaded = NullSpaceProjectors.load(tmp_path)
    assert loaded.metadata() == projectors.metadata()
    assert loaded.rule == projectors.rule
    assert loaded.null_dims() == {"layers.0.attn.q": (3, 8), "layers.0.attn.k": (3, 8), "layers.0.mlp.down": (6, 8)}
    for key, group in projectors.groups.items():
        torch.testing.assert_close(loaded.groups[key].basis.basis, group.basis.basis, rtol=0, atol=0)
    torch.testing.assert_close(
        loaded.groups["layers.0.attn.q"].input_sketch, projectors.groups["layers.0.attn.q"].input_sketch
    )
    assert loaded.groups["layers.0.mlp.down"].input_sketch is None
    loaded.check_matches(INPUT_DIMS, FINGERPRINTS, "test")


def test_interrupted_save_leaves_the_previous_file_intact(tmp_path):
    projectors = make_projectors()
    path = projectors.save(tmp_path / "p.safetensors")
    before = path.read_bytes()
    with mock.patch("trl_nspo.projectors.save_file", side_effect=KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            projectors.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


@pytest.mark.parametrize(
    "input_dims, fingerprints, message",
    [
        (
            {**INPUT_DIMS, "layers.1.attn.q": 8},
            {**FINGERPRINTS, "layers.1.attn.q": "f" * 16},
            r"Missing: layers\.1\.attn\.q",
        ),
        (
            {**INPUT_DIMS, "layers.0.mlp.down": 16},
            FINGERPRINTS,
            r"wrong input dimension for layers\.0\.mlp\.down \(file 8, model 16\)",
        ),
        (
            INPUT_DIMS,
            {**FINGERPRINTS, "layers.0.attn.k": "0" * 16},
            r"different base weights for layers\.0\.attn\.k\.",
        ),
    ],
)
def test_mismatches_say_what_does_not_match(tmp_path, input_dims, fingerprints, message):
    make_projectors().save(tmp_path)
    with pytest.raises(ProjectorFileError, match=message):
        NullSpaceProjectors.load(tmp_path).check_matches(input_dims, fingerprints, "here")


def test_projectors_for_more_modules_serve_a_subset(tmp_path):
    make_projectors().save(tmp_path)
    loaded = NullSpaceProjectors.load(tmp_path)
    subset = {"layers.0.attn.k": 8}
    loaded.check_matches(subset, FINGERPRINTS, "here")
    restricted = loaded.restricted_to(list(subset))
    assert restricted.null_dims() == {"layers.0.attn.k": (3, 8)}
    assert list(restricted.groups) == ["layers.0.attn.k"]
    assert restricted.base_weight_fingerprints == {"layers.0.attn.k": "f" * 16}
    assert restricted.same_bases(loaded.restricted_to(["layers.0.attn.k"]))
    assert not restricted.same_bases(loaded)


def test_truncated_file_is_refused(tmp_path):
    path = make_projectors().save(tmp_path)
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(ProjectorFileError, match="truncated or corrupt"):
        NullSpaceProjectors.load(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ProjectorFileError, match="No projector file"):
        NullSpaceProjectors.load(tmp_path)


def test_other_safetensors_file_is_refused(tmp_path):
    save_file({"weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ProjectorFileError, match="no NSPO projector metadata"):
        NullSpaceProjectors.load(tmp_path / "model.safetensors")


def _rewrite_metadata(path, edit):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as reader:
        metadata = json.loads(reader.metadata()["nspo"])
        tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    edit(metadata, tensors)
    save_file(tensors, path, metadata={"nspo": json.dumps(metadata)})


def test_other_format_version_is_refused(tmp_path):
    path = make_projectors().save(tmp_path)
    _rewrite_metadata(path, lambda metadata, tensors: metadata.update(format_version=99))
    with pytest.raises(ProjectorFileError, match="format version 99; this trl-nspo reads version 1"):
        NullSpaceProjectors.load(path)


def test_tensor_shape_inconsistent_with_metadata_is_refused(tmp_path):
    path = make_projectors().save(tmp_path)
    _rewrite_metadata(path, lambda metadata, tensors: tensors.update({"layers.0.mlp.down.basis": torch.zeros(8, 5)}))
    with pytest.raises(ProjectorFileError, match=r"shape \(8, 5\).*null dimension 6"):
        NullSpaceProjectors.load(path)


def test_missing_tensor_is_refused(tmp_path):
    path = make_projectors().save(tmp_path)
    _rewrite_metadata(path, lambda metadata, tensors: tensors.pop("layers.0.mlp.down.basis"))
    with pytest.raises(ProjectorFileError, match="no tensor 'layers.0.mlp.down.basis'"):
        NullSpaceProjectors.load(path)
