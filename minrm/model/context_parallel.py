"""Context parallelism (--context_parallel_size C > 1, docs/context_parallel.md): the C processes of a group take
the same rows and each holds 1/C of every row's tokens. Attention is DeepSpeed-Ulysses' (arXiv:2309.14509): an
all-to-all gives each process all the tokens of 1/C of the heads, the segment attention runs unchanged on whole
rows (padded rows too, as segments), an all-to-all gives the tokens back. The rest of a block acts token by token.
"""

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_reduce, all_to_all_single
from transformers import AttentionInterface, PreTrainedModel

from minrm.checks import check_context_parallel
from minrm.config import fail
from minrm.data.batching import PackedLayout, Segment
from minrm.model.attention import segment_attention

CONTEXT = "minrm_context_parallel"  # the name its attention is registered under


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter: int, gather: int) -> torch.Tensor:
    """Cut dim `scatter` of `x` in C parts, send part j to process j, and lay the parts received end to end
    along dim `gather`, in the group's rank order. Differentiable: its backward is the inverse all-to-all."""
    send = torch.stack(x.chunk(group.size(), scatter))  # (C, ...): part j for process j
    return torch.cat(all_to_all_single(torch.empty_like(send), send, group=group).unbind(0), gather)


def ulysses_attention(module, query, key, value, attention_mask, group=None, scaling=None, **kwargs):
    """`segment_attention` of (1, heads, L/C, head_dim) on each process run on the whole row, (1, heads/C, L,
    head_dim). Key/value heads that the C processes cannot share evenly are repeated to the query heads first."""
    if key.shape[1] % group.size():
        key, value = (t.repeat_interleave(query.shape[1] // key.shape[1], 1) for t in (key, value))
    query, key, value = (all_to_all(t, group, scatter=1, gather=2) for t in (query, key, value))
    out, _ = segment_attention(module, query, key, value, None, scaling, **kwargs)  # (1, L, heads/C, head_dim)
    return all_to_all(out, group, scatter=1, gather=2), None  # (1, L/C, heads, head_dim)


def split_sequences(model: PreTrainedModel, group: dist.ProcessGroup, packed_attention: str = "auto") -> None:
    """Run `model` (its forward is `reward_forward`) context-parallel over `group`, if its attention allows."""
    check_context_parallel(model.config, group.size(), packed_attention)
    if not model.is_backend_compatible():
        fail(f"context_parallel_size {group.size()}", f"{type(model).__name__} cannot swap its attention function")
    AttentionInterface.register(CONTEXT, functools.partial(ulysses_attention, group=group))
    model.set_attn_implementation(CONTEXT)
    model.forward = functools.partial(forward_share, model.forward, group)


def forward_share(forward, group, input_ids, last_index, attention_mask=None, position_ids=None, packed_layout=None):
    """`forward` (reward_forward) on this process's tokens [p x share, (p + 1) x share) of the batch as one packed row
    (each padded row a segment; then up to C x share, a segment read by nothing). Returns every reward (R,)."""
    (n, t), c, p = input_ids.shape, group.size(), group.rank()
    if packed_layout is None:
        packed_layout = PackedLayout([Segment(i * t, (i + 1) * t) for i in range(n)])
        position_ids = torch.arange(t, device=input_ids.device).repeat(n)
    share = -(-n * t // c)
    if pad := share * c - n * t:
        packed_layout = PackedLayout(packed_layout.segments + [Segment(n * t, share * c)])
    ids, positions = (F.pad(x.view(1, -1), (0, pad))[:, p * share : (p + 1) * share] for x in (input_ids, position_ids))
    mine = last_index // share == p  # the sequences whose last token this process holds
    rewards = torch.zeros(len(last_index), device=input_ids.device)
    rewards = rewards.index_put((mine,), forward(ids, last_index[mine] - p * share, None, positions, packed_layout))
    # The group's sum is every reward (the others add zeros), so each process computes the same loss. Its
    # backward sums the C processes' gradients of a reward into the process that computed it: as each counts
    # its rows in the loss's denominator (train.forward_backward), the C of them make the gradient once.
    return all_reduce(rewards, group=group)
