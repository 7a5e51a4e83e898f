"""Attention over packed rows (docs/batching.md). Three ways, chosen once at load:
- GPU: FlexAttention with a block mask built from the segments (never L x L).
- elsewhere: `segment_attention`, SDPA on each sequence's own span of the row (varlen attention).
- a model that cannot swap its attention function: a dense L x L mask through its own attention.

A packed row carries `segments` (`batching.collate`): who attends to whom, as (q_start, q_end,
key spans) per span of queries (`batching.segment_keys` says which forms run).
"""

import bisect

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoConfig, PreTrainedModel

from minrm import toy
from minrm.batching import query_key_ranges, segment_keys, to_device
from minrm.distributed import print0

SEGMENTS = "minrm_segments"
BLOCK = 128  # FlexAttention's tile: the block mask lists which BLOCK x BLOCK tiles to compute


def segment_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, segments=None, **kwargs):
    """Attention over a packed row, one segment at a time: query, key, value (1, heads, L, head_dim).

    `segments` lists (q_start, q_end, key_spans): the queries [q_start, q_end) attend to the keys
    of `key_spans` laid end to end, causally with the last query aligned to the last key. A packed
    sequence is (s, e, ((s, e),)); in shared_prefix the rejected response is
    (a, b, ((s, s + prompt), (a, b))): its prompt and itself, not the chosen response between. The
    query spans cover the row in order, so the outputs concatenate back into it. Attention is
    computed only inside spans: sum(l^2) work instead of L^2, and no L x L mask.
    """
    if segments is None:
        raise ValueError(f"attention {SEGMENTS!r} needs the `segments` of a packed batch (batching.collate)")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            "packed batching cannot run logit softcapping or attention sinks; use --batching padded"
        )
    window = kwargs.get("sliding_window")
    groups = query.shape[1] // key.shape[1]
    # Views from one split per tensor: slicing each segment out of the whole row instead gives
    # every segment a row-sized gradient to zero and add in the backward (segments x L work).
    sizes = [q1 - q0 for q0, q1, _ in segments]
    starts = [q0 for q0, _, _ in segments]
    queries, keys, values = (t.split(sizes, 2) for t in (query, key, value))
    outputs = []
    for (q0, q1, spans), q in zip(segments, queries):
        k, v = _gather(keys, starts, spans), _gather(values, starts, spans)
        nq, nk = q1 - q0, k.shape[2]
        mask = None  # plain causal
        if nq != nk or (window is not None and nk > window):
            j = torch.arange(nk, device=query.device)
            i = torch.arange(nk - nq, nk, device=query.device)[:, None]  # each query's position among the keys
            mask = (j <= i) if window is None else (j <= i) & (j > i - window)
            if groups > 1:  # with a mask and grouped heads, SDPA on CUDA falls back to its math kernel
                k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=k.shape[1] != q.shape[1]
        )
        outputs.append(out.transpose(1, 2))
    return torch.cat(outputs, 1), None  # (1, L, heads, head_dim), contiguous


def _gather(parts: tuple[torch.Tensor, ...], starts: list[int], spans: tuple) -> torch.Tensor:
    """The keys (or values) of `spans` laid end to end, from the row split at the segments' starts:
    a part itself when a span is one, else views into the parts, joined."""
    pieces = []
    for a, b in spans:
        j = bisect.bisect_right(starts, a) - 1
        while a < b:
            p0, p1 = starts[j], starts[j] + parts[j].shape[2]
            cut = min(b, p1)
            pieces.append(parts[j] if (a, cut) == (p0, p1) else parts[j][:, :, a - p0 : cut - p0])
            a, j = cut, j + 1
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 2)


AttentionInterface.register(SEGMENTS, segment_attention)


def use_packed_attention(model: PreTrainedModel, choice: str = "auto", cuda: bool = False, log: bool = True) -> None:
    """Switch the backbone to the attention that runs packed rows (--packed_attention): `auto` takes
    FlexAttention on GPU where its kernel runs the model (`check_flex`) and `segment_attention`
    elsewhere, falling back to `mask` (a dense L x L mask through the model's own attention) for a
    model that cannot swap its attention function. `log`: say which (on rank 0)."""
    say = print0 if log else lambda message: None
    config = model.config.get_text_config()
    if problem := packing_problem(config):
        raise SystemExit(f"minrm: error: {config.model_type} {problem}; use --batching padded")
    mixed = mask_window(config) == "mixed"  # per-layer windows: only segment_attention has them
    no_flex = check_flex(config, choice, cuda)
    if choice == "auto":
        names = (["flex_attention"] if cuda and not mixed and not no_flex else []) + [SEGMENTS]
    else:
        names = {"flex_attention": ["flex_attention"], "segments": [SEGMENTS], "mask": []}[choice]
    for name in names:
        try:
            model.set_attn_implementation(name)
        except (ImportError, ValueError) as e:
            say(f"model: attention {name} unavailable ({e})")
        if model.config._attn_implementation == name:
            why = f" (not flex_attention: {no_flex})" if choice == "auto" and no_flex else ""
            say(f"model: packed rows run attention {name}{why}")
            return
    if choice not in ("auto", "mask") or mixed:
        why = "mixes sliding-window and full attention layers, which one mask cannot express" if mixed else ""
        raise SystemExit(
            f"minrm: error: --packed_attention {choice}: {config.model_type} {why or 'cannot run it'}; "
            "use --packed_attention auto or --batching padded"
        )
    say(f"model: packed rows use a dense L x L mask with attention {model.config._attn_implementation}")


