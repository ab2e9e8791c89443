import json
from unittest import mock

import yaml
from peft import PeftModel
from test_trainer import build_nspo, lora
from transformers import AutoModelForCausalLM

from trl_nspo.model_card import render_model_card
from trl_nspo.projectors import PROJECTORS_FILE_NAME


def card_metadata(text: str) -> dict:
    return yaml.safe_load(text.split("---")[1])


def test_card_has_hub_metadata_null_space_table_and_evaluation(tiny_model_dir, tmp_path):
    trainer = build_nspo(tiny_model_dir, tmp_path, peft_config=lora(), max_steps=1)
    card = render_model_card(
        trainer.projectors,
        model_name="tiny-nspo",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        hub_model_id="someone/tiny-nspo",
        dataset_name="PKU-Alignment/PKU-SafeRLHF",
        reward_names=["refusal_reward"],
        evaluation={"refusal rate (harmful)": (0.1, 0.8), "general drift (KL)": (0.0, 0.00123456)},
    )
    text = str(card)
    metadata = card_metadata(text)
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert metadata["library_name"] == "peft"
    assert {"trl", "nspo", "grpo", "lora"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["PKU-Alignment/PKU-SafeRLHF"]
    assert 'PeftModel.from_pretrained(base, "someone/tiny-nspo")' in text
    null_dims = trainer.projectors.null_dims()
    null_dim, input_dim = null_dims["model.layers.1.mlp.down_proj"]
    assert f"| model.layers.1.mlp.down_proj | {null_dim} | {input_dim} |" in text
    assert f"{len(null_dims)} linear modules constrained" in text
    assert f"{trainer.projectors.calibration.token_count:,} tokens" in text
    assert "eigenvalues below 1e-10 × the largest" in text
    assert "| refusal rate (harmful) | 0.1 | 0.8 |" in text
    assert "| general drift (KL) | 0 | 0.001235 |" in text
    assert "Reward: refusal_reward" in text


def test_saved_folder_loads_without_trl_nspo_and_push_uploads_it(tiny_model_dir, tmp_path):
    trainer = build_nspo(tiny_model_dir, tmp_path, peft_config=lora(), max_steps=1, hub_model_id="someone/tiny-nspo")
    trainer.train()
    api = mock.Mock()
    api.create_repo.return_value.repo_id = "someone/tiny-nspo"
    with mock.patch("transformers.trainer.hf_api", return_value=api):
        trainer.push_to_hub(evaluation={"refusal rate": (0.0, 0.5)})
    upload = api.upload_folder.call_args.kwargs
    assert upload["repo_id"] == "someone/tiny-nspo"
    folder = tmp_path / "out"
    assert upload["folder_path"] == str(folder)
    files = {path.name for path in folder.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "nspo_projectors.safetensors", "README.md"} <= files
    readme = (folder / "README.md").read_text()
    assert card_metadata(readme)["library_name"] == "peft"
    assert "| refusal rate | 0 | 0.5 |" in readme
    assert "Optimizer steps: 1" in readme
    assert 'PeftModel.from_pretrained(base, "someone/tiny-nspo")' in readme
    # A plain PEFT load of the folder reproduces the trained adapter.
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)
    trained = dict(trainer.model.named_parameters())
    for name, parameter in loaded.named_parameters():
        if "lora_" in name:
            assert (parameter - trained[name]).abs().max().item() == 0.0


def test_card_of_a_locally_loaded_base_model_has_no_placeholder_and_the_file_size_on_disk(
    tiny_model_dir, tmp_path, capsys
):
    trainer = build_nspo(tiny_model_dir, tmp_path, peft_config=lora(), max_steps=1)
    projectors_file = tmp_path / "out" / PROJECTORS_FILE_NAME
    size = projectors_file.stat().st_size / 2**20
    # Seen when written, before anything could be pushed.
    assert f"Saved NSPO projectors ({size:.1f} MB) to {projectors_file}." in capsys.readouterr().out
    trainer.save_model()
    trainer.create_model_card()
    text = (tmp_path / "out" / "README.md").read_text()
    assert "base_model" not in card_metadata(text)
    assert "]()" not in text and "BASE_MODEL" not in text
    assert "loaded from a local folder (no Hub id was recorded)" in text
    assert 'PeftModel.from_pretrained(base, "out")' in text
    # The file published beside the adapter, not the bases alone (62.66 MB vs 90.8 MB on SmolLM2-135M).
    assert f"projector file {size:.1f} MB." in text
    assert trainer.projectors.num_bytes / 2**20 < size


def test_base_model_hub_id_recorded_by_the_adapter_names_it_in_card_and_adapter_config(tiny_model_dir, tmp_path):
    trainer = build_nspo(tiny_model_dir, tmp_path, peft_config=lora(), max_steps=1)
    trainer.model.active_peft_config.base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    trainer.save_model()
    trainer.create_model_card()
    folder = tmp_path / "out"
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    text = (folder / "README.md").read_text()
    assert card_metadata(text)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "A LoRA adapter for [HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/" in text
    assert 'AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")' in text
