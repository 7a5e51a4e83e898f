"""The reward model: a Hugging Face `*ForSequenceClassification` with one output, dropout off, a
re-drawn score head, and a forward that pools at the last real token of each sequence.
"""

import math
import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from minrm import toy
from minrm.distributed import print0


def _no_dropout(config) -> None:
    """Zero every dropout probability of the config, before the model is built from it: modules such
    as attention copy these into plain attributes at init, out of reach of an `nn.Dropout` sweep."""
    for cfg in (config, config.get_text_config()):
        for key, value in cfg.to_dict().items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(cfg, key, 0.0)


def load_model(args, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Build the model on CPU in fp32, identically on every rank (everything random is seeded)."""
    torch.manual_seed(args.seed)
    if args.model_name_or_path == toy.TOY:
        config = toy.toy_model_config(len(toy.toy_tokenizer()))  # as shipped: no <pad> yet
        _no_dropout(config)
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        config = AutoConfig.from_pretrained(
            args.model_name_or_path,
            revision=args.model_revision,
            trust_remote_code=args.trust_remote_code,
            num_labels=1,
        )
        _no_dropout(config)
        model = AutoModelForSequenceClassification.from_pretrained(
            args.model_name_or_path,
            config=config,
            revision=args.model_revision,
            trust_remote_code=args.trust_remote_code,
            dtype=torch.float32,  # fp32 master weights; FSDP2 casts to bf16 for compute on GPU
        )
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:  # the added <pad>
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    for module in model.modules():  # see p.3 of arXiv:1909.08593
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if args.init_score_head:  # see p.11 of arXiv:2009.01325
        std = 1 / math.sqrt(model.config.get_text_config().hidden_size + 1)
        generator = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            model.score.weight.normal_(0.0, std, generator=generator)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.batching != "padded":
        use_packed_attention(model, args.packed_attention, torch.cuda.is_available())
    model.forward = types.MethodType(reward_forward, model)
    return model


def backbone(model: PreTrainedModel) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def transformer_blocks(model: PreTrainedModel) -> nn.ModuleList:
    """The backbone's list of transformer blocks (`layers` in Llama, `h` in GPT-2, ...)."""
    n = model.config.get_text_config().num_hidden_layers
    for module in backbone(model).modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


def reward_forward(
    self: PreTrainedModel,
    input_ids: torch.Tensor,  # (N, T)
    attention_mask: torch.Tensor | None = None,  # (N, T), 1 on real tokens; None when packed
    position_ids: torch.Tensor | None = None,
    last_index: torch.Tensor | None = None,  # (R,) flat positions in the N x T tokens to read rewards at
    segments: list[tuple] | None = None,  # packed batches: who attends to whom (see segment_attention)
) -> torch.Tensor:
    """Rewards (R,) in fp32: the score head applied to the hidden state of each sequence's last
    real token.

    This replaces the instance's forward because FSDP2 gathers the root unit's parameters (embeddings,
    final norm, score head) in a hook around the root module's call: pooling and scoring have to
    happen inside it. Two differences from the reference (SPEC §2): the last real token comes from
    the attention mask (the reference takes "first pad token - 1", wrong when the pad id occurs in
    the text), and only the last hidden state is kept and scored at the pooled positions (the
    reference asks for every layer's hidden states and scores every position).
    """
    extra = {}
    if segments is not None:  # a packed row: which attention runs it was chosen at load
        if self.config._attn_implementation == SEGMENTS:
            extra["segments"] = segments
        else:
            attention_mask = packed_attention_mask(self, segments, position_ids)
    hidden = backbone(self)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **extra
    ).last_hidden_state  # (N, T, H)
    if last_index is None:
        n, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device)
        rightmost = (positions * attention_mask).argmax(-1)  # the rightmost 1 of each row's mask
        last_index = torch.arange(n, device=input_ids.device) * t + rightmost
    pooled = hidden.flatten(0, 1)[last_index]  # (R, H)
    return self.score(pooled).squeeze(-1).float()


# ----------------------------------------------------------------------------------------------
# Attention over packed rows (docs/batching.md). Three ways, chosen once at load:
# - GPU: FlexAttention with a block mask built from the segments (never L x L).
# - elsewhere: `segment_attention`, SDPA on each sequence's own span of the row (varlen attention).
# - a model that cannot swap its attention function: a dense L x L mask through its own attention.

SEGMENTS = "minrm_segments"


