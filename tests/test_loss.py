"""The loss and the metrics of rows of K responses against their formulas, written out here per
row with plain Python: Bradley-Terry over all comparisons (InstructGPT's normalisation), the
Llama 2 margin, Plackett-Luce (ties sharing a rank), reward centering, best-of-N accuracy."""

import math

import pytest
import torch

from minrm.data.batching import collate
from minrm.model.loss import STATS, row_statistics

# Rows of different K in one batch, with ties; rewards chosen by hand (float32-exact).
ROWS = [
    {"scores": [1.0, 0.0], "rewards": [0.5, -0.25], "margin": 0.0},  # a pair
    {"scores": [1.0, 0.0], "rewards": [-1.0, 2.0], "margin": 0.75},  # a pair with a margin, wrong
    {"scores": [3.0, 1.0, 2.0], "rewards": [0.25, 1.5, -0.5], "margin": 0.0},  # a strict ranking
    {"scores": [1.0, 1.0, 0.0, 0.0, 0.0], "rewards": [2.0, -0.5, 1.0, 1.5, -3.0], "margin": 0.0},  # best-of-N, 2 chosen
    {"scores": [0.5, 0.5, 2.0, 0.5], "rewards": [0.0, 0.0, 0.0, 0.125], "margin": 0.0},  # ties below the best
]


def batch(rows=ROWS):
    """The rows through the collator, and their rewards laid out flat (the token ids do not matter, as long as a
    row's responses differ: the collator computes identical ones once)."""
    tokens = [{"prompt": [1], "responses": [[1, 2 + k] for k in range(len(r["scores"]))], **r} for r in rows]
    _, prefs = collate(tokens, 0, "packed")
    return torch.tensor([x for r in rows for x in r["rewards"]]), prefs


def logsigmoid(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def expected(row, loss="bradley_terry"):
    """One row's STATS by the formulas: comparisons (i, j) with scores[i] > scores[j]."""
    r, s, m = row["rewards"], row["scores"], row["margin"]
    pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if s[i] > s[j]]

    def mean(f):
        return sum(f(i, j) for i, j in pairs) / len(pairs)

    if loss == "plackett_luce":  # each response above some other: itself against those strictly below
        terms = [
            -(r[i] - math.log(math.exp(r[i]) + sum(math.exp(r[j] + m) for j in range(len(s)) if s[j] < s[i])))
            for i in range(len(s))
            if any(s[j] < s[i] for j in range(len(s)))
        ]
        row_loss = sum(terms) / len(terms)
    else:
        row_loss = mean(lambda i, j: -logsigmoid(r[i] - r[j] - m))
    best = [i for i in range(len(s)) if s[i] == max(s)]
    rest = [i for i in range(len(s)) if s[i] != max(s)]
    return {
        "accuracy": mean(lambda i, j: float(r[i] > r[j])),
        "loss": row_loss,
        "chosen_rewards": mean(lambda i, j: r[i]),
        "rejected_rewards": mean(lambda i, j: r[j]),
        "reward_margin": mean(lambda i, j: r[i] - r[j]),
        "best_of_n_accuracy": float(max(r[i] for i in best) > max(r[i] for i in rest)),
    }


@pytest.mark.parametrize("loss", ["bradley_terry", "plackett_luce"])
def test_each_row_statistic_is_its_formula(loss):
    rewards, prefs = batch()
    got = row_statistics(rewards, prefs, loss)
    assert got.shape == (len(ROWS), len(STATS))
    for row, values in zip(ROWS, got.tolist()):
        want = expected(row, loss)
        assert values == pytest.approx([want[name] for name in STATS], abs=1e-6)


def test_plackett_luce_is_bradley_terry_for_pairs_and_differs_beyond():
    rewards, prefs = batch()
    bt, pl = (row_statistics(rewards, prefs, loss)[:, STATS.index("loss")] for loss in ("bradley_terry", "plackett_luce"))
    torch.testing.assert_close(pl[:2], bt[:2], rtol=0, atol=1e-7)  # K = 2, margin included
    assert (pl[2:] - bt[2:]).abs().min() > 1e-3


