"""NSPO's projector memory and projection FLOPs at scale, from model configurations alone (no weights, no torch).

For a dense decoder with LoRA on every linear layer (q, k, v, o, gate, up, down), trl-nspo keeps one null-space basis
per *shared input* (q/k/v read the same input, and so do gate/up): four per layer, of sizes hidden, heads × head_dim,
hidden and intermediate. With a null fraction f, a basis of a d-dimensional input has k = f·d columns, and only the
smaller of the null basis U (d × k) and its complement R (d × (d − k)) is stored, in fp32: 4·d·min(k, d − k) bytes.

Per optimizer step, every constrained `lora_A` (r × d) is projected twice (its gradient, then the parameter after the
step), each as rows·B·Bᵀ with the stored basis B (d × m): 2 × 4·r·d·m FLOPs per module. The yardstick is the forward
pass of one token, 2·N FLOPs (N: parameters of the linear layers and the LM head).

Beside it, the original implementation (full fine-tuning, verl): one dense d × d fp32 projector per constrained module
(only `mlp` modules: gate, up, down), an fp32 copy of every constrained weight, and W ← W₀ + (W − W₀)·P every 5 steps
(2·d_out·d² FLOPs per module). And a dense projector applied to LoRA's A (2 × 2·r·d² FLOPs per module and step).

The configurations are the public `config.json` values of the Hub repositories named below.

    python bench/scale_on_paper.py            # -> bench/results/scale_on_paper.json
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"
FP32_BYTES = 4
BF16_BYTES = 2
# The original code projects every 5 optimizer steps.
ORIGINAL_PROJECTION_INTERVAL = 5


@dataclass(frozen=True)
class ModelShape:
    """The `config.json` values that size a Llama/Qwen2-style decoder."""

    name: str
    config_source: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = False

    def linear_modules(self) -> dict[str, tuple[int, int]]:
        """`{module: (input size, output size)}` of one decoder layer."""
        attention = self.num_attention_heads * self.head_dim
        key_value = self.num_key_value_heads * self.head_dim
        return {
            "q_proj": (self.hidden_size, attention),
            "k_proj": (self.hidden_size, key_value),
            "v_proj": (self.hidden_size, key_value),
            "o_proj": (attention, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }

    def shared_inputs(self) -> dict[str, tuple[int, tuple[str, ...]]]:
        """`{input: (size, modules that read it)}` of one decoder layer."""
        return {
            "attention input": (self.hidden_size, ("q_proj", "k_proj", "v_proj")),
            "o_proj input": (self.num_attention_heads * self.head_dim, ("o_proj",)),
            "MLP input": (self.hidden_size, ("gate_proj", "up_proj")),
            "down_proj input": (self.intermediate_size, ("down_proj",)),
        }

    def parameter_count(self) -> int:
        """All parameters (embeddings once if tied, norms and Qwen2's q/k/v biases included)."""
        linear = sum(d_in * d_out for d_in, d_out in self.linear_modules().values())
        biases = (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim if self.qkv_bias else 0
        per_layer = linear + biases + 2 * self.hidden_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embeddings + self.hidden_size

    def matmul_parameter_count(self) -> int:
        """Parameters that multiply activations in a forward pass: every linear layer and the LM head."""
        linear = sum(d_in * d_out for d_in, d_out in self.linear_modules().values())
        return self.num_hidden_layers * linear + self.vocab_size * self.hidden_size


# Public config.json values (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
# num_key_value_heads, head_dim or hidden_size / num_attention_heads, vocab_size, tie_word_embeddings).
MODELS = (
    ModelShape("SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct", 576, 1536, 30, 9, 3, 64, 49152, True),
    ModelShape("Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct", 896, 4864, 24, 14, 2, 64, 151936, True, qkv_bias=True),
    ModelShape("Llama-2-7B", "meta-llama/Llama-2-7b-hf", 4096, 11008, 32, 32, 32, 128, 32000, False),
    ModelShape("Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct", 3584, 18944, 28, 28, 4, 128, 152064, False, qkv_bias=True),
    ModelShape("Llama-3-70B", "meta-llama/Meta-Llama-3-70B", 8192, 28672, 80, 64, 8, 128, 128256, False),
)
# Published totals, to check the shapes above: SmolLM2 as loaded here, the others from their model cards.
PUBLISHED_PARAMETERS = {
    "SmolLM2-135M": 134_515_008,
    "Qwen2.5-0.5B": 0.49e9,
    "Llama-2-7B": 6.74e9,
    "Qwen2.5-7B": 7.61e9,
    "Llama-3-70B": 70.6e9,
}


@dataclass
class ScaleArguments:
    output: str | None = None
    null_fractions: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5])
    ranks: list[int] = field(default_factory=lambda: [8, 16, 64])
    max_null_dim: int = 128
    quick: bool = False


