# A TRL GRPO safety script after the two-line change to NSPO (marked "NSPO:"). Everything else is plain TRL.
#
# Anywhere (CPU included), with the rule-based refusal reward:
#   python examples/nspo_grpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --use_peft \
#       --lora_target_modules all-linear --output_dir Qwen2.5-0.5B-NSPO
#
# One consumer GPU, QLoRA, Llama Guard served by vLLM at localhost:8000 (see examples/accelerate/README.md):
#   accelerate launch --config_file examples/accelerate/single_gpu.yaml examples/nspo_grpo.py \
#       --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --use_peft --load_in_4bit --lora_target_modules all-linear \
#       --dataset_name PKU-Alignment/PKU-SafeRLHF --dataset_fraction 0.4 \
#       --calibration_dataset_name tatsu-lab/alpaca --calibration_num_samples 1024 \
#       --rewards guard_endpoint refusal --guard_base_url http://localhost:8000/v1 \
#       --guard_model meta-llama/Llama-Guard-4-12B \
#       --output_dir Qwen2.5-1.5B-NSPO --learning_rate 1e-5 --num_generations 8 --max_completion_length 256
# Several GPUs (DDP): the same with --config_file examples/accelerate/multi_gpu_ddp.yaml.
#
# Rewards are chosen as in TRL's GRPO script: by name (`refusal`, `guard_endpoint`, `local_guard`) or by the dotted
# import path of a function of yours, e.g. `--rewards refusal my_rewards.format_reward`.
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from trl_nspo import NSPOConfig, NSPOTrainer  # NSPO: was `from trl import GRPOConfig, GRPOTrainer`
from trl_nspo.data import load_calibration_dataset, load_safety_prompts
from trl_nspo.rewards import RewardArguments, reward_functions


@dataclass
class SafetyScriptArguments(RewardArguments, ScriptArguments):
    dataset_name: str = field(default="PKU-Alignment/PKU-SafeRLHF", metadata={"help": "Safety prompts."})
    dataset_fraction: float = field(default=0.4, metadata={"help": "Share of the prompts (the paper used 40%)."})
    calibration_dataset_name: str = field(default="tatsu-lab/alpaca", metadata={"help": "General-task data."})


def make_parser() -> TrlParser:
    # NSPO: GRPOConfig → NSPOConfig (it only adds the null-space fields, e.g. --null_space_energy)
    return TrlParser((SafetyScriptArguments, NSPOConfig, ModelConfig))


def main(script_args: SafetyScriptArguments, training_args: NSPOConfig, model_args: ModelConfig) -> None:
    training_args.model_init_kwargs = {
        "dtype": model_args.dtype,
        "quantization_config": get_quantization_config(model_args),
    }
    trainer = NSPOTrainer(  # NSPO: GRPOTrainer → NSPOTrainer, plus `calibration_dataset`
        model=model_args.model_name_or_path,
        reward_funcs=reward_functions(script_args),
        args=training_args,
        train_dataset=load_safety_prompts(
            script_args.dataset_name, split=script_args.dataset_train_split, fraction=script_args.dataset_fraction
        ),
        peft_config=get_peft_config(model_args),
        calibration_dataset=load_calibration_dataset(
            script_args.calibration_dataset_name, num_samples=training_args.calibration_num_samples
        ),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)  # adapter + nspo_projectors.safetensors
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)  # adapter, projectors and model card


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
