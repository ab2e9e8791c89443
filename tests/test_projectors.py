import json
from dataclasses import replace
from unittest import mock

import pytest
import torch
from safetensors.torch import save_file

from trl_nspo.null_space import NullSpaceBasis, NullSpaceRule
from trl_nspo.projectors import (
    PROJECTORS_FILE_NAME,
    CalibrationRecord,
    ModelFingerprint,
    NullSpaceProjectors,
    ProjectorFileError,
    ProjectorGroup,
    ProjectorsReference,
    existing_projectors_file,
    file_sha256,
    projectors_file_path,
    read_projectors_reference,
    write_projectors_reference,
)

# Ascending eigenvalues: 3 below 1e-3 of the largest (the stored null space of the first group), 2 of 6 not.
EIGENVALUES = torch.tensor([1e-9, 1e-8, 1e-7, 1e-2, 0.1, 0.5, 1.0, 2.0], dtype=torch.float64)


def make_fingerprint(**config) -> ModelFingerprint:
    return ModelFingerprint(
        config={"hidden_size": 8, "rope_parameters": {"rope_theta": 10000.0}, **config},
        tensors={
            "model.embed_tokens.weight": "e" * 16,
            "model.norm.weight": "n" * 16,
            "layers.0.attn.q.weight": "q" * 16,
        },
    )


def make_projectors() -> NullSpaceProjectors:
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    return NullSpaceProjectors(
        groups={
            "layers.0.attn.q": ProjectorGroup(
                ["layers.0.attn.q", "layers.0.attn.k"],
                NullSpaceBasis(q[:, :3], True),
                40,
                torch.randn(8, 4),
                EIGENVALUES,
            ),
            "layers.0.mlp.down": ProjectorGroup(["layers.0.mlp.down"], NullSpaceBasis(q[:, :2], False), 40),
        },
        rule=NullSpaceRule(rule="energy", energy=1e-3, max_null_dim=7),
        model_fingerprint=make_fingerprint(),
        calibration=CalibrationRecord(num_samples=2, token_count=40, data_fingerprint="d" * 64),
    )


INPUT_DIMS = {"layers.0.attn.q": 8, "layers.0.attn.k": 8, "layers.0.mlp.down": 8}
FINGERPRINTS = make_fingerprint()
ONLY_Q = {"layers.0.attn.q": 8}


def validated(
    projectors: NullSpaceProjectors,
    input_dims: dict[str, int] = INPUT_DIMS,
    fingerprint: ModelFingerprint = FINGERPRINTS,
    rule: NullSpaceRule | None = None,
    calibration: CalibrationRecord | None = None,
    source: str = "here",
) -> NullSpaceProjectors:
    """`projectors.validated_for_run` with this file's model, modules and the projectors' own rule by default."""
    return projectors.validated_for_run(input_dims, fingerprint, rule or projectors.rule, calibration, source)


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
    torch.testing.assert_close(loaded.groups["layers.0.attn.q"].eigenvalues, EIGENVALUES, rtol=0, atol=0)
    assert loaded.model_fingerprint == projectors.model_fingerprint
    validated(loaded)


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
            FINGERPRINTS,
            r"Missing: layers\.1\.attn\.q",
        ),
        (
            {**INPUT_DIMS, "layers.0.mlp.down": 16},
            FINGERPRINTS,
            r"wrong input dimension for layers\.0\.mlp\.down \(file 8, model 16\)",
        ),
        (
            INPUT_DIMS,
            make_fingerprint(rope_parameters={"rope_theta": 5e5}),
            r"different model: config `rope_parameters`: \{'rope_theta': 10000\.0\} in the file, "
            r"\{'rope_theta': 500000\.0\} in this run",
        ),
        (
            INPUT_DIMS,
            ModelFingerprint(FINGERPRINTS.config, {**FINGERPRINTS.tensors, "model.norm.weight": "0" * 16}),
            r"different model: weights of model\.norm\.weight\.",
        ),
    ],
)
def test_mismatches_say_what_does_not_match(tmp_path, input_dims, fingerprints, message):
    make_projectors().save(tmp_path)
    with pytest.raises(ProjectorFileError, match=message):
        validated(NullSpaceProjectors.load(tmp_path), input_dims, fingerprints)


