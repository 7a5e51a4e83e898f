"""AdamW as the reference builds it, and the learning-rate schedules as pure functions of the step.

`lr_multiplier(kind, step, warmup, total)` is the factor applied to the peak learning rate at
optimizer step `step` (0-based): the same values as `transformers.get_scheduler` gives after
`step` scheduler steps. minrm's horizon `total` is the true number of optimizer steps; the
reference multiplies it by the number of epochs again, so with more than one epoch its rate never
reaches the end value (README, "Where minrm differs").
"""

import math

import torch
from torch.distributed.tensor import DTensor

POLYNOMIAL_END_LR = 1e-7  # transformers' default lr_end for the polynomial schedule


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.AdamW:
    # torch's AdamW with the reference's eps; weight decay applies to every parameter, norms and
    # score head included, as in the reference. Fused: one kernel per device and dtype for all the
    # parameters, on CPU and CUDA and on FSDP2's DTensor shards (a pointwise op to DTensor), as
    # torchtitan builds its AdamW. Left to choose, torch runs its single-tensor loop on CPU (foreach
    # defaults to CUDA only), a Python loop of DTensor dispatches per parameter: 17x slower on the
    # toy model, 4x on a 20M one. The update is the single-tensor one to a float32 rounding.
    return torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, eps=args.eps, weight_decay=args.weight_decay, fused=True
    )


def lr_multiplier(kind: str, step: int, warmup: int, total: int, peak_lr: float = 1.0) -> float:
    if kind != "constant" and step < warmup:
        return step / max(1, warmup)
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)  # 0 -> 1 over the decay
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if kind == "cosine":  # half a cosine wave
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if kind == "cosine_with_restarts":  # one hard restart in transformers' default: one cycle
        return 0.0 if progress >= 1.0 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0))))
    if kind == "polynomial":  # power 1 from the peak to POLYNOMIAL_END_LR, then flat
        if step > total:
            return POLYNOMIAL_END_LR / peak_lr
        return ((peak_lr - POLYNOMIAL_END_LR) * (1.0 - progress) + POLYNOMIAL_END_LR) / peak_lr
    raise ValueError(f"unknown lr_scheduler_type {kind!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def grad_norm(model: torch.nn.Module) -> float:
    """The global gradient norm: torch's norm of the DTensor gradients, reduced over every rank's
    shards (each value counted once, replicas under HSDP included)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


def clip_grads_(model: torch.nn.Module, norm: float, max_norm: float) -> None:
    """Scale the gradients by max_norm / norm when the global norm is above `max_norm` (> 0)."""
    if max_norm > 0:
        params = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(norm))
