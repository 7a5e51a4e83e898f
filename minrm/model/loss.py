"""The reward model's loss and metrics, per row: a prompt with K responses and the comparisons among
them (response i is preferred to j when its score is higher; equal scores compare nothing).

- `bradley_terry` (the default): a row's loss is the mean over its comparisons (i, j) of
  -logsigmoid(r_i - r_j - margin), InstructGPT's all-pairs loss normalised by the row's number of
  comparisons (arXiv:2203.02155, section 3.5). For a pair it is the reference's loss exactly.
- `plackett_luce`: the likelihood of the ranking. Each response i above some other picks itself
  out of itself and the responses ranked strictly below it: -log(e^r_i / (e^r_i + sum_j e^(r_j +
  margin))). Tied responses never share a denominator, so a tie is no evidence either way and the
  last rank contributes nothing; with distinct scores this is Plackett-Luce exactly. A row's loss
  is the mean of its terms (K - 1 of them for a strict ranking): for a pair, Bradley-Terry's.
The step's loss is the mean over its rows: each prompt weighs the same, whatever its K.

The metrics are per row, the mean over its comparisons of [r_i > r_j] (`accuracy`), r_i
(`chosen_rewards`), r_j (`rejected_rewards`) and r_i - r_j (`reward_margin`), then means over
rows; for pairs the reference's metrics. `best_of_n_accuracy`: the row's best-scored responses hold
its highest reward, strictly (with one chosen response: it beats every other).
"""

import torch
import torch.nn.functional as F

from minrm.data.batching import Preferences

STATS = ("accuracy", "loss", "chosen_rewards", "rejected_rewards", "reward_margin", "best_of_n_accuracy")
LOSS = STATS.index("loss")


def row_statistics(rewards: torch.Tensor, prefs: Preferences, loss: str = "bradley_terry") -> torch.Tensor:
    """Each row's `STATS`, (N, len(STATS)) in fp32, from the batch's rewards (R,); the loss column
    carries the gradient."""
    valid = prefs.index >= 0  # (N, K)
    r = rewards[prefs.index.clamp(min=0)]  # (N, K); padding reads some reward, masked out below
    s = prefs.scores
    prefer = valid[:, :, None] & valid[:, None, :] & (s[:, :, None] > s[:, None, :])  # (N, K, K): i over j
    weight = prefer / prefer.sum((1, 2), keepdim=True)  # a row's comparisons weigh 1 in all
    diff = r[:, :, None] - r[:, None, :]  # (N, K, K): r_i - r_j
    margin = prefs.margin[:, None, None]

    def mean(x: torch.Tensor) -> torch.Tensor:  # over each row's comparisons; the others left out (0 x inf is nan)
        return torch.where(prefer, weight * x, 0.0).sum((1, 2))

    if loss == "plackett_luce":
        leads = prefer.any(2)  # (N, K): responses with some response below them
        below = torch.where(prefer, r[:, None, :] + margin, -torch.inf)
        below = torch.where(leads[:, :, None], below, 0.0).logsumexp(2)  # the 0s keep the gradient finite
        terms = torch.where(leads, F.softplus(below - r), 0.0)
        row_loss = terms.sum(1) / leads.sum(1)
    else:
        row_loss = mean(-F.logsigmoid(diff - margin))
    top = valid & (s == s.max(1, keepdim=True).values)  # the row's best-scored responses
    best = torch.where(top, r, -torch.inf).amax(1) > torch.where(valid & ~top, r, -torch.inf).amax(1)
    stats = {
        "accuracy": mean((diff > 0).float()),
        "loss": row_loss,
        "chosen_rewards": mean(r[:, :, None].expand_as(diff)),
        "rejected_rewards": mean(r[:, None, :].expand_as(diff)),
        "reward_margin": mean(diff),
        "best_of_n_accuracy": best.float(),
    }
    return torch.stack([stats[name] for name in STATS], 1)
