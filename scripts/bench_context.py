"""The long-context profile of scripts/bench.py: training steps on one long row, with --context_parallel_size
C = 1, 2, 4 (model/context_parallel.py), each C a `torchrun` of C processes (one context group).

    python -m scripts.bench --profile longcontext --context_tokens 8192 --size 20m --steps 2

The row is a pair of --context_tokens computed tokens (--context_batching shared_prefix: a prompt of half of
them and two responses of a quarter; packed: a prompt of a quarter, computed twice): long traces compared.
Each step is minrm's: `forward_backward` of the FSDP2-sharded model (bf16 compute on GPU) and AdamW. Per C:
the tokens of the row computed per second by the group, the step's seconds, and per process the peak memory
(VmHWM above the memory after the model was built, on CPU; max allocated on GPU) and the bytes autograd keeps
for the backward at the end of the largest step's forward (the activations, what C divides). On a CPU the processes share its cores (each C gets cores / C threads apiece):
its tokens/s says what the all-to-alls cost there, not what C GPUs gain.
"""

import json
import os
import random
import subprocess
import sys
import time
import types

import torch
import torch.distributed as dist
from transformers import AutoModelForSequenceClassification

from minrm.data.batching import collate, to_device
from minrm.distributed import init_distributed
from minrm.model.reward import prepare, shard_model
from minrm.train import build_optimizer, forward_backward
from scripts.bench_inputs import VOCAB, model_config

SIZES_C = (1, 2, 4)


def long_pair(tokens: int, seed: int, batching: str = "shared_prefix") -> dict:
    """A pair of `tokens` computed tokens: responses of tokens / 4 after a prompt of tokens / 2 (shared_prefix,
    which computes it once) or tokens / 4 (packed, twice)."""
    rng = random.Random(seed)
    prompt = [rng.randrange(3, VOCAB) for _ in range(tokens // (2 if batching == "shared_prefix" else 4))]
    responses = [prompt + [rng.randrange(3, VOCAB) for _ in range(tokens // 4)] for _ in range(2)]
    return {"prompt": prompt, "responses": responses, "scores": [1.0, 0.0]}


def memory_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def worker(c: int, tokens: int, size: str, steps: int, batching: str) -> dict:
    """C processes' training steps on long pairs; rank 0's figures (every rank's memory)."""
    d = init_distributed(None, c)
    cuda = d.device.type == "cuda"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(model_config(size)).to(d.device)
    flags = types.SimpleNamespace(gradient_checkpointing=False, batching=batching, packed_attention="auto",
                                  loss="bradley_terry", center_rewards_coefficient=None)  # fmt: skip
    prepare(model, flags, cuda, d.context)
    shard_model(model, d, None)
    optimizer = build_optimizer(model, types.SimpleNamespace(learning_rate=1e-5, eps=1e-5, weight_decay=0.01))
    base = memory_mib("VmRSS")
    kept, seconds = {}, []

    def pack(t):  # the bytes autograd keeps for the backward, each storage once, the (gathered) weights left out
        if not isinstance(t if t._base is None else t._base, torch.nn.Parameter):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    kept_per_step = []
    for step in range(steps + 1):  # step 0 warms up
        kept.clear()  # what this step's forward keeps (all of it alive at the forward's end)
        batch = to_device(collate([long_pair(tokens, step, batching)], 0, batching), d.device)
        dist.barrier()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward_backward(model, batch, flags, rows=1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        kept_per_step.append(sum(kept.values()))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # the shards: what FSDP gathers
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else memory_mib("VmHWM") - base
    mine = {"peak_memory_mib": round(peak, 1), "kept_for_backward_mib": round(max(kept_per_step) / 2**20, 1),
            "weight_shard_mib": round(weights / 2**20, 1)}  # fmt: skip
    every = [None] * d.world_size
    dist.all_gather_object(every, mine)
    dist.destroy_process_group()
    step = min(seconds[1:])
    return {"C": c, "tokens": tokens, "size": size, "batching": batching, "step_s": round(step, 3),
            "tokens_per_s": round(tokens / step), "per_process": every}  # fmt: skip


def run_longcontext(args, command: str) -> str:
    """Each C in a torchrun of its own; writes OUT.json and OUT.md, returns the table."""
    rows = []
    for c in SIZES_C:
        threads = str(max(1, (os.cpu_count() or 1) // c)) if not torch.cuda.is_available() else "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(c),
               "-m", "scripts.bench_context", str(c), str(args.context_tokens), args.size, str(args.steps),
               args.context_batching]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": threads})
        if out.returncode:
            raise SystemExit(f"bench: C = {c} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"`{command}`", "", "| C | tokens/s | step s | peak memory MiB per process | kept for backward MiB | "
             "x C = 1's kept |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        kept = max(p["kept_for_backward_mib"] for p in row["per_process"])
        peak = max(p["peak_memory_mib"] for p in row["per_process"])
        ratio = kept / max(p["kept_for_backward_mib"] for p in rows[0]["per_process"])
        lines.append(f"| {row['C']} | {row['tokens_per_s']} | {row['step_s']} | {peak} | {kept} | {ratio:.2f} |")
    table = "\n".join(lines) + "\n"
    with open(args.out + ".json", "w") as f:
        json.dump({"command": command, "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(table)
    return table


if __name__ == "__main__":  # one torchrun process: C TOKENS SIZE STEPS BATCHING
    c, tokens, size, steps, batching = sys.argv[1:6]
    result = worker(int(c), int(tokens), size, int(steps), batching)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result), flush=True)
