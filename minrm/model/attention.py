"""Attention over packed rows (docs/batching.md): who attends to whom (`PackedLayout`), and the
attention that runs it, chosen once at load (`use_packed_attention`): FlexAttention with a block mask
from the segments on GPU, `segment_attention` (segment by segment) elsewhere, or a dense L x L mask
through the model's own attention for a model that cannot swap its attention function.
"""

import numpy as np
import torch
import torch._dynamo
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface, PreTrainedModel

from minrm.checks import SEGMENTS, mask_window, packed_attentions
from minrm.config import fail
from minrm.data.batching import PackedLayout
from minrm.distributed import print0

BLOCK = 128  # FlexAttention's tile: the block mask lists which BLOCK x BLOCK tiles to compute


def segment_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over a packed row (1, heads, L, head_dim), segment by segment: each segment's queries
    attend causally to the shared prompt's keys and their own, laid end to end, in one SDPA call.
    sum(l^2) work, not L^2."""
    layout, window = kwargs["packed_layout"], kwargs.get("sliding_window")  # a packed batch's (batching.collate)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("packed rows cannot run logit softcapping or attention sinks; use --batching padded")
    # Views from one split per tensor: slicing each segment out of the whole row instead gives
    # every segment a row-sized gradient to zero and add in the backward (segments x L work).
    queries, keys, values = (t.split(layout.sizes, 2) for t in (query, key, value))
    outputs = []
    for s, q, k, v in zip(layout.segments, queries, keys, values):
        if s.shared_end > s.shared_start:  # the shared prompt's keys first, from the segment it begins
            prompt, n = layout.at[s.shared_start], s.shared_end - s.shared_start
            k, v = torch.cat([keys[prompt][:, :, :n], k], 2), torch.cat([values[prompt][:, :, :n], v], 2)
        outputs.append(sdpa(q, k, v, window, scaling).transpose(1, 2))
    return torch.cat(outputs, 1), None  # (1, L, heads, head_dim)


def sdpa(q, k, v, window: int | None, scaling: float | None) -> torch.Tensor:
    """SDPA of a segment's queries on its keys, the last query at the last key: causal from the lower
    right (torch's bias, no mask built), or a mask when a sliding window cuts the keys."""
    nq, nk = q.shape[2], k.shape[2]
    mask = causal_lower_right(nq, nk) if nq != nk else None
    if window is not None and nk > window:
        place = torch.arange(nq, device=q.device)[:, None] + nk - nq  # each query's place among the keys
        distance = place - torch.arange(nk, device=q.device)
        mask = (distance >= 0) & (distance < window)
    gqa = k.shape[1] != q.shape[1]
    if isinstance(mask, torch.Tensor) and gqa and q.is_cuda:  # else CUDA's SDPA falls back to its math kernel
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
        gqa = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=gqa
    )


AttentionInterface.register(SEGMENTS, segment_attention)


def use_packed_attention(model: PreTrainedModel, choice: str = "auto", cuda: bool = False, log: bool = True) -> None:
    """Switch the backbone to the attention that runs packed rows (--packed_attention; `auto`: flex on
    GPU where its kernel runs the model, else segments, else the model's own with a dense mask)."""
    say = print0 if log else lambda message: None
    names, no_flex = packed_attentions(model.config, choice, cuda)
    for name in names:
        try:
            model.set_attn_implementation(name)
        except (ImportError, ValueError) as e:
            say(f"model: attention {name} unavailable ({e})")
        if model.config._attn_implementation == name:
            if name == "flex_attention":  # past dynamo's recompile limit, eager FlexAttention builds L x L scores
                torch._dynamo.config.fail_on_recompile_limit_hit = True
            say(f"model: packed rows run attention {name}{f' (not flex_attention: {no_flex})' if no_flex else ''}")
            return
    if choice not in ("auto", "mask"):
        fail("packed_attention", f"{choice}: {model.config.model_type} cannot run it; use auto or --batching padded")
    say(f"model: packed rows use a dense L x L mask with attention {model.config._attn_implementation}")


