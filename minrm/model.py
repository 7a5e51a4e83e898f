"""The reward model: a Hugging Face `*ForSequenceClassification` with one output, dropout off, a
re-drawn score head, and a forward that pools at the last real token of each sequence.
"""

import math
import types

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from minrm import toy
from minrm.packed_attention import SEGMENTS, packed_attention_mask, use_packed_attention


def _no_dropout(config) -> None:
    """Zero every dropout probability of the config, before the model is built from it: modules such
    as attention copy these into plain attributes at init, out of reach of an `nn.Dropout` sweep."""
    for cfg in (config, config.get_text_config()):
        for key, value in cfg.to_dict().items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(cfg, key, 0.0)


def load_model(args, tokenizer: PreTrainedTokenizerBase, meta: bool = False) -> PreTrainedModel:
    """Build the reward model on CPU in fp32 (everything random is seeded), or with `meta` its
    skeleton: the same modules, config and shapes on the meta device, with no storage, nothing read
    and nothing drawn. Training builds the skeleton on every rank and shards it; rank 0 alone builds
    the real model, whose weights `distributed.fill_from_rank0` then broadcasts into the shards."""
    torch.manual_seed(args.seed)
    if args.model_name_or_path == toy.TOY:
        config = toy.toy_model_config(len(toy.toy_tokenizer()))  # as shipped: no <pad> yet
    else:
        config = AutoConfig.from_pretrained(
            args.model_name_or_path,
            revision=args.model_revision,
            trust_remote_code=args.trust_remote_code,
            num_labels=1,
        )
    _no_dropout(config)
    if meta or args.model_name_or_path == toy.TOY:  # no storage at all, or the toy's seeded init
        with torch.device("meta" if meta else "cpu"):
            model = AutoModelForSequenceClassification.from_config(
                config, trust_remote_code=args.trust_remote_code, dtype=torch.float32
            )
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            args.model_name_or_path,
            config=config,
            revision=args.model_revision,
            trust_remote_code=args.trust_remote_code,
            dtype=torch.float32,  # fp32 master weights; FSDP2 casts to bf16 for compute (--mixed_precision)
        )
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:  # the added <pad>
        # transformers draws the new rows from the old rows' mean and covariance: values the
        # skeleton does not have, and does not need (only the shape).
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8, mean_resizing=not meta)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    for module in model.modules():  # see p.3 of arXiv:1909.08593
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if args.init_score_head and not meta:  # see p.11 of arXiv:2009.01325
        std = 1 / math.sqrt(model.config.get_text_config().hidden_size + 1)
        generator = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            model.score.weight.normal_(0.0, std, generator=generator)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.batching != "padded":  # said once, for the skeleton that trains (rank 0 also reads a full model)
        use_packed_attention(model, args.packed_attention, torch.cuda.is_available(), log=meta)
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
    key_ranges: torch.Tensor | None = None,  # (3, T) packed batches: the same per query (batching.query_key_ranges)
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
            attention_mask = packed_attention_mask(self, segments, input_ids.device, key_ranges)
    hidden = backbone(self)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **extra
    ).last_hidden_state  # (N, T, H)
    if last_index is None:
        n, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device)
        rightmost = (positions * attention_mask).argmax(-1)  # the rightmost 1 of each row's mask
        last_index = torch.arange(n, device=input_ids.device) * t + rightmost
    pooled = hidden.flatten(0, 1)[last_index]  # (R, H), bf16 under --mixed_precision bf16
    # The head runs in its weights' dtype: fp32 under FSDP2, where it is its own unit gathered in
    # fp32 (see `shard_model`), so rewards are not rounded to bf16's 8 bits. It is only R x H.
    return self.score(pooled.to(self.score.weight.dtype)).squeeze(-1).float()
