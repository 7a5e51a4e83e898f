"""The reward model: a Hugging Face `*ForSequenceClassification` with one output, dropout off, a
re-drawn score head, and a forward that pools at each sequence's last real token. Training builds it
on the meta device (`skeleton`), shards it with FSDP2 (`shard_model`) and fills the shards from the
weights rank 0 reads (`read_model`, `fill_from_rank0`); the scorer reads and runs it whole.
"""

import math
import types

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from minrm.config import TOY
from minrm.data.batching import PackedLayout
from minrm.data.toy import toy_tokenizer
from minrm.distributed import Dist
from minrm.model import context_parallel
from minrm.model.attention import SEGMENTS, packed_attention_mask, use_packed_attention


def toy_model_config(vocab_size: int) -> LlamaConfig:
    """A ~100k-parameter Llama (GQA: 4 heads on 2), big enough for the copy check, fast on CPU; ids as in
    toy_tokenizer. Its init std 0.1 is 5x Llama's: from 0.02 the token-matching attention takes epochs."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        num_labels=1, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )  # fmt: skip


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


def skeleton(args, tokenizer: PreTrainedTokenizerBase, cuda: bool = False, context=None) -> PreTrainedModel:
    """The reward model's modules on the meta device (fp32, no storage, nothing read or drawn), set
    up to run (`prepare`)."""
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(
            model_config(args), trust_remote_code=args.trust_remote_code, dtype=torch.float32
        )
    _fit_tokenizer(model, tokenizer, mean_resizing=False)  # new rows have no values to draw from yet
    return prepare(model, args, cuda, context)


def read_model(args, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model with its weights, in `dtype` on the CPU with the score head in fp32 (a bf16 head rounds
    every reward to bf16: ties), as the reference reads it (`from_pretrained(num_labels=1)`): an added
    <pad>'s embedding drawn from the old rows' mean and covariance, and the score head re-drawn from
    N(0, 1/sqrt(hidden_size + 1)) (p.11 of arXiv:2009.01325) unless --init_score_head False."""
    torch.manual_seed(args.seed)
    config, cls = model_config(args), AutoModelForSequenceClassification
    if args.model_name_or_path == TOY:
        model = cls.from_config(config, dtype=torch.float32)
    else:
        if dtype != torch.float32:  # the scorer's bf16 read: transformers keeps `_keep_in_fp32_modules_strict` in fp32
            with torch.device("meta"):  # the class transformers picks, subclassed to name the head
                base = type(cls.from_config(config, trust_remote_code=args.trust_remote_code))
            keep = {"_keep_in_fp32_modules_strict": [r"^score\."], "__module__": base.__module__}
            cls = type(base.__name__, (base,), keep)
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


def prepare(model: PreTrainedModel, args, cuda: bool = False, context=None) -> PreTrainedModel:
    """Set a reward model up to run: dropout off, gradient checkpointing if asked, the attention for packed
    rows (`cuda`: FlexAttention is available), `reward_forward`; context parallel over the group `context`."""
    for module in model.modules():  # an nn.Dropout its code builds with a fixed p; the config's are 0 already
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.batching != "padded" and context is None:
        use_packed_attention(model, args.packed_attention, cuda)
    model.forward = types.MethodType(reward_forward, model)
    if context is not None:  # each process runs 1/C of every row's tokens (model/context_parallel.py)
        context_parallel.split_sequences(model, context, args.packed_attention)
    return model


# ----------------------------------------------------------------------------------------------
# FSDP2: the model sharded over the processes, then filled from rank 0's weights


def shard_model(model: PreTrainedModel, d: Dist, mixed_precision: str | None) -> str:
    """FSDP2: one unit per transformer block, one for the score head, then the root, which owns the embeddings
    and final norm and gathers them in its pre-forward hook (so the reward is computed in the root's forward).
    --mixed_precision bf16 (None: bf16 with CUDA) gathers parameters in bf16 and reduce-scatters gradients
    into fp32 shards: master weights and AdamW state stay fp32. Returns a log line."""
    precision = mixed_precision or ("bf16" if d.device.type == "cuda" else "no")
    low = torch.bfloat16 if precision == "bf16" else None
    mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None)
    # The last block and the head stay gathered after the forward: their backward runs first (torchtitan's rule).
    layers = transformer_blocks(model)
    for i, block in enumerate(layers):
        fully_shard(block, mesh=d.mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    # The head is gathered in fp32 whatever the policy: rewards are not rounded to bf16 (its R x H input is cast up).
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    fully_shard(model.score, mesh=d.mesh, mp_policy=fp32, reshard_after_forward=False)
    fully_shard(model, mesh=d.mesh, mp_policy=mp)
    # FSDP sums the ranks' gradients instead of averaging them: the loss is divided by the step's rows
    # over all ranks where it is computed (train.forward_backward), so the gradient is the mean's.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain sums (gloo has no pre-scaled sum)
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
    last_index: torch.Tensor,  # (R,) flat positions in the N x T tokens to read rewards at
    attention_mask: torch.Tensor | None = None,  # (N, T), 1 on real tokens; None when packed
    position_ids: torch.Tensor | None = None,
    packed_layout: PackedLayout | None = None,  # a packed row: who attends to whom
) -> torch.Tensor:
    """Rewards (R,) in fp32: the score head on the hidden state of each sequence's last token
    (`last_index`, from the collator). It replaces the instance's forward because FSDP2 gathers the
    root's parameters (embeddings, final norm) around the root's call. Unlike the reference (README,
    "Where minrm differs"), the last token comes from each sequence's length, not "first pad token - 1"
    (wrong when the pad id is in the text), and only the last hidden state is kept and scored at the
    pooled positions, not every layer's at every position."""
    extra = {}
    if packed_layout is not None:  # which attention runs it was chosen at load
        if self.config._attn_implementation in (SEGMENTS, context_parallel.CONTEXT):
            extra["packed_layout"] = packed_layout
        else:
            attention_mask = packed_attention_mask(self, packed_layout, input_ids.device)
    hidden = self.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **extra
    ).last_hidden_state  # (N, T, H)
    pooled = hidden.flatten(0, 1)[last_index]  # (R, H), bf16 under --mixed_precision bf16
    # The head runs in its weights' dtype: fp32 under FSDP2, where it is its own unit gathered in
    # fp32 (see `shard_model`), so rewards are not rounded to bf16's 8 bits. It is only R x H.
    scores = self.score(pooled.to(self.score.weight.dtype))  # (R, 1)
    # A copy, not a view: FSDP2 hooks the root's output for its backward, and a view's hook is lost
    # to any in-place op on it.
    return scores[:, 0].to(torch.float32, copy=True)