def test_projectors_for_more_modules_serve_a_subset(tmp_path):
    make_projectors().save(tmp_path)
    loaded = NullSpaceProjectors.load(tmp_path)
    restricted = validated(loaded, {"layers.0.attn.k": 8})
    assert restricted.null_dims() == {"layers.0.attn.k": (3, 8)}
    assert list(restricted.groups) == ["layers.0.attn.k"]
    assert restricted.model_fingerprint == loaded.model_fingerprint
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
    with pytest.raises(ProjectorFileError, match="format version 99; this trl-nspo reads versions 1, 2"):
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


def test_version_1_file_loads_but_never_matches_a_model(tmp_path):
    path = make_projectors().save(tmp_path)

    def as_version_1(metadata, tensors):
        metadata.update(format_version=1, base_weight_fingerprints=dict.fromkeys(INPUT_DIMS, "f" * 16))
        del metadata["model_fingerprint"]
        for key in [key for key in tensors if key.endswith(".eigenvalues")]:
            del tensors[key]

    _rewrite_metadata(path, as_version_1)
    old = NullSpaceProjectors.load(path)
    assert old.model_fingerprint is None and "layers.0.attn.q" in old.summary()
    with pytest.raises(
        ProjectorFileError, match=r"format version 1, which records a fingerprint of neither.*Delete it"
    ):
        validated(old, source=str(path))


class TestRuleCheck:
    def test_settings_the_rules_do_not_use_are_not_compared(self):
        projectors = make_projectors()
        projectors.rule = NullSpaceRule(rule="relative", alpha=1e-3, energy=1e-4)
        validated(projectors, rule=NullSpaceRule(rule="relative", alpha=1e-3, energy=0.5))

    def test_another_rule_selecting_the_same_null_spaces_is_accepted(self):
        projectors = make_projectors().restricted_to(["layers.0.attn.q"])
        # 3 of the stored eigenvalues are below 1e-3 × the largest, and below 1e-4 of it as well.
        validated(projectors, ONLY_Q, rule=NullSpaceRule(rule="relative", alpha=1e-4))

    def test_another_rule_selecting_other_null_spaces_names_fields_and_modules(self):
        projectors = make_projectors().restricted_to(["layers.0.attn.q"])
        with pytest.raises(
            ProjectorFileError,
            match=r"null_space_rule: 'energy' in the file, 'relative' in this run; null_space_alpha: 5e-05 in the "
            r"file, 0\.01 in this run; null_space_energy: 0\.001 in the file, 0\.0001 in this run; "
            r"null_space_max_dim: "
            r"7 in the file, None in this run\. On the stored eigenvalues it selects other null dimensions for "
            r"layers\.0\.attn\.q \(3 → 4\)",
        ):
            validated(projectors, ONLY_Q, rule=NullSpaceRule(rule="relative", alpha=1e-2))

    def test_a_file_without_eigenvalues_is_refused_for_another_rule(self):
        with pytest.raises(ProjectorFileError, match=r"null_space_max_dim: 7 in the file, None in this run\. Delete"):
            validated(make_projectors(), rule=NullSpaceRule(rule="energy", energy=1e-3))


def test_calibration_mismatch_names_the_field_and_both_values():
    projectors = make_projectors()
    projectors.calibration = replace(
        projectors.calibration, generate_completions=False, completion_length=128, chat_template_fingerprint="a" * 16
    )
    # The completion length is not used without completions: not compared.
    validated(
        projectors, calibration=CalibrationRecord(num_samples=2, generate_completions=False, completion_length=8)
    )
    with pytest.raises(
        ProjectorFileError,
        match=r"calibration_num_samples: 2 in the file, 1024 in this run; tokenizer chat template \(fingerprint\): "
        r"'a{16}' in the file, 'b{16}' in this run",
    ):
        validated(projectors, calibration=CalibrationRecord(num_samples=1024, chat_template_fingerprint="b" * 16))