def packed_attention_mask(model: PreTrainedModel, layout: PackedLayout, device: torch.device):
    """A packed row's mask on `device` (`mask_rule`, the window included): a BlockMask from the
    segments' tiles for FlexAttention, never L x L; a dense (1, 1, L, L) bool mask for SDPA, additive
    for eager. Transformers passes a 4-D mask to the attention functions as it is. What the mask reads
    is built on the host and copied in one transfer, from pinned memory to a GPU (no wait)."""
    window, L = mask_window(model.config.get_text_config()), layout.length
    flex = model.config._attn_implementation == "flex_attention"
    host = [layout.key_ranges(), *(torch.from_numpy(t) for t in (block_lists(layout, window) if flex else ()))]
    flat = torch.cat([t.flatten().long() for t in host])
    flat = flat.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flat
    key_ranges, *lists = (t.view(h.shape) for t, h in zip(flat.split([h.numel() for h in host]), host))
    allowed = mask_rule(key_ranges, window)
    if flex:
        from torch.nn.attention.flex_attention import BlockMask

        lists = [t.int()[None, None] for t in lists]
        return BlockMask.from_kv_blocks(*lists, BLOCK_SIZE=BLOCK, mask_mod=allowed, seq_lengths=(L, L))
    idx = torch.arange(L, device=device)
    mask = allowed(None, None, idx[:, None], idx[None, :])[None, None]  # (1, 1, L, L)
    if model.config._attn_implementation == "sdpa":
        return mask
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)


def mask_rule(key_ranges: torch.Tensor, window: int | None):
    """Whether query q may see key k, per token (a FlexAttention mask_mod), from `key_ranges` (3, L)."""
    # Copies, not views of the rows: Inductor's CPU FlexAttention fails to compile, once the row
    # length changes, a mask reading tensors with a storage offset.
    own, start, end = (r.clone() for r in key_ranges)

    def allowed(b, h, q, k):
        shared = (k >= start[q]) & (k < end[q])
        ok = ((k >= own[q]) & (k <= q)) | shared
        if window is None:
            return ok
        return ok & (q - k - shared * (own[q] - end[q]) < window)  # the distance with the spans end to end

    return allowed


def block_lists(layout: PackedLayout, window: int | None) -> tuple[np.ndarray, ...]:
    """FlexAttention's block lists of a packed row, from the segments alone (O((L / BLOCK)^2), never
    O(L^2)): a tile is `full` when every (query, key) pair in it is allowed (run without the mask),
    `partial` when some are. Partial counts and columns, full counts and columns, per query tile."""
    n = -(-layout.length // BLOCK)
    touched = np.zeros((n, n), dtype=bool)
    full_rows = np.zeros((n, n), dtype=np.int32)  # per tile: its rows that see every key of it
    w = window or layout.length  # no window: every distance in the row is below L
    for own, q1, start, end in layout.segments:
        gap = own - end  # the shared prompt's keys are this much nearer than the row says
        for t in range(own // BLOCK, (q1 - 1) // BLOCK + 1):
            p0, p1 = max(own, t * BLOCK), min(q1, (t + 1) * BLOCK)  # the segment's rows in tile row t
            # The keys of each span that some row of [p0, p1) sees, then those that all its rows see:
            # row q sees [max(own, q - w + 1), q] and [max(start, q - gap - w + 1), end - 1].
            seen = [(max(own, p0 - w + 1), p1 - 1, max(own, p1 - w), p0)]
            if end > start:
                seen.append((max(start, p0 - gap - w + 1), end - 1, max(start, p1 - gap - w), end - 1))
            for some_lo, some_hi, all_lo, all_hi in seen:
                if some_lo <= some_hi:
                    touched[t, some_lo // BLOCK : some_hi // BLOCK + 1] = True
                full_rows[t, -(-all_lo // BLOCK) : (all_hi + 1) // BLOCK] += p1 - p0
    full = full_rows == BLOCK  # as create_block_mask: a tile past L is never full
    out = []
    for tiles in (touched & ~full, full):  # per query tile: how many key tiles, then which, in order
        out += [tiles.sum(-1, dtype=np.int32), np.argsort(~tiles, axis=-1, kind="stable").astype(np.int32)]
    return tuple(out)