def segment_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, segments=None, **kwargs):
    """Attention over a packed row, one span at a time: query, key, value (1, heads, L, head_dim).

    `segments` lists (q_start, q_end, key_spans): the queries [q_start, q_end) attend to the keys
    of `key_spans` laid end to end, causally with the last query aligned to the last key. A packed
    sequence is (s, e, ((s, e),)); in shared_prefix the rejected response is
    (a, b, ((s, s + prompt), (a, b))): its prompt and itself, not the chosen response between. The
    spans cover the row in order, so the outputs concatenate back into it. Attention is computed
    only inside spans: sum(l^2) work instead of L^2, and no L x L mask.
    """
    if segments is None:
        raise ValueError(f"attention {SEGMENTS!r} needs the `segments` of a packed batch (data.collate)")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            "packed batching cannot run logit softcapping or attention sinks; use --batching padded"
        )
    window = kwargs.get("sliding_window")
    gqa = query.shape[1] != key.shape[1]
    outputs = []
    for q0, q1, spans in segments:
        k, v = (
            torch.cat([t[:, :, a:b] for a, b in spans], 2) if len(spans) > 1 else t[:, :, slice(*spans[0])]
            for t in (key, value)
        )
        nq, nk = q1 - q0, k.shape[2]
        mask = None  # plain causal
        if nq != nk or (window is not None and nk > window):
            j = torch.arange(nk, device=query.device)
            i = torch.arange(nk - nq, nk, device=query.device)[:, None]  # each query's position among the keys
            mask = (j <= i) if window is None else (j <= i) & (j > i - window)
        out = F.scaled_dot_product_attention(
            query[:, :, q0:q1], k, v, attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=gqa
        )
        outputs.append(out)
    return torch.cat(outputs, 2).transpose(1, 2).contiguous(), None


AttentionInterface.register(SEGMENTS, segment_attention)


def use_packed_attention(model: PreTrainedModel, choice: str = "auto", cuda: bool = False) -> None:
    """Switch the backbone to the attention that runs packed rows (--packed_attention): `auto` takes
    FlexAttention on GPU and `segment_attention` elsewhere, falling back to `mask` (a dense L x L
    mask through the model's own attention) for a model that cannot swap its attention function."""
    config = model.config.get_text_config()
    if problem := packing_problem(config):
        raise SystemExit(f"minrm: error: {config.model_type} {problem}; use --batching padded")
    mixed = mask_window(config) == "mixed"  # per-layer windows: only segment_attention has them
    if choice == "auto":
        names = (["flex_attention"] if cuda and not mixed else []) + [SEGMENTS]
    else:
        names = {"flex_attention": ["flex_attention"], "segments": [SEGMENTS], "mask": []}[choice]
    for name in names:
        try:
            model.set_attn_implementation(name)
        except (ImportError, ValueError) as e:
            print0(f"model: attention {name} unavailable ({e})")
        if model.config._attn_implementation == name:
            print0(f"model: packed rows run attention {name}")
            return
    if choice not in ("auto", "mask") or mixed:
        why = "mixes sliding-window and full attention layers, which one mask cannot express" if mixed else ""
        raise SystemExit(
            f"minrm: error: --packed_attention {choice}: {config.model_type} {why or 'cannot run it'}; "
            "use --packed_attention auto or --batching padded"
        )
    print0(f"model: packed rows use a dense L x L mask with attention {model.config._attn_implementation}")


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
    --batching packed / shared_prefix cannot run."""
    if args.batching == "padded" or args.model_name_or_path == toy.TOY:
        return
    config = AutoConfig.from_pretrained(
        args.model_name_or_path, revision=args.model_revision, trust_remote_code=args.trust_remote_code
    )
    if problem := packing_problem(config):
        raise SystemExit(
            f"minrm: error: --batching {args.batching}: {config.model_type} {problem}; use --batching padded"
        )


def mask_window(config) -> int | str | None:
    """The sliding window one mask for every layer must apply: the config's when all layers slide,
    None when none does, "mixed" when some layers slide and others attend in full."""
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or ["sliding_attention"])
    if window is None or kinds == {"sliding_attention"}:
        return window
    return "mixed" if "sliding_attention" in kinds else None


def packed_attention_mask(model: PreTrainedModel, segments: list[tuple], position_ids: torch.Tensor):
    """The mask of a packed row from its `segments`: query q sees key k when k is not after q and k
    is in q's own sequence (a rejected response: in its own response or in its shared prompt), so
    no token sees another sequence, nor a rejected response the chosen one beside it; with a
    sliding window, only keys fewer than `sliding_window` positions back (a mask given whole
    replaces the model's own window).

    With FlexAttention a BlockMask that never materialises the L x L mask (tested forward-only on
    CPU: FlexAttention has no CPU backward); otherwise a dense (1, 1, L, L) mask for SDPA (bool) or
    eager (additive float). Transformers passes a 4-D mask to the attention functions as it is.
    """
    pos, device = position_ids[0], position_ids.device
    lengths = torch.tensor([q1 - q0 for q0, q1, _ in segments], device=device)

    def per_query(values: list[int]) -> torch.Tensor:  # one value per segment -> one per query
        return torch.tensor(values, device=device).repeat_interleave(lengths)

    own = per_query([spans[-1][0] for *_, spans in segments])  # where q's own keys start
    shared = [spans[0] if len(spans) > 1 else (0, 0) for *_, spans in segments]  # a rejected response's prompt
    shared_start, shared_end = per_query([a for a, _ in shared]), per_query([b for _, b in shared])
    window = mask_window(model.config.get_text_config())

    def allowed(b, h, q, k):
        ok = (k <= q) & ((k >= own[q]) | ((k >= shared_start[q]) & (k < shared_end[q])))
        return ok if window is None else ok & (pos[q] - pos[k] < window)

    L = pos.shape[0]
    if model.config._attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(allowed, None, None, L, L, device=device)
    idx = torch.arange(L, device=device)
    mask = allowed(None, None, idx[:, None], idx[None, :])[None, None]  # (1, 1, L, L)
    if model.config._attn_implementation == "sdpa":
        return mask
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