def test_summary_states_the_stored_size():
    projectors = make_projectors()
    expected = sum(t.numel() * t.element_size() for t in projectors._tensors().values())
    assert projectors.stored_bytes == expected
    assert f"Projector file size: {expected / 2**20:.1f} MB" in projectors.summary()


# The `calibration` object of a format-2 file as trl-nspo wrote it before the record was typed (no completions).
WRITTEN_CALIBRATION = {
    "num_samples": 4,
    "max_length": 256,
    "generate_completions": False,
    "completion_length": 128,
    "batch_size": 8,
    "sketch_dim": 64,
    "groups_per_pass": None,
    "seed": 42,
    "rows": 4,
    "truncated_rows": 0,
    "empty_rows": 0,
    "generated_tokens": 0,
    "token_count": 96,
    "data_fingerprint": "d" * 64,
    "rows_fingerprint": "r" * 16,
    "chat_template_fingerprint": "c" * 16,
    "prompt_fingerprint": "p" * 16,
}


class TestCalibrationRecord:
    def test_a_written_record_reads_back_to_the_same_json(self):
        record = CalibrationRecord.from_metadata(WRITTEN_CALIBRATION)
        assert record.token_count == 96 and record.completion_fingerprint is None
        assert json.dumps(record.to_metadata()) == json.dumps(WRITTEN_CALIBRATION)
        with_completions = {**WRITTEN_CALIBRATION, "generate_completions": True, "completion_fingerprint": "g" * 16}
        assert CalibrationRecord.from_metadata(with_completions).to_metadata() == with_completions

    def test_an_older_file_loads_and_is_checked_by_its_fields(self, tmp_path):
        path = make_projectors().save(tmp_path)
        # A file written before the record was typed, with a key this version does not know.
        _rewrite_metadata(path, lambda metadata, tensors: metadata.update(calibration={**WRITTEN_CALIBRATION, "x": 1}))
        loaded = NullSpaceProjectors.load(path)
        assert loaded.calibration == CalibrationRecord.from_metadata(WRITTEN_CALIBRATION)
        run = CalibrationRecord(num_samples=4, max_length=256, generate_completions=False, prompt_fingerprint="p" * 16)
        validated(loaded, calibration=run)
        with pytest.raises(ProjectorFileError, match=r"prompt tokens \(fingerprint\): 'p{16}' in the file"):
            validated(loaded, calibration=replace(run, prompt_fingerprint="q" * 16))

    def test_a_field_the_file_does_not_record_is_named_so(self):
        with pytest.raises(ProjectorFileError, match=r"dataset rows \(fingerprint\): \(not recorded\) in the file"):
            validated(make_projectors(), calibration=CalibrationRecord(rows_fingerprint="r" * 16))


class TestFileLocation:
    def test_a_directory_holds_the_file_and_a_file_is_itself(self, tmp_path):
        assert projectors_file_path(tmp_path) == tmp_path / PROJECTORS_FILE_NAME
        assert projectors_file_path(tmp_path / "p.safetensors") == tmp_path / "p.safetensors"
        assert existing_projectors_file(tmp_path) is None and existing_projectors_file(None) is None
        renamed = tmp_path / "projectors.bin"
        make_projectors().save(tmp_path).rename(renamed)
        assert projectors_file_path(renamed) == existing_projectors_file(renamed) == renamed
        assert NullSpaceProjectors.load(renamed).null_dims() == make_projectors().null_dims()

    def test_a_checkpoint_reference_leads_to_the_file(self, tmp_path):
        path = make_projectors().save(tmp_path / "run")
        checkpoint = tmp_path / "checkpoint-2"
        checkpoint.mkdir()
        write_projectors_reference(checkpoint, path, file_sha256(path))
        assert read_projectors_reference(checkpoint) == ProjectorsReference(path.resolve(), file_sha256(path))
        assert existing_projectors_file(checkpoint) == path.resolve()
        assert NullSpaceProjectors.load(checkpoint).null_dims() == make_projectors().null_dims()
        path.unlink()
        assert existing_projectors_file(checkpoint) is None
