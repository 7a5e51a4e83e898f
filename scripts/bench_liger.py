"""Step time and peak memory of a Llama reward model with and without Liger's kernels.

    python -m scripts.bench_liger                        # GPU: Llama-3.2-1B shape, bf16, 4 pairs x 2048 tokens
    python -m scripts.bench_liger --num_layers 8 --seq_len 4096 --gradient_checkpointing
    python -m scripts.bench_liger --out output/bench_liger.json

Random weights and tokens (nothing is downloaded); each step is a forward and backward of the
pairwise loss on 2 x pairs sequences, after warm-up steps. The baseline runs first, because Liger's
RoPE swap is module-level: every Llama used later in the process runs it. On CPU the model is tiny
and only the baseline runs, since Liger's kernels are Triton GPU kernels.
"""

import argparse
import gc
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, LlamaConfig

from minrm.model.liger import apply_liger_kernel

# (GPU, CPU) defaults: a Llama-3.2-1B-shaped model (1.2B parameters) and a tiny one
PRESETS = {
    "hidden_size": (2048, 64),
    "intermediate_size": (8192, 128),
    "num_layers": (16, 2),
    "num_heads": (32, 4),
    "num_kv_heads": (8, 2),
    "vocab_size": (128256, 1024),
    "seq_len": (2048, 64),
    "pairs": (4, 2),
    "steps": (10, 3),
    "warmup": (3, 1),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, (gpu, cpu) in PRESETS.items():
        parser.add_argument(f"--{name}", type=int, default=None, help=f"default {gpu} on GPU, {cpu} on CPU")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--out", default="output/bench_liger.json", help="where to write the results as JSON")
    return parser.parse_args(argv)


def step(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """One forward and backward of the pairwise loss: rows are the chosen sequences, then the rejected."""
    model.zero_grad(set_to_none=True)
    rewards = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()  # (2B,)
    chosen, rejected = rewards.chunk(2)
    (-F.logsigmoid(chosen - rejected).mean()).backward()


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, liger: bool) -> dict:
    """Time `args.steps` forward+backward steps of a freshly built model; peak memory on GPU."""
    config = LlamaConfig(
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        vocab_size=args.vocab_size,
        max_position_embeddings=max(args.seq_len, 2048),
        pad_token_id=0,
        num_labels=1,
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).to(device, dtype)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    kernels = apply_liger_kernel(model, use=True, strict=True, device=device) if liger else "liger: off"
    ids = torch.randint(1, args.vocab_size, (2 * args.pairs, args.seq_len), device=device)  # (2B, T), no padding
    mask = torch.ones_like(ids)
    for _ in range(args.warmup):  # Triton compiles its kernels on first use
        step(model, ids, mask)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(model, ids, mask)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tokens = 2 * args.pairs * args.seq_len
    name = "liger" if liger else "baseline"
    return dict(run=name, step_ms=1e3 * seconds, tokens_per_s=tokens / seconds, peak_memory_gib=peak, kernels=kernels)


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = 0 if device.type == "cuda" else 1
    for name, values in PRESETS.items():
        if getattr(args, name) is None:
            setattr(args, name, values[preset])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    runs = [run(args, device, dtype, liger=False)]
    if device.type == "cuda":
        runs.append(run(args, device, dtype, liger=True))
    else:
        print("Liger's kernels are Triton GPU kernels and need CUDA: only the baseline ran.")

    print(f"\n{device.type}, {dtype}, {2 * args.pairs} x {args.seq_len} tokens per step")
    print(f"{'run':<10}{'step (ms)':>12}{'tokens/s':>12}{'peak memory (GiB)':>20}")
    for r in runs:
        peak = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        print(f"{r['run']:<10}{r['step_ms']:>12.1f}{r['tokens_per_s']:>12.0f}{peak:>20}")
    if len(runs) == 2:
        base, liger = runs
        speed, memory = base["step_ms"] / liger["step_ms"], liger["peak_memory_gib"] / base["peak_memory_gib"]
        print(f"liger: {speed:.2f}x the baseline's speed, {memory:.2f}x its peak memory")
        print(liger["kernels"])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", dtype=str(dtype))
    out.write_text(json.dumps(result | dict(args=vars(args), runs=runs), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