def stored_columns(size: int, null_fraction: float, max_null_dim: int | None = None) -> tuple[int, int]:
    """(null dimension k, stored columns min(k, d − k)) of a d-dimensional input, k capped at `max_null_dim`."""
    null_dim = round(null_fraction * size)
    if max_null_dim is not None:
        null_dim = min(null_dim, max_null_dim)
    return null_dim, min(null_dim, size - null_dim)


def projector_bytes(model: ModelShape, null_fraction: float, max_null_dim: int | None = None) -> int:
    """trl-nspo: one stored fp32 basis per shared input and layer."""
    per_layer = sum(
        FP32_BYTES * size * stored_columns(size, null_fraction, max_null_dim)[1]
        for size, _ in model.shared_inputs().values()
    )
    return model.num_hidden_layers * per_layer


def projection_flops(model: ModelShape, null_fraction: float, rank: int) -> int:
    """trl-nspo, per optimizer step: each lora_A (r × d) projected twice, 4·r·d·m FLOPs each."""
    per_layer = 0
    for size, modules in model.shared_inputs().values():
        stored = stored_columns(size, null_fraction)[1]
        per_layer += len(modules) * 2 * 4 * rank * size * stored
    return model.num_hidden_layers * per_layer


def smallest_null_dim(model: ModelShape, null_fraction: float) -> int:
    return min(stored_columns(size, null_fraction)[0] for size, _ in model.shared_inputs().values())


def dense_bytes(model: ModelShape) -> dict[str, int]:
    modules = model.linear_modules()
    mlp = ("gate_proj", "up_proj", "down_proj")
    return {
        "per_shared_input_all_linear": model.num_hidden_layers
        * sum(FP32_BYTES * size * size for size, _ in model.shared_inputs().values()),
        "per_module_all_linear": model.num_hidden_layers * sum(FP32_BYTES * d * d for d, _ in modules.values()),
        "original_mlp_projectors": model.num_hidden_layers * sum(FP32_BYTES * modules[m][0] ** 2 for m in mlp),
        "original_down_proj_projectors": model.num_hidden_layers * FP32_BYTES * model.intermediate_size**2,
        "original_fp32_weight_copies": model.num_hidden_layers
        * sum(FP32_BYTES * modules[m][0] * modules[m][1] for m in mlp),
    }


def dense_flops(model: ModelShape, rank: int) -> dict[str, float]:
    modules = model.linear_modules()
    mlp = ("gate_proj", "up_proj", "down_proj")
    lora = model.num_hidden_layers * sum(2 * 2 * rank * d * d for d, _ in modules.values())
    # W ← W₀ + (W − W₀)·P: a d_out × d_in by d_in × d_in product per MLP module, every 5 steps.
    full = model.num_hidden_layers * sum(2 * modules[m][1] * modules[m][0] ** 2 for m in mlp)
    return {"dense_lora_per_step": lora, "original_full_ft_per_step": full / ORIGINAL_PROJECTION_INTERVAL}


def gigabytes(value: float) -> str:
    if value >= 1e9:
        return f"{value / 1e9:.1f} GB"
    return f"{value / 1e6:.0f} MB"


def analyse(arguments: ScaleArguments) -> dict:
    results = {"arguments": asdict(arguments), "models": {}}
    for model in MODELS:
        parameters = model.parameter_count()
        token_flops = 2 * model.matmul_parameter_count()
        entry = {
            "shape": asdict(model),
            "parameters": parameters,
            "published_parameters": PUBLISHED_PARAMETERS[model.name],
            "weights_bf16_bytes": BF16_BYTES * parameters,
            "forward_flops_per_token": token_flops,
            "dense_bytes": dense_bytes(model),
            "nspo_bytes": {str(f): projector_bytes(model, f) for f in arguments.null_fractions},
            "nspo_bytes_capped": projector_bytes(model, max(arguments.null_fractions), arguments.max_null_dim),
            "smallest_null_dim": {str(f): smallest_null_dim(model, f) for f in arguments.null_fractions},
            "flops": {},
        }
        for rank in arguments.ranks:
            entry["flops"][str(rank)] = {
                **dense_flops(model, rank),
                "nspo_per_step": {str(f): projection_flops(model, f, rank) for f in arguments.null_fractions},
            }
        results["models"][model.name] = entry
    qwen = results["models"]["Qwen2.5-7B"]["dense_bytes"]
    results["checks"] = {
        "qwen2.5_7b_down_proj_dense_fp32_bytes": qwen["original_down_proj_projectors"],
        "llama_2_7b_down_proj_dense_fp32_bytes": results["models"]["Llama-2-7B"]["dense_bytes"][
            "original_down_proj_projectors"
        ],
        "qwen2.5_7b_original_host_bytes": qwen["original_mlp_projectors"] + qwen["original_fp32_weight_copies"],
    }
    return results