def check_flex(config, choice: str, cuda: bool) -> str | None:
    """Why FlexAttention cannot run this model here (None when it can), and a `flex_attention`
    choice (--packed_attention) that cannot run refused. Inductor's CUDA lowering
    (`torch/_inductor/kernel/flex/flex_attention.py`) refuses query/key or value heads of fewer
    than 16 dims (`tl.dot`); it pads other sizes up to a power of two and runs fp32, bf16 and fp16
    alike. Its CPU lowering runs any size."""
    config = config.get_text_config()
    qk = getattr(config, "qk_head_dim", None)  # multi-head latent attention: its own query/key size
    qk = qk or getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    smallest = min(qk, getattr(config, "v_head_dim", None) or qk)
    if not cuda or smallest >= 16:
        return None
    problem = f"{config.model_type} has attention heads of {smallest} dims; FlexAttention's GPU kernel needs 16 or more"
    if choice == "flex_attention":
        raise SystemExit(f"minrm: error: --packed_attention flex_attention: {problem}; use auto or segments")
    return problem


def packing_problem(config) -> str | None:
    """Why packed rows cannot run this model (None when they can)."""
    config = config.get_text_config()
    if getattr(config, "attn_logit_softcapping", None):  # Gemma 2
        return "softcaps its attention logits, which the packed attentions do not"
    if config.model_type == "gpt_oss":  # sink logits per head, and layers that mix windows
        return "has attention sinks, which the packed attentions do not run with its mixed sliding layers"
    return None


def check_packing(args) -> None:
    """Refuse at start, from the model's config alone and before any data is built, a model that
    --batching packed / shared_prefix (or --packed_attention flex_attention on GPU) cannot run."""
    if args.batching == "padded" or args.model_name_or_path == toy.TOY:
        return
    config = AutoConfig.from_pretrained(
        args.model_name_or_path, revision=args.model_revision, trust_remote_code=args.trust_remote_code
    )
    if problem := packing_problem(config):
        raise SystemExit(
            f"minrm: error: --batching {args.batching}: {config.model_type} {problem}; use --batching padded"
        )
    check_flex(config, args.packed_attention, torch.cuda.is_available())


def mask_window(config) -> int | str | None:
    """The sliding window one mask for every layer must apply: the config's when all layers slide,
    None when none does, "mixed" when some layers slide and others attend in full."""
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or ["sliding_attention"])
    if window is None or kinds == {"sliding_attention"}:
        return window
    return "mixed" if "sliding_attention" in kinds else None


def packed_attention_mask(
    model: PreTrainedModel, segments: list[tuple], device: torch.device, key_ranges: torch.Tensor | None = None
):
    """The mask of a packed row on `device`, from its `segments` and their `key_ranges` (3, L) per
    query (the batch's, already on the device; else built here): query q sees key k when k is not
    after q and k is in q's own sequence (a rejected response: in its own response or in its shared
    prompt), so no token sees another sequence, nor a rejected response the chosen one beside it;
    with a sliding window, only keys fewer than `sliding_window` positions back (a mask given whole
    replaces the model's own window).

    With FlexAttention a BlockMask whose block lists come from the spans (`block_lists`), never an
    L x L mask; otherwise a dense (1, 1, L, L) mask for SDPA (bool) or eager (additive float).
    Transformers passes a 4-D mask to the attention functions as it is.
    """
    if key_ranges is None:
        key_ranges = to_device(query_key_ranges(segments), device)
    window = mask_window(model.config.get_text_config())
    allowed = mask_rule(key_ranges, window)
    L = key_ranges.shape[1]
    if model.config._attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import BlockMask

        lists = [to_device(torch.from_numpy(t)[None, None], device) for t in block_lists(segments, L, window)]
        return BlockMask.from_kv_blocks(*lists, BLOCK_SIZE=BLOCK, mask_mod=allowed, seq_lengths=(L, L))
    idx = torch.arange(L, device=device)
    mask = allowed(None, None, idx[:, None], idx[None, :])[None, None]  # (1, 1, L, L)
    if model.config._attn_implementation == "sdpa":
        return mask
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)


def mask_rule(key_ranges: torch.Tensor, window: int | None):
    """Whether query q may see key k, per token (a FlexAttention mask_mod)."""
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


def block_lists(segments: list[tuple], L: int, window: int | None) -> tuple[np.ndarray, ...]:
    """FlexAttention's block lists for a packed row (BLOCK x BLOCK tiles of the L x L attention),
    worked out from the spans alone: O((L / BLOCK)^2) memory and time, never O(L^2). A tile is
    `full` when every (query, key) pair in it is allowed (computed without the mask), `partial` when
    only some are (the mask is applied). Returns partial counts (1 row per query tile), partial
    columns, full counts, full columns, as `BlockMask.from_kv_blocks` takes them."""
    n = -(-L // BLOCK)
    touched = np.zeros((n, n), dtype=bool)
    full_rows = np.zeros((n, n), dtype=np.int32)  # per tile: its rows that see every key of it
    w = window or L  # no window: every distance in the row is below L
    for q0, q1, spans in segments:
        own, start, end = segment_keys((q0, q1, spans))
        gap = own - end  # the shared span's keys are this much nearer than the row says
        for t in range(q0 // BLOCK, (q1 - 1) // BLOCK + 1):
            p0, p1 = max(q0, t * BLOCK), min(q1, (t + 1) * BLOCK)  # the segment's rows in tile row t
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
