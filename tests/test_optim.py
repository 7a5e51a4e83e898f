"""Hand-written schedules against transformers.get_scheduler, step by step; AdamW as the reference."""

import pytest
import torch
from transformers import get_scheduler

from minrm.config import SCHEDULERS, parse_args
from minrm.train import build_optimizer, lr_multiplier


@pytest.mark.parametrize("kind", SCHEDULERS)
@pytest.mark.parametrize(("warmup", "total"), [(0, 20), (5, 20), (3, 7), (10, 10)])
def test_schedules_match_transformers(kind, warmup, total):
    if kind == "polynomial" and warmup == total:
        pytest.skip("transformers' polynomial schedule divides by zero when warmup == total")
    peak = 3e-4
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    theirs = get_scheduler(kind, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total + 3):  # a few steps past the end too
        ours = peak * lr_multiplier(kind, step, warmup, total, peak)
        assert ours == pytest.approx(theirs.get_last_lr()[0], rel=1e-9, abs=1e-15), (kind, step)
        optimizer.step()
        theirs.step()


def test_adamw_is_the_references():
    args = parse_args(["--learning_rate", "3e-6"])
    model = torch.nn.Linear(3, 1)
    group = build_optimizer(model, args).param_groups[0]
    assert (group["lr"], group["eps"], group["betas"], group["weight_decay"]) == (3e-6, 1e-5, (0.9, 0.999), 0.01)
    assert len(group["params"]) == 2  # weight decay on every parameter, bias included


def test_adamw_steps_as_the_references_single_tensor_loop():
    """minrm's AdamW (fused) against torch's single-tensor AdamW with the same hyperparameters, the
    reference's implementation on CPU: five steps of gradients from 1 down to 1e-4 in size."""
    args = parse_args(["--learning_rate", "3e-3"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 1))
    start = [p.detach().clone() for p in model.parameters()]
    reference = [torch.nn.Parameter(p.clone()) for p in start]
    ours = build_optimizer(model, args)
    assert ours.param_groups[0]["fused"]
    theirs = torch.optim.AdamW(reference, lr=3e-3, eps=1e-5, foreach=False)
    for step in range(5):
        for p, q in zip(model.parameters(), reference):
            p.grad = torch.randn_like(p) * 10.0**-step
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for p, q, p0 in zip(model.parameters(), reference, start):
        assert (q.detach() - p0).abs().mean() > 1e-3  # the steps moved the weights far beyond the tolerance
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
