"""FSDP2 sharding: one unit per transformer block, one for the score head, then the root; the
skeleton filled from rank 0's weights; and which shards a rank counts in a sum over all ranks.
"""

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate

from minrm.distributed import Dist


def shard_model(model: torch.nn.Module, layers: torch.nn.ModuleList, d: Dist, mixed_precision: str | None) -> str:
    """FSDP2: one unit per transformer block, one for the score head, then the root; returns a log line.

    The root unit owns what no other unit owns: the embeddings and the final norm. They are
    gathered in the root's pre-forward hook, which is why the reward is computed inside the root
    module's forward (see `model.py`). `mixed_precision` (--mixed_precision; None: bf16 with CUDA,
    no otherwise) "bf16" gathers parameters in bf16 for compute and reduce-scatters gradients in
    fp32 into fp32 shards: master weights and AdamW state stay fp32. The score head is gathered in
    fp32 whatever the policy, so rewards are not rounded to bf16 (its input is cast up: R x H).
    """
    precision = mixed_precision or ("bf16" if d.device.type == "cuda" else "no")
    if precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    # The last block and the head stay gathered after the forward: their backward runs first (torchtitan's rule).
    for i, block in enumerate(layers):
        fully_shard(block, mesh=d.mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    fully_shard(model.score, mesh=d.mesh, mp_policy=fp32, reshard_after_forward=False)
    fully_shard(model, mesh=d.mesh, mp_policy=mp)
    kind = "HSDP (replicate x shard)" if d.mesh.ndim == 2 else "FSDP"
    return f"shard: {kind} over {d.world_size} processes, --mixed_precision {precision}"


@torch.no_grad()
def fill_from_rank0(model: torch.nn.Module, full: torch.nn.Module | None, d: Dist) -> None:
    """Give the sharded skeleton (built on the meta device) storage on the device, then the weights
    of `full`, the model rank 0 read (`model.read_model`; None on the other ranks, which never hold
    the model whole).

    DCP's broadcast sends one tensor at a time and each rank keeps its shard of it. Non-persistent
    buffers (e.g. rotary `inv_freq`) are in no state dict: they are broadcast whole, as rank 0
    computed them when it built its model.
    """
    model.to_empty(device=d.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full.state_dict() if d.is_main else {}, options=options)
    persistent = model.state_dict().keys()
    for name, buffer in model.named_buffers():
        if name not in persistent:
            if d.is_main:
                buffer.copy_(full.get_buffer(name))
            dist.broadcast(buffer, src=0)


def counted_shards(tensors) -> list[torch.Tensor]:
    """The local shards of `tensors` that this rank counts, so that a sum over all ranks counts every
    value once: FSDP's shards are disjoint, and under HSDP each node holds a replica of them, of
    which only the first replica's ranks count."""
    out = []
    for t in tensors:
        if isinstance(t, DTensor):
            coordinate = t.device_mesh.get_coordinate()
            if any(isinstance(how, Replicate) and i != 0 for how, i in zip(t.placements, coordinate)):
                continue
            t = t.to_local()
        out.append(t)
    return out
