"""Where DeepSpeed ZeRO-2/3 keep gradients and parameters, on CPU (gloo): why NSPO cannot project `p.grad` or the
parameters there (docs/fsdp2_findings.md, "DeepSpeed").

DeepSpeed is not a dependency of trl-nspo: install it into a separate environment that sees the project's torch,

    python -m venv /tmp/ds-venv
    python -c 'import site; print(site.getsitepackages()[0])' > /tmp/ds-venv/lib/python3.11/site-packages/main.pth
    DS_BUILD_OPS=0 /tmp/ds-venv/bin/pip install deepspeed
    OMP_NUM_THREADS=1 /tmp/ds-venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 \
        bench/deepspeed_master_copy.py --stage 2

Each rank prints, after `engine.backward`, whether `p.grad` exists, then zeroes a weight in place after a step
(as NSPO's re-projection writes the parameters) and prints its norm after the next step: the edit is lost, the weight
is back near its pre-edit value, because the optimizer steps its own float32 partition and copies it over the
parameters (in float32 as in bf16).
"""

import argparse

import deepspeed
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, choices=[1, 2, 3], default=2)
    cli = parser.parse_args()

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6, bias=False), torch.nn.Linear(6, 4, bias=False))
    config = {
        "train_micro_batch_size_per_gpu": 2,
        # torch's Adam: DeepSpeed's CPU Adam would be compiled at first use.
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": cli.stage},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    inputs = torch.randn(2, 8, generator=torch.Generator().manual_seed(rank))
    weight = engine.module[0].weight
    gathered = deepspeed.zero.GatheredParameters([weight], enabled=cli.stage == 3)

    engine.backward(engine(inputs).pow(2).sum())
    print(f"rank {rank} ZeRO-{cli.stage}: after backward, p.grad is {weight.grad}", flush=True)
    engine.step()
    with gathered:
        print(f"rank {rank}: |W| after the first step = {weight.norm().item():.4f}", flush=True)
    with torch.no_grad(), deepspeed.zero.GatheredParameters([weight], modifier_rank=0, enabled=cli.stage == 3):
        weight.zero_()
    engine.backward(engine(inputs).pow(2).sum())
    engine.step()
    with gathered:
        print(f"rank {rank}: |W| after zeroing it and one more step = {weight.norm().item():.4f}", flush=True)


if __name__ == "__main__":
    main()