def print_tables(results: dict) -> None:
    fractions = results["arguments"]["null_fractions"]
    ranks = results["arguments"]["ranks"]
    print("Projector memory (GB = 1e9 bytes). trl-nspo: fp32, one basis per shared input, all linear layers.\n")
    header = ["model", "params", "weights (bf16)", "original: dense MLP projectors + fp32 MLP weights"]
    header += [f"trl-nspo, null {f:.0%} (share of bf16 weights)" for f in fractions]
    cap = results["arguments"]["max_null_dim"]
    header += [f"trl-nspo, null {max(fractions):.0%} capped at null_space_max_dim={cap}"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, entry in results["models"].items():
        dense = entry["dense_bytes"]
        cells = [
            name,
            f"{entry['parameters'] / 1e9:.2f} B",
            gigabytes(entry["weights_bf16_bytes"]),
            f"{gigabytes(dense['original_mlp_projectors'])} + {gigabytes(dense['original_fp32_weight_copies'])}",
        ]
        for f in fractions:
            stored = entry["nspo_bytes"][str(f)]
            cells.append(f"{gigabytes(stored)} ({stored / entry['weights_bf16_bytes']:.0%})")
        capped = entry["nspo_bytes_capped"]
        cells.append(f"{gigabytes(capped)} ({capped / entry['weights_bf16_bytes']:.1%})")
        print("| " + " | ".join(cells) + " |")

    print(
        "\nProjection FLOPs per optimizer step (GFLOP), and in forward passes of one token (2·N FLOPs each). "
        "'—': LoRA rank above the smallest null dimension (refused by NSPOTrainer).\n"
    )
    header = ["model", "rank"] + [f"trl-nspo, null {f:.0%}" for f in fractions]
    header += ["dense P on LoRA A", "original: full FT, (W−W₀)·P every 5 steps"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, entry in results["models"].items():
        token = entry["forward_flops_per_token"]
        for rank in ranks:
            flops = entry["flops"][str(rank)]
            cells = [name, str(rank)]
            for f in fractions:
                if entry["smallest_null_dim"][str(f)] < rank:
                    cells.append("—")
                    continue
                value = flops["nspo_per_step"][str(f)]
                cells.append(f"{value / 1e9:,.1f} (≈ {value / token:,.1f} tokens)")
            cells.append(f"{flops['dense_lora_per_step'] / 1e9:,.0f} (≈ {flops['dense_lora_per_step'] / token:,.0f})")
            full = flops["original_full_ft_per_step"]
            cells.append(f"{full / 1e9:,.0f} (≈ {full / token:,.0f})")
            print("| " + " | ".join(cells) + " |")

    checks = results["checks"]
    print(
        f"\nCheck: Qwen2.5-7B's dense down_proj projectors, 28 × 18944² × 4 B = "
        f"{checks['qwen2.5_7b_down_proj_dense_fp32_bytes'] / 1e9:.1f} GB "
        f"({checks['qwen2.5_7b_down_proj_dense_fp32_bytes'] / 2**30:.1f} GiB); Llama-2-7B's, 32 × 11008² × 4 B = "
        f"{checks['llama_2_7b_down_proj_dense_fp32_bytes'] / 1e9:.1f} GB. The original's host memory for Qwen2.5-7B "
        f"(dense projectors of gate/up/down + fp32 copies of those weights): "
        f"{checks['qwen2.5_7b_original_host_bytes'] / 1e9:.1f} GB."
    )
    print("\nParameter counts from the shapes against the published totals:")
    for name, entry in results["models"].items():
        published = entry["published_parameters"]
        print(
            f"  {name}: {entry['parameters']:,} (published {published:,.0f}; {entry['parameters'] / published:.3f}×)"
        )


def main(arguments: ScaleArguments) -> dict:
    results = analyse(arguments)
    print_tables(results)
    output = Path(arguments.output or RESULTS_DIR / f"scale_on_paper{'_quick' if arguments.quick else ''}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nWrote {output}")
    return results


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="JSON file of the results (default bench/results/scale_on_paper.json).")
    parser.add_argument("--null_fractions", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument(
        "--max_null_dim", type=int, default=128, help="Cap of the capped-memory column (NSPOConfig's default)."
    )
    parser.add_argument(
        "--quick", action="store_true", help="Same computation (it takes a second); writes scale_on_paper_quick.json."
    )
    main(ScaleArguments(**vars(parser.parse_args())))
