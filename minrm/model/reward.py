"""The reward model: a Hugging Face `*ForSequenceClassification` with one output, dropout off, a
re-drawn score head, and a forward that pools at each sequence's last real token. `skeleton` builds
the model that trains (on the meta device, set up by `prepare`); `read_model` reads its weights: rank
0 broadcasts them into every rank's shards (training/sharding.py), the scorer prepares and runs it.
"""

import math
import types

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from minrm.config import TOY
from minrm.data.toy import toy_model_config, toy_tokenizer
from minrm.model.attention import SEGMENTS, PackedLayout, packed_attention_mask, use_packed_attention


def model_config(args):
    """The model's config with one output and every dropout probability zeroed (see p.3 of
    arXiv:1909.08593), before any module is built: attention modules copy these into plain
    attributes at init, out of reach of an `nn.Dropout` sweep."""
    if args.model_name_or_path == TOY:
        config = toy_model_config(len(toy_tokenizer()))  # as shipped: no <pad> yet
    else:
        kwargs = {"revision": args.model_revision, "trust_remote_code": args.trust_remote_code}
        config = AutoConfig.from_pretrained(args.model_name_or_path, num_labels=1, **kwargs)
    for cfg in (config, config.get_text_config()):
        for key, value in cfg.to_dict().items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(cfg, key, 0.0)
    return config


def _fit_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, mean_resizing: bool) -> None:
    """Room in the embeddings for an added <pad> (rows to a multiple of 8), and the pad id in the config."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        verbosity = hf_logging.get_verbosity()  # transformers warns that it draws the new rows, as read_model says
        hf_logging.set_verbosity_error()
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8, mean_resizing=mean_resizing)
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False


def skeleton(args, tokenizer: PreTrainedTokenizerBase, cuda: bool = False) -> PreTrainedModel:
    """The reward model's modules on the meta device (fp32, no storage, nothing read or drawn), set
    up to run (`prepare`)."""
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(
            model_config(args), trust_remote_code=args.trust_remote_code, dtype=torch.float32
        )
    _fit_tokenizer(model, tokenizer, mean_resizing=False)  # new rows have no values to draw from yet
    return prepare(model, args, cuda)


def read_model(args, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model with its weights, in `dtype` on the CPU (the score head in fp32, read as stored): an
    added <pad>'s embedding drawn from the old rows' mean and covariance, and the score head re-drawn
    from N(0, 1/sqrt(hidden_size + 1)) (p.11 of arXiv:2009.01325) unless --init_score_head False."""
    torch.manual_seed(args.seed)
    config = model_config(args)
    if args.model_name_or_path == TOY:
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    else:
        with torch.device("meta"):  # the class transformers picks for this config
            cls = type(AutoModelForSequenceClassification.from_config(config, trust_remote_code=args.trust_remote_code))
        # transformers loads a class's `_keep_in_fp32_modules_strict` in fp32 when the rest is in a lower
        # precision; a subclass names the head without touching the model's class.
        cls = type(cls.__name__, (cls,), {"_keep_in_fp32_modules_strict": [r"^score\."], "__module__": cls.__module__})
        model = cls.from_pretrained(
            args.model_name_or_path,
            config=config,
            revision=args.model_revision,
            trust_remote_code=args.trust_remote_code,
            dtype=dtype,  # fp32 master weights in training; FSDP2 casts to bf16 for compute (--mixed_precision)
        )
    _fit_tokenizer(model, tokenizer, mean_resizing=True)
    if args.init_score_head:
        std = 1 / math.sqrt(model.config.get_text_config().hidden_size + 1)
        generator = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            model.score.weight.normal_(0.0, std, generator=generator)
    return model


def prepare(model: PreTrainedModel, args, cuda: bool = False) -> PreTrainedModel:
    """Set a reward model up to run: dropout off, gradient checkpointing if asked, the attention that
    runs packed rows (`cuda`: FlexAttention is available), and `reward_forward`."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.batching != "padded":
        use_packed_attention(model, args.packed_attention, cuda)
    model.forward = types.MethodType(reward_forward, model)
    return model


def transformer_blocks(model: PreTrainedModel) -> nn.ModuleList:
    """The backbone's list of transformer blocks (`layers` in Llama, `h` in GPT-2, ...)."""
    n = model.config.get_text_config().num_hidden_layers
    for module in model.base_model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


def reward_forward(
    self: PreTrainedModel,
    input_ids: torch.Tensor,  # (N, T): N padded sequences, or one packed row (N = 1)
    attention_mask: torch.Tensor | None = None,  # (N, T), 1 on real tokens; None when packed
    position_ids: torch.Tensor | None = None,
    last_index: torch.Tensor | None = None,  # (R,) flat positions in the N x T tokens to read rewards at
    packed_layout: PackedLayout | None = None,  # a packed row: who attends to whom
) -> torch.Tensor:
    """Rewards (R,) in fp32: the score head on the hidden state of each sequence's last real token
    (`last_index`, else the last 1 of each row of the mask). It replaces the instance's forward
    because FSDP2 gathers the root's parameters (embeddings, final norm) around the root's call.
    Unlike the reference (README, "Where minrm differs"), the last token comes from the layout or the
    mask, not "first pad token - 1" (wrong when the pad id is in the text), and only the last hidden
    state is kept and scored at the pooled positions, not every layer's at every position."""
    extra = {}
    if packed_layout is not None:  # which attention runs it was chosen at load
        if self.config._attn_implementation == SEGMENTS:
            extra["packed_layout"] = packed_layout
        else:
            attention_mask = packed_attention_mask(self, packed_layout, input_ids.device)
    hidden = self.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **extra
    ).last_hidden_state  # (N, T, H)
    if last_index is None:
        n, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device)
        last_index = torch.arange(n, device=input_ids.device) * t + (positions * attention_mask).argmax(-1)
    pooled = hidden.flatten(0, 1)[last_index]  # (R, H), bf16 under --mixed_precision bf16
    # The head runs in its weights' dtype: fp32 under FSDP2, where it is its own unit gathered in
    # fp32 (see `shard_model`), so rewards are not rounded to bf16's 8 bits. It is only R x H.
    scores = self.score(pooled.to(self.score.weight.dtype))  # (R, 1)
    # A copy, not a view: FSDP2 hooks the root's output for its backward, and a view's hook is lost
    # to any in-place op on it.
    return scores[:, 0].to(torch.float32, copy=True)