def test_the_step_loss_weighs_each_row_once_and_has_the_formulas_gradient():
    """The step's loss is the mean of the row losses; its gradient with respect to each reward is
    the derivative of that mean, written out (-sigmoid(-(d - m)) per comparison, / comparisons)."""
    rewards, prefs = batch()
    rewards.requires_grad_(True)
    row_statistics(rewards, prefs)[:, STATS.index("loss")].mean().backward()
    want, flat = [0.0] * len(rewards), 0
    for row in ROWS:
        r, s, m = row["rewards"], row["scores"], row["margin"]
        pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if s[i] > s[j]]
        for i, j in pairs:
            g = -1 / (1 + math.exp(r[i] - r[j] - m)) / len(pairs) / len(ROWS)
            want[flat + i] += g
            want[flat + j] -= g
        flat += len(s)
    assert rewards.grad.tolist() == pytest.approx(want, abs=1e-7)


def test_centering_adds_its_coefficient_times_the_mean_square_reward():
    """train.forward_backward on a stand-in model whose rewards are its parameter: the gradient is
    that of mean(row losses) + C x mean(r^2) over the step's responses."""
    from types import SimpleNamespace

    from minrm.train import forward_backward

    rewards, prefs = batch()
    model = torch.nn.Module()
    model.r = torch.nn.Parameter(rewards.clone())
    model.forward = lambda **inputs: model.r * 1.0
    args = SimpleNamespace(loss="bradley_terry", center_rewards_coefficient=0.3)
    forward_backward(model, ({}, prefs), args, rows=len(ROWS), responses=len(rewards))
    plain = rewards.clone().requires_grad_(True)
    row_statistics(plain, prefs)[:, STATS.index("loss")].mean().backward()
    # d/dr of C x mean(r^2) is 2 C r / R, on top of the ranking loss's gradient.
    torch.testing.assert_close(model.r.grad, plain.grad + 2 * 0.3 * rewards / len(rewards), rtol=0, atol=1e-7)


def test_identical_responses_share_one_reward_and_count_each():
    """A row's identical responses are one computed reward (batching.collate); the loss, the metrics and
    the centering's mean over responses are those of the reward computed once per response, and the
    shared reward's gradient is the sum of the two responses' gradients."""
    from types import SimpleNamespace

    from minrm.train import forward_backward

    rows = [{"prompt": [1], "responses": [[1, 2], [1, 3], [1, 2]], "scores": [2.0, 1.0, 0.0], "margin": 0.0}]
    _, prefs = collate(rows, 0, "packed")
    assert prefs.index.tolist() == [[0, 1, 0]]
    model = torch.nn.Module()
    model.r = torch.nn.Parameter(torch.tensor([0.5, -0.25]))
    model.forward = lambda **inputs: model.r * 1.0
    args = SimpleNamespace(loss="bradley_terry", center_rewards_coefficient=0.3)
    stats = forward_backward(model, ({}, prefs), args, rows=1, responses=3)
    each = torch.tensor([0.5, -0.25, 0.5], requires_grad=True)  # computed once per response
    apart = prefs._replace(index=torch.tensor([[0, 1, 2]]))
    expected = row_statistics(each, apart)
    (expected[:, STATS.index("loss")].sum() + 0.3 * each.square().sum() / 3).backward()
    torch.testing.assert_close(stats, expected.detach().sum(0), rtol=0, atol=1e-7)
    # 0 over 1 right, 0 over 2 a tie (the same text), 1 over 2 wrong
    assert stats[STATS.index("accuracy")].item() == pytest.approx(1 / 3)
    grad = torch.stack([each.grad[0] + each.grad[2], each.grad[1]])
    torch.testing.assert_close(model.r.grad, grad, rtol=0, atol=1e-7)


def test_an_infinite_margin_gives_an_infinite_loss_not_nan():
    """The non-finite guard names what went wrong: a margin that overflows float32 (1e39) is an
    infinite loss for its row, and the other rows' statistics are untouched."""
    rows = [dict(ROWS[0], margin=1e39), *ROWS[1:]]
    rewards, prefs = batch(rows)
    got = row_statistics(rewards, prefs)
    assert got[0, STATS.index("loss")].item() == math.inf
    torch.testing.assert_close(got[1:], row_statistics(*batch())[1:], rtol=0, atol=0)
