"""Hand-written schedules against transformers.get_scheduler, step by step; AdamW as the reference."""

import pytest
import torch
from transformers import get_scheduler

from minrm.config import SCHEDULERS, parse_args
from minrm.optim import build_optimizer, lr_multiplier


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
