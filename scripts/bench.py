"""Throughput of the batching modes: N optimizer steps of a random-init Llama reward model on
synthetic (or a file's) preference pairs. The modes' steps are timed interleaved in one process, on
one model (so load from other processes falls on all alike; with --repeats R each step runs R times per mode and
the fastest run counts); peak memory is taken in a fresh process per mode.

    python -m scripts.bench --profile multiturn --pairs 4 --steps 8 --out bench_multiturn
    python -m scripts.bench --data prefs.parquet --tokenizer allenai/Llama-3.1-Tulu-3-8B-SFT

Per mode: pairs/s, real tokens/s (chosen + rejected tokens, as the reference counts them), the
fraction of computed tokens that are padding or a repeated prompt, computed tokens/s (every token
the model runs, padding included) as a fraction of padded's, over the whole step and over forward
and backward alone (the optimizer step costs the same per step, whatever its tokens), achieved
FLOP/s and its ratio to a matmul peak measured in the same run, and peak memory (RSS on CPU, max
allocated on GPU). FLOPs are 6 x non-embedding params per computed token plus 12 x layers x hidden
per attended (query, key) pair that the mask allows. Writes OUT.json and OUT.md. Batches and rewards come from
minrm's `collate` and `reward_forward`; this file only times them. On a GPU the model is bf16 and
the step plain SGD, so that `--size 8b` fits one 80 GB GPU.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, LlamaConfig

from minrm.batching import BATCHINGS, collate, shared_prefix, to_device
from minrm.model import reward_forward
from minrm.packed_attention import use_packed_attention

# Token-count deciles (10%..90%) of the `multiturn` profile: prompt, chosen and rejected responses.
MULTITURN = {
    "prompt": [16, 23, 42, 66, 90, 116, 146, 189, 275],
    "chosen": [8, 12, 16, 21, 28, 36, 48, 65, 96],
    "rejected": [9, 15, 20, 27, 36, 47, 61, 80, 115],
}
VOCAB = 8192


# Llama shapes (hidden, intermediate, layers, heads, kv heads) by total parameter count, vocab 8192.
SIZES = {
    "9m": (384, 1024, 4, 6, 2),
    "20m": (512, 1408, 6, 8, 2),
    "100m": (768, 2560, 12, 12, 4),
    "8b": (4096, 14336, 32, 32, 8),
}


def model_config(size: str = "9m") -> LlamaConfig:
    hidden, intermediate, layers, heads, kv_heads = SIZES[size]
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        num_labels=1,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def synthetic_lengths(profile: str, n: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    if profile == "multiturn":
        # Inverse CDF through the deciles, extended linearly to the 0% and 100% ends.
        def draw(deciles):
            q = [0.0, *np.linspace(0.1, 0.9, 9), 1.0]
            v = [max(1, deciles[0] / 2), *deciles, 2 * deciles[-1] - deciles[-2]]
            return np.maximum(1, np.interp(rng.random(n), q, v).round()).astype(int)

        return list(zip(*(draw(MULTITURN[k]) for k in ("prompt", "chosen", "rejected"))))
    out = []  # longresponse: log-normal, medians 150 (prompt) and 350 (responses), sigma 0.8
    while len(out) < n:
        p, c, r = np.maximum(1, rng.lognormal(np.log([150, 350, 350]), 0.8).round()).astype(int)
        if p + max(c, r) <= 2048:
            out.append((p, c, r))
    return out


def synthetic_pairs(profile: str, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    pairs = []
    for p, c, r in synthetic_lengths(profile, n, rng):
        prompt = rng.integers(1, VOCAB, p).tolist()
        pairs.append(
            {
                "prompt": prompt,
                "chosen": prompt + rng.integers(1, VOCAB, c).tolist(),
                "rejected": prompt + rng.integers(1, VOCAB, r).tolist(),
            }
        )
    return pairs


def file_pairs(path: str, tokenizer_name: str | None, n: int) -> list[dict]:
    """The first n pairs of a preference file in any format minrm reads, tokenized as minrm does
    (chat template `tulu`; the toy tokenizer unless `tokenizer_name` is given)."""
    from minrm.batching import rows_at
    from minrm.config import parse_args
    from minrm.data import build_side, load_tokenizer

    flags = ["--dataset_mixer_list", path, "1.0", "--max_token_length", "2048", "--max_prompt_token_length", "2048"]
    flags += ["--chat_template_name", "tulu"]  # the same format whatever the tokenizer carries
    if tokenizer_name:
        flags += ["--tokenizer_name_or_path", tokenizer_name]
    args = parse_args(flags)
    ds, _, log = build_side(args.dataset_mixer_list, ["train"], load_tokenizer(args), args, "bench")
    print("\n".join(log), file=sys.stderr)
    pairs = []
    for row in rows_at(ds, list(range(min(n, len(ds))))):  # a random-init model of VOCAB rows: fold the ids into it
        (chosen, rejected), fold = row["responses"], lambda ids: [t % VOCAB for t in ids]
        pairs.append({"prompt": fold(row["prompt"]), "chosen": fold(chosen), "rejected": fold(rejected)})
    return pairs


def as_rows(pairs: list[dict]) -> list[dict]:
    """Pairs as the trainer's rows: a prompt with two responses, the chosen one preferred."""
    return [{"prompt": p["prompt"], "responses": [p["chosen"], p["rejected"]], "scores": [1.0, 0.0]} for p in pairs]


