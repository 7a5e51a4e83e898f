"""Throughput of rows of K responses (`python -m scripts.bench --profile ranked`): the same
comparisons trained three ways on one random-init Llama, their steps interleaved in one process:

- `rows`: each prompt with its K responses in one packed row, the prompt and every response computed
  once (minrm's shared_prefix layout, loss.row_statistics over all C(K, 2) comparisons);
- `pairs`: the comparisons exploded into C(K, 2) pairs per prompt, each pair packed with its prompt
  once (shared_prefix): each prompt computed C(K, 2) times, each response K - 1 times;
- `pairs_padded`: the same pairs right-padded, chosen and rejected sequences whole (the reference's way).
All three minimise the same loss (InstructGPT's: the mean over a prompt's comparisons, then over
prompts), checked on the first batch. Synthetic rows: K = 4 responses with distinct scores, lengths
like UltraFeedback's (log-normal, medians of 150 prompt and 280 response tokens). Reports
comparisons/s, computed tokens per comparison and peak memory (RSS on CPU in a fresh process per
way, max allocated on GPU).
"""

import itertools
import json
import subprocess
import sys
import time

import numpy as np
import torch

from minrm.config import BATCHINGS
from minrm.data.batching import collate, to_device
from minrm.model.loss import LOSS, row_statistics

WAYS = ("rows", "pairs", "pairs_padded")


def ranked_rows(n: int, k: int, vocab: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        p, *lengths = np.maximum(1, rng.lognormal(np.log([150] + [280] * k), 0.6).round().astype(int))
        prompt = rng.integers(1, vocab, p).tolist()
        responses = [prompt + rng.integers(1, vocab, m).tolist() for m in lengths]
        rows.append({"prompt": prompt, "responses": responses, "scores": rng.permutation(k).astype(float).tolist()})
    return rows


def exploded(rows: list[dict]) -> list[dict]:
    """Every comparison of every row as a pair of its own (the preferred response first)."""
    pairs = []
    for row in rows:
        for i, j in itertools.permutations(range(len(row["scores"])), 2):
            if row["scores"][i] > row["scores"][j]:
                pairs.append(
                    {
                        "prompt": row["prompt"],
                        "responses": [row["responses"][i], row["responses"][j]],
                        "scores": [1.0, 0.0],
                    }
                )
    return pairs


def step(run, rows: list[dict], way: str, update: bool = True) -> tuple[float, int]:
    """One optimizer step the given way (without `update`, the loss only): its loss and computed tokens."""
    model, optimizer, attention, device = run
    batching = "padded" if way == "pairs_padded" else "shared_prefix"
    if model.config._attn_implementation != attention[batching]:
        model.set_attn_implementation(attention[batching])
    batch = rows if way == "rows" else exploded(rows)
    inputs, prefs = to_device(collate(batch, 0, batching), device)
    with torch.set_grad_enabled(update):
        loss = row_statistics(model(**inputs), prefs)[:, LOSS].mean()
    if update:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item(), inputs["input_ids"].numel()


def time_ways(run, rows: list[dict], per_batch: int, steps: int, ways=WAYS) -> list[dict]:
    """Each way's steps over the same batches, the order rotating, after the first batch's loss each
    way on the same weights and one untimed step each. Comparisons per batch: C(K, 2) per row."""
    totals = {
        w: {"seconds": 0.0, "comparisons": 0, "computed": 0, "loss": step(run, rows[:per_batch], w, False)[0]}
        for w in ways
    }
    for i in range(steps + 1):
        batch = rows[i * per_batch : (i + 1) * per_batch]
        for w in ways[i % len(ways) :] + ways[: i % len(ways)]:
            start = time.perf_counter()
            loss, computed = step(run, batch, w)
            t = totals[w]
            if i == 0:
                continue
            t["seconds"] += time.perf_counter() - start
            t["comparisons"] += len(exploded(batch))
            t["computed"] += computed
    return [
        {
            "way": w,
            "comparisons_per_s": t["comparisons"] / t["seconds"],
            "computed_tokens_per_comparison": t["computed"] / t["comparisons"],
            "first_loss": t["loss"],
        }
        for w, t in totals.items()
    ]


def peak_memory_mib(device: torch.device) -> float:
    """Max allocated on GPU; on CPU the peak RSS (VmHWM: ru_maxrss can carry the parent's over exec)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def run_ranked(args, build, one_process) -> str:
    """`python -m scripts.bench --profile ranked`: the table (markdown); rows as JSON in OUT.json.
    `build` and `one_process` are scripts.bench's: the trainer's model in a process group of one."""
    with one_process() as d:
        models, optimizers, attention = build(d, args.size, args.packed_attention, modes=BATCHINGS)
        run = (models["shared_prefix"], optimizers["shared_prefix"], attention, d.device)
        rows = ranked_rows(args.pairs * (args.steps + 1), 4, models["padded"].config.vocab_size, args.seed)
        if args.one_mode:  # a fresh process for one way's peak memory
            time_ways(run, rows, args.pairs, args.steps, ways=(args.one_mode,))
            return json.dumps({"peak_memory_mib": peak_memory_mib(d.device)})
        results = time_ways(run, rows, args.pairs, args.steps)
    device = d.device
    for r in results:
        if device.type == "cuda":
            r["peak_memory_mib"] = peak_memory_mib(device)  # the run's, all ways together
        else:
            cmd = [sys.executable, "-m", "scripts.bench", *sys.argv[1:], "--one_mode", r["way"]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r.update(json.loads(out.stdout.strip().splitlines()[-1]))
    base = {r["way"]: r for r in results}
    lines = [
        f"`python -m scripts.bench {' '.join(sys.argv[1:])}`  ",
        "first batch's loss: " + ", ".join(f"{r['way']} {r['first_loss']:.6f}" for r in results),
        "",
        "| way | comparisons/s | x pairs | x pairs_padded | computed tokens per comparison | peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['way']} | {r['comparisons_per_s']:.1f} "
            f"| {r['comparisons_per_s'] / base['pairs']['comparisons_per_s']:.2f} "
            f"| {r['comparisons_per_s'] / base['pairs_padded']['comparisons_per_s']:.2f} "
            f"| {r['computed_tokens_per_comparison']:.0f} | {r['peak_memory_mib']:.0f} |"
        )
    with open(args.out + ".json", "w") as f:
        json.dump({"command": lines[0], "rows": results}, f, indent=1)
    return "\n".join(lines) + "\n"
