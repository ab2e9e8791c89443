"""What FSDP2 (`fully_shard`) gives each rank of a weight, on CPU (gloo): docs/fsdp2_findings.md, section 3.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 bench/fsdp2_shards.py

Prints per rank: the local rows of a parameter and of its gradient for 1, 3 and 4 output rows over 2 ranks (uneven
shards: `to_local()` is the unpadded view, possibly 0 rows); under `MixedPrecisionPolicy(param_dtype=bf16)` the dtype
of the sharded parameter, of its gradient and of the weight the forward sees; and the forward output after the local
float32 shards are zeroed in place (0: the sharded parameter is the only copy, so projecting it in place is enough).
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

IN_FEATURES = 5


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rank = dist.get_rank()
    for rows in (1, 3, 4):
        layer = torch.nn.Linear(IN_FEATURES, rows, bias=False)
        fully_shard(layer, mesh=mesh)
        layer(torch.randn(2, IN_FEATURES)).sum().backward()
        print(
            f"rank {rank}, {rows} rows: local parameter {tuple(layer.weight.to_local().shape)}, "
            f"local gradient {tuple(layer.weight.grad.to_local().shape)}",
            flush=True,
        )

    layer = torch.nn.Linear(IN_FEATURES, 4, bias=False)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(layer, mesh=mesh, mp_policy=policy)
    seen = {}
    layer.register_forward_pre_hook(lambda module, args: seen.update(dtype=module.weight.dtype))
    layer(torch.randn(2, IN_FEATURES)).float().sum().backward()
    print(
        f"rank {rank}, bf16 policy: sharded parameter {layer.weight.dtype}, gradient {layer.weight.grad.dtype}, "
        f"forward weight {seen['dtype']}",
        flush=True,
    )
    with torch.no_grad():
        layer.weight.to_local().zero_()
    output = layer(torch.ones(1, IN_FEATURES)).float().abs().max().item()
    print(f"rank {rank}, after zeroing the local float32 shards in place: forward output {output}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