def shared_prefix_length(pair: dict) -> int:
    return shared_prefix(as_rows([pair])[0])


def attended_pairs(pairs: list[dict], batching: str) -> int:
    """(query, key) pairs the mask allows: what a block-sparse or varlen kernel computes."""
    tri = lambda n: n * (n + 1) // 2  # noqa: E731
    total = sum(tri(len(p["chosen"])) + tri(len(p["rejected"])) for p in pairs)
    if batching == "shared_prefix":
        total -= sum(tri(shared_prefix_length(p)) for p in pairs)  # the prompt's own block, once
    if batching == "padded":
        width = max(len(s) for p in pairs for s in (p["chosen"], p["rejected"]))
        total = 2 * len(pairs) * tri(width)
    return total


def build(device: torch.device, size: str):
    """One model for every mode (the modes switch its attention, `attention` says to which), and
    its optimizer. fp32 and AdamW on CPU; on a GPU bf16 weights and a stateless SGD step, so that
    `--size 8b` fits one 80 GB GPU (16 GB of weights, 16 of gradients, no Adam state)."""
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    with device:
        model = AutoModelForSequenceClassification.from_config(
            model_config(size), dtype=torch.bfloat16 if cuda else torch.float32
        )
    model.forward = types.MethodType(reward_forward, model)
    default = model.config._attn_implementation
    use_packed_attention(model, "auto", cuda)  # as minrm.model.skeleton does for the packed modes
    attention = {m: default if m == "padded" else model.config._attn_implementation for m in BATCHINGS}
    if cuda:
        return model, torch.optim.SGD(model.parameters(), lr=1e-4), attention
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-5), attention


def train_step(model, optimizer, attention, pairs: list[dict], batching: str, device: torch.device):
    """One optimizer step on one micro-batch: its computed tokens, the seconds of forward and
    backward, and the seconds of the optimizer step (a cost per step, whatever the tokens)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    if model.config._attn_implementation != attention[batching]:
        model.set_attn_implementation(attention[batching])
    start = time.perf_counter()
    inputs, _ = to_device(collate(as_rows(pairs), 0, batching), device)
    chosen, rejected = model(**inputs).view(-1, 2).unbind(1)
    (-F.logsigmoid(chosen - rejected).mean()).backward()
    sync()
    middle = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    return inputs["input_ids"].numel(), middle - start, time.perf_counter() - middle


def time_modes(
    modes: list[str], pairs: list[dict], per_batch: int, steps: int, size: str, repeats: int = 1
) -> list[dict]:
    """All modes in one process on one model, their steps interleaved (the order rotating), so
    that load from other processes on a shared machine falls on every mode alike; step 0 warms up. With repeats,
    each step runs that many times per mode and the fastest counts: a step slowed by another
    process is dropped rather than averaged in."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = build(device, size)
    cfg = model_config(size)
    params = sum(p.numel() for p in run[0].parameters()) - cfg.vocab_size * cfg.hidden_size
    totals = {
        m: dict(seconds=0.0, forward_backward=0.0, pairs=0, real=0, unique=0, computed=0, flops=0.0) for m in modes
    }
    turn = 0
    for i in range(steps + 1):
        batch = pairs[i * per_batch : (i + 1) * per_batch]
        fastest = {}
        for _ in range(repeats if i else 1):
            turn += 1
            for m in modes[turn % len(modes) :] + modes[: turn % len(modes)]:
                computed, model_s, step_s = train_step(*run, batch, m, device)
                best = fastest.get(m, (computed, float("inf"), float("inf")))
                fastest[m] = (computed, min(best[1], model_s), min(best[2], step_s))
        if i == 0:
            continue
        for m, (computed, model_s, step_s) in fastest.items():
            t = totals[m]
            t["seconds"] += model_s + step_s
            t["forward_backward"] += model_s
            t["pairs"] += len(batch)
            t["real"] += sum(len(p["chosen"]) + len(p["rejected"]) for p in batch)
            t["unique"] += sum(len(p["chosen"]) + len(p["rejected"]) - shared_prefix_length(p) for p in batch)
            t["computed"] += computed
            attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * attended_pairs(batch, m)
            t["flops"] += 6 * params * computed + attention
    return [
        {
            "mode": m,
            "pairs_per_s": t["pairs"] / t["seconds"],
            "real_tokens_per_s": t["real"] / t["seconds"],
            "wasted_fraction": 1 - t["unique"] / t["computed"],
            "computed_tokens_per_s": t["computed"] / t["seconds"],
            "forward_backward_tokens_per_s": t["computed"] / t["forward_backward"],
            "flops_per_s": t["flops"] / t["seconds"],
            "seconds": t["seconds"],
        }
        for m, t in totals.items()
    ]


