"""Context parallelism (--context_parallel_size C > 1, docs/context_parallel.md): the C processes of a group take
the same rows and each holds 1/C of every row's tokens. Attention is DeepSpeed-Ulysses' (arXiv:2309.14509): an
all-to-all gives each process all the tokens of 1/C of the heads, the segment attention runs unchanged on whole
rows, an all-to-all gives the tokens back. The rest of a block acts token by token, on the process's own tokens.
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
from minrm.model.attention import sdpa, segment_attention

CONTEXT = "minrm_context_parallel"  # the name its attention is registered under


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter: int, gather: int) -> torch.Tensor:
    """Cut dim `scatter` of `x` in C parts, send part j to process j, and lay the parts received end to end
    along dim `gather`, in the group's rank order. Differentiable: its backward is the inverse all-to-all."""
    send = torch.stack(x.chunk(group.size(), scatter))  # (C, ...): part j for process j
    received = all_to_all_single(torch.empty_like(send), send, group=group)
    return torch.cat(received.unbind(0), gather)


def ulysses_attention(module, query, key, value, attention_mask, group=None, scaling=None, **kwargs):
    """Attention over (N, heads, L/C, head_dim) on each process, as the whole rows (N, heads/C, L, head_dim) run
    it: a packed row by `segment_attention`, padded rows causally (right padding: no real token sees a pad).
    Key/value heads that the C processes cannot share evenly are repeated to the query heads first."""
    if key.shape[1] % group.size():
        key, value = (t.repeat_interleave(query.shape[1] // key.shape[1], 1) for t in (key, value))
    query, key, value = (all_to_all(t, group, scatter=1, gather=2) for t in (query, key, value))
    if kwargs.get("packed_layout") is not None:
        out, _ = segment_attention(module, query, key, value, None, scaling, **kwargs)
    else:
        out = sdpa(query, key, value, kwargs.get("sliding_window"), scaling).transpose(1, 2)
    return all_to_all(out, group, scatter=1, gather=2), None  # (N, L/C, heads, head_dim)


def split_sequences(model: PreTrainedModel, group: dist.ProcessGroup, packed_attention: str = "auto") -> None:
    """Run `model` (its forward is `reward_forward`) context-parallel over `group`; refuses, in one line, a model
    whose attention the scheme does not cover."""
    check_context_parallel(model.config, group.size(), packed_attention)
    if not model.is_backend_compatible():
        fail(f"context_parallel_size {group.size()}", f"{type(model).__name__} cannot swap its attention function")
    AttentionInterface.register(CONTEXT, functools.partial(ulysses_attention, group=group))
    model.set_attn_implementation(CONTEXT)
    model.forward = functools.partial(forward_share, model.forward, group)


def forward_share(forward, group, input_ids, last_index, attention_mask=None, position_ids=None, packed_layout=None):
    """`forward` (reward_forward) on this process's share of the tokens of every row (N, T): the rows padded
    to C x share tokens (a packed row's padding is a segment of its own, read by nothing), then tokens
    [p x share, (p + 1) x share) with their positions. Returns every sequence's reward (R,)."""
    c, p = group.size(), group.rank()
    n, t = input_ids.shape
    share = -(-t // c)
    if position_ids is None:  # padded rows: positions 0, 1, ... (padding on the right)
        position_ids = torch.arange(t, device=input_ids.device).expand(n, t)
    if packed_layout is not None and share * c > t:
        packed_layout = PackedLayout(packed_layout.segments + [Segment(t, share * c)])
    ids, positions = (F.pad(x, (0, share * c - t))[:, p * share : (p + 1) * share] for x in (input_ids, position_ids))
    row, column = last_index // t, last_index % t
    mine = column // share == p  # the sequences whose last token this process holds
    local_index = row[mine] * share + column[mine] - p * share
    rewards = torch.zeros(len(last_index), device=input_ids.device)
    rewards = rewards.index_put((mine,), forward(ids, local_index, None, positions, packed_layout))
    # The group's sum is every reward (the others add zeros), so each process computes the same loss. Its
    # backward sums the C processes' gradients of a reward into the process that computed it: as each counts
    # its rows in the loss's denominator (train.forward_backward), the C of them make the gradient once.
    return all_reduce(rewards, group=group)
