"""Context parallelism as the trainer runs it, for test_context_parallel.py:

    torchrun --nproc_per_node W -m tests.context_parallel_probe OUT MODEL_DIR C [C ...]

On W processes in groups of C (--context_parallel_size C), for each C and each of `CASES`: the tiny model of MODEL_DIR
sharded with FSDP2 over all W, context parallel over each group, runs `train.forward_backward` on its data
rank's share of `rows(k)` in one micro-batch. Rank 0 writes OUT/C<C>/<case>.pt: every row's rewards (in row order),
the STATS summed over all rows, and every parameter's full gradient. Then `activation_bytes` on a packed row
of 8,192 tokens of a wider model: OUT/C<C>/memory.json, the bytes each process keeps for the backward.
"""

import json
import os
import random
import sys

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoModelForSequenceClassification, LlamaConfig

from minrm.config import Args
from minrm.data.batching import collate
from minrm.distributed import init_distributed
from minrm.model.reward import prepare, shard_model
from minrm.train import forward_backward

# (name, batching, K, extra flags): every batching with pairs and with K = 4 rows, then the flags that change
# the computation's path: gradient checkpointing (with the centering term), bf16 mixed precision.
CASES = [(f"{b}_k{k}", b, k, {}) for b in ("padded", "packed", "shared_prefix") for k in (2, 4)]
CASES += [("shared_prefix_k4_checkpointing", "shared_prefix", 4, {"gradient_checkpointing": True,
                                                                   "center_rewards_coefficient": 0.01}),
          ("packed_k2_bf16", "packed", 2, {"mixed_precision": "bf16"})]  # fmt: skip


def rows(k: int, vocab: int = 40) -> list[dict]:
    """Six rows of K responses that begin with their prompt, of mixed lengths: one row holds a long last
    response (some processes then hold no sequence's last token), one a response given twice."""
    rng = random.Random(k)
    out = []
    for i in range(6):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 9))]
        tails = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))] for _ in range(k)]
        if i == 5:
            tails[-1] = [rng.randrange(3, vocab) for _ in range(300)]
        if i == 2:
            tails[1] = tails[0]
        out.append({"prompt": prompt, "responses": [prompt + t for t in tails], "scores": list(range(k, 0, -1))})
    return out


def case_args(model_dir: str, batching: str, extra: dict, c: int = 1) -> Args:
    return Args(model_name_or_path=model_dir, batching=batching, context_parallel_size=c, **extra)


def count_responses(rows_: list[dict]) -> int:
    return sum(len(r["responses"]) for r in rows_)


def run_case(d, model_dir: str, batching: str, k: int, extra: dict) -> dict:
    args = case_args(model_dir, batching, extra, d.world_size // d.data_size)
    model = prepare(AutoModelForSequenceClassification.from_pretrained(model_dir), args, context=d.context)
    shard_model(model, d, args.mixed_precision or "no")
    all_rows = rows(k)
    mine = list(range(d.data_rank, len(all_rows), d.data_size))
    inputs, prefs = collate([all_rows[i] for i in mine], model.config.pad_token_id, batching)
    # The step's rows and responses over all processes: those of a context group each count their group's.
    c = d.world_size // d.data_size
    stats = forward_backward(model, (inputs, prefs), args, c * len(all_rows), c * count_responses(all_rows))
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    with torch.no_grad():
        rewards = model(**inputs)[prefs.index].tolist()
    dist.all_reduce(stats)
    stats /= c  # each group's C processes hold the same sums
    found = [None] * d.world_size
    dist.all_gather_object(found, dict(zip(mine, rewards)))
    return {"rewards": [dict(kv for f in found for kv in f.items())[i] for i in range(len(all_rows))],
            "stats": stats.cpu(), "grads": grads}  # fmt: skip


def wide_model() -> nn.Module:
    """A small wide Llama (hidden 256, 8 heads on 4), the same weights on every process."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, num_labels=1, pad_token_id=0)  # fmt: skip
    return AutoModelForSequenceClassification.from_config(config)


def long_row() -> list[dict]:
    """A row of 8,192 tokens once packed: a prompt of 1,024 tokens and four responses of 1,024 after it."""
    rng = random.Random(0)
    prompt = [rng.randrange(3, 64) for _ in range(1024)]
    responses = [prompt + [rng.randrange(3, 64) for _ in range(1024)] for _ in range(4)]
    return [{"prompt": prompt, "responses": responses, "scores": [4, 3, 2, 1]}]


def activation_bytes(model: nn.Module, group) -> int:
    """The bytes of the tensors autograd keeps for the backward after one forward of `long_row` (each storage
    counted once, the weights left out): the activations, what context parallelism divides. Packed, not
    shared_prefix: on CPU, torch's SDPA builds and keeps an L_q x L_k mask for each segment that attends to a
    shared prompt (lower-right causal; on GPU its kernels take the bias without one), the same at any C."""
    model = prepare(model, Args(batching="packed"), context=group)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if (ptr := t.untyped_storage().data_ptr()) not in weights:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    inputs, _ = collate(long_row(), 0, "packed")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(kept.values())


def main(out: str, model_dir: str, sizes: list[int]) -> None:
    for c in sizes:  # the group of every process is formed once; each C groups it anew
        d = init_distributed(None, c)
        os.makedirs(folder := os.path.join(out, f"C{c}"), exist_ok=True)
        for name, batching, k, extra in CASES:
            result = run_case(d, model_dir, batching, k, extra)
            if d.is_main:
                torch.save(result, os.path.join(folder, f"{name}.pt"))
        kept = [None] * d.world_size
        dist.all_gather_object(kept, activation_bytes(wide_model(), d.context))
        if d.is_main:
            with open(os.path.join(folder, "memory.json"), "w") as f:
                json.dump(kept, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(c) for c in sys.argv[3:]])