def peak_memory(batching: str, pairs: list[dict], per_batch: int, steps: int, size: str) -> dict:
    """Peak memory of one mode's training steps, in a process of its own: max allocated on GPU; on
    CPU peak RSS, and its rise over the RSS after the model and optimizer are built."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = build(device, size)
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    for i in range(steps + 1):
        train_step(*run, pairs[i * per_batch : (i + 1) * per_batch], batching, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        return {"peak_memory_mib": peak, "memory_above_base_mib": peak}
    # VmHWM, not ru_maxrss: the latter can carry the parent's high-water mark over fork and exec.
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024  # kB
    return {"peak_memory_mib": peak, "memory_above_base_mib": peak - base}


def matmul_peak() -> float:
    """FLOP/s of a large matmul: fp32 on CPU, bf16 on GPU; the best of a few tries."""
    cuda = torch.cuda.is_available()
    n, dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
    a = torch.randn(n, n, dtype=dtype, device="cuda" if cuda else "cpu")
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize() if cuda else None
        t = time.perf_counter()
        a @ a
        torch.cuda.synchronize() if cuda else None
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def markdown(rows: list[dict], peak: float, command: str) -> str:
    base = next(r for r in rows if r["mode"] == "padded") if any(r["mode"] == "padded" for r in rows) else rows[0]
    lines = [
        f"`{command}`  ",
        f"matmul peak: {peak / 1e9:.1f} GFLOP/s",
        "",
        "| mode | pairs/s | x padded | real tok/s | padding+repeated prompt | computed tok/s | x padded "
        "| fwd+bwd only | GFLOP/s | of peak | peak MiB | above base MiB | x padded |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['pairs_per_s']:.2f} | {r['pairs_per_s'] / base['pairs_per_s']:.2f} "
            f"| {r['real_tokens_per_s']:.0f} | {r['wasted_fraction']:.1%} | {r['computed_tokens_per_s']:.0f} "
            f"| {r['computed_tokens_per_s'] / base['computed_tokens_per_s']:.1%} "
            f"| {r['forward_backward_tokens_per_s'] / base['forward_backward_tokens_per_s']:.1%} "
            f"| {r['flops_per_s'] / 1e9:.1f} "
            f"| {r['flops_per_s'] / peak:.1%} | {r['peak_memory_mib']:.0f} | {r['memory_above_base_mib']:.0f} "
            f"| {r['memory_above_base_mib'] / base['memory_above_base_mib']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["multiturn", "longresponse"], default="multiturn")
    parser.add_argument("--data", help="a preference file (.jsonl/.json/.parquet, any row format minrm reads)")
    parser.add_argument("--tokenizer", help="tokenizer for --data (default: the toy one)")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per micro-batch (= optimizer step)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps, after one warm-up step")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each step per mode; the fastest counts")
    parser.add_argument("--size", choices=list(SIZES), default="9m", help="model shape, by parameter count")
    parser.add_argument("--modes", nargs="+", choices=BATCHINGS, default=list(BATCHINGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench", help="writes OUT.json and OUT.md")
    parser.add_argument("--one_mode", help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    args = parser.parse_args()
    n = args.pairs * (args.steps + 1)
    if args.data:
        pairs = file_pairs(args.data, args.tokenizer, n)
    else:
        pairs = synthetic_pairs(args.profile, n, args.seed)
    if args.one_mode:
        print(json.dumps(peak_memory(args.one_mode, pairs, args.pairs, args.steps, args.size)))
        return
    peak = matmul_peak()
    rows = time_modes(args.modes, pairs, args.pairs, args.steps, args.size, args.repeats)
    for row in rows:  # a fresh process per mode: peak RSS is per process
        mode = row["mode"]
        out = subprocess.run(
            [sys.executable, "-m", "scripts.bench", *sys.argv[1:], "--one_mode", mode], capture_output=True, text=True
        )
        if out.returncode:
            raise SystemExit(f"bench: mode {mode} failed:\n{out.stderr[-3000:]}")
        row.update(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(row), flush=True)
    command = "python -m scripts.bench " + " ".join(sys.argv[1:])
    with open(args.out + ".json", "w") as f:
        json.dump({"command": command, "matmul_peak_flops": peak, "rows": rows}, f, indent=1)
    table = markdown(rows, peak, command)
    with open(args.out + ".md", "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
