"""FSDP2 sharding of the reward model, and the skeleton filled from rank 0's weights."""

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from minrm.distributed import Dist


def shard_model(model: torch.nn.Module, layers: torch.nn.ModuleList, d: Dist, mixed_precision: str | None) -> str:
    """FSDP2: one unit per transformer block, one for the score head, then the root, which owns the embeddings
    and final norm and gathers them in its pre-forward hook (so the reward is computed in the root's forward).
    --mixed_precision bf16 (None: bf16 with CUDA) gathers parameters in bf16 and reduce-scatters gradients
    into fp32 shards: master weights and AdamW state stay fp32. Returns a log line."""
    precision = mixed_precision or ("bf16" if d.device.type == "cuda" else "no")
    low = torch.bfloat16 if precision == "bf16" else None
    mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None)
    # The last block and the head stay gathered after the forward: their backward runs first (torchtitan's rule).
    for i, block in enumerate(layers):
        fully_shard(block, mesh=d.mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    # The head is gathered in fp32 whatever the policy: rewards are not rounded to bf16 (its R x H input is cast up).
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    fully_shard(model.score, mesh=d.mesh, mp_policy=fp32, reshard_after_forward=False)
    fully_shard(model, mesh=d.mesh, mp_policy=mp)
    kind = "HSDP (replicate x shard)" if d.mesh.ndim == 2 else "FSDP"
    return f"shard: {kind} over {d.world_size} processes, --mixed_precision {precision}"


@torch.no_grad()
def fill_from_rank0(model: torch.nn.Module, full: torch.nn.Module | None, d: Dist) -> None:
    """Give the sharded skeleton (built on the meta device) storage, then the weights of `full`, the model
    rank 0 read (None elsewhere). DCP broadcasts one tensor at a time, each rank keeping its shard."""
    model.to_empty(device=d.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full.state_dict() if d.is_main else {}, options=options)
    # Non-persistent buffers (e.g. rotary `inv_freq`) are in no state dict: broadcast whole, as rank 0 built them.
    persistent = model.state_dict().keys()
    for name, buffer in model.named_buffers():
        if name not in persistent:
            if d.is_main:
                buffer.copy_(full.get_buffer(name))
            dist.broadcast(buffer, src=0)


