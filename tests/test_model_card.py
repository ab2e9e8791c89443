from unittest import mock

import yaml
from peft import PeftModel
from test_trainer import CALIBRATION, TRAIN, config, length_reward, lora
from transformers import AutoModelForCausalLM

from trl_nspo import NSPOConfig, NSPOTrainer
from trl_nspo.model_card import render_model_card


def card_metadata(text: str) -> dict:
    return yaml.safe_load(text.split("---")[1])


def test_card_has_hub_metadata_null_space_table_and_evaluation(tiny_model_dir, tmp_path):
    trainer = NSPOTrainer(
        str(tiny_model_dir),
        length_reward,
        NSPOConfig(**config(tmp_path, max_steps=1)),
        train_dataset=TRAIN,
        calibration_dataset=CALIBRATION,
        peft_config=lora(),
    )
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
    assert f"{trainer.projectors.calibration['token_count']:,} tokens" in text
    assert "eigenvalues below 1e-10 × the largest" in text
    assert "| refusal rate (harmful) | 0.1 | 0.8 |" in text
    assert "| general drift (KL) | 0 | 0.001235 |" in text
    assert "Reward: refusal_reward" in text


def test_saved_folder_loads_without_trl_nspo_and_push_uploads_it(tiny_model_dir, tmp_path):
    trainer = NSPOTrainer(
        str(tiny_model_dir),
        length_reward,
        NSPOConfig(**config(tmp_path, max_steps=1, hub_model_id="someone/tiny-nspo")),
        train_dataset=TRAIN,
        calibration_dataset=CALIBRATION,
        peft_config=lora(),
    )
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
