"""Evaluation on the held-out rows: the training metrics plus `best_of_n_accuracy`, and a few sampled rows for a
table. Every row weighs the same over all ranks: sums over rows / rows (the reference averages per-batch means, so a
short last batch weighs as much as a full one).
"""

import math

import datasets
import torch
from torch.distributed.fsdp import FSDPModule
from transformers import PreTrainedTokenizerBase

from minrm.data.batching import collate, micro_batches, rows_at, split_to, to_device
from minrm.distributed import Dist, all_reduce_max, all_reduce_sum
from minrm.model.loss import STATS, row_statistics


@torch.no_grad()
def evaluate(model, eval_set: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, d: Dist, args, num_samples=10):
    """Runs on ALL ranks: under FSDP every forward is a collective, so a rank-0-only eval deadlocks.
    Each rank takes a contiguous share of the rows, in batches of --per_device_eval_batch_size
    (cut further by --max_tokens_per_batch)."""
    model.eval()
    per_rank, size = math.ceil(len(eval_set) / d.data_size), args.per_device_eval_batch_size  # a context group's rows
    mine = list(range(d.data_rank * per_rank, min(len(eval_set), (d.data_rank + 1) * per_rank)))
    sums = torch.zeros(len(STATS) + 1, device=d.device)  # STATS summed over rows, then the rows
    samples = []
    for b in range(math.ceil(per_rank / size)):  # the same number of batches on every rank
        rows = rows_at(eval_set, mine[b * size : (b + 1) * size])
        chunks = micro_batches(rows, args.batching, max_tokens=args.max_tokens_per_batch) or [[]]
        if args.max_tokens_per_batch and d.world_size > 1:  # ... and of forward passes in each
            chunks = split_to(chunks, all_reduce_max(len(chunks), d.device))
        for chunk in chunks:
            part, weight = [rows[i] for i in chunk], 1.0
            if not part:  # this rank ran out of rows: a weightless forward joins the collectives
                part, weight = rows_at(eval_set, [0]), 0.0
            inputs, prefs = to_device(collate(part, tokenizer.pad_token_id, args.batching), d.device)
            rewards = model(**inputs)  # (R,)
            stats = row_statistics(rewards, prefs, args.loss)  # (N, len(STATS))
            sums += weight * torch.cat([stats.sum(0), stats.new_tensor([len(part)])])
            if d.is_main and len(samples) < num_samples:
                rows_rewards = zip(part[: num_samples - len(samples)], rewards[prefs.index].tolist())
                samples += [sample_row(row, row_rewards, tokenizer) for row, row_rewards in rows_rewards]
    *totals, rows = all_reduce_sum(sums).tolist()
    # A no-grad forward leaves the units that skip resharding after it (root, head, last block)
    # gathered: shard them again, so that what follows sees each rank's shard, not the whole tensor.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    model.train()
    return {f"eval/rm/{name}": total / rows for name, total in zip(STATS, totals)}, samples


def sample_row(row: dict, rewards: list[float], tokenizer) -> dict:
    """The table's view of a row: the prompt, the best- and worst-scored responses (a pair's chosen and rejected),
    their rewards (`rewards`: the row's, by response), and whether the best one's is the higher."""
    k, n = len(row["responses"]), len(row["prompt"])  # the prompt's ids begin every response
    best, worst = max(range(k), key=row["scores"].__getitem__), min(range(k), key=row["scores"].__getitem__)
    chosen, rejected = rewards[best], rewards[worst]
    texts = [tokenizer.decode(row["responses"][i][n:]) for i in (best, worst)]
    return dict(prompt=tokenizer.decode(row["prompt"]), chosen_response=texts[0], rejected_response=texts[1],
                chosen_reward=chosen, rejected_reward=rejected, correct=chosen > rejected)  # fmt: skip
