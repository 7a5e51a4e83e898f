"""Throughput of the batching modes, and of a bare loop as their floor: N optimizer steps of a
random-init Llama reward model on synthetic (or a file's) preference pairs. The modes' steps are
timed interleaved in one process, on one model (so load from other processes falls on all alike;
with --repeats R each step runs R times per mode and the fastest run counts); peak memory is taken
in a fresh process per mode on CPU, per mode in the same process on GPU. Mode `bare` is the
reference's step with nothing of minrm's: Hugging Face's own forward on right-padded chosen +
rejected sequences, -logsigmoid loss, backward, torch's AdamW as the reference builds it. Every
mode is held to its rate per computed token.

    python -m scripts.bench --profile multiturn --pairs 4 --steps 8 --out bench_multiturn
    python -m scripts.bench --data prefs.parquet --tokenizer allenai/Llama-3.1-Tulu-3-8B-SFT

Per mode: pairs/s, real tokens/s (chosen + rejected tokens, as the reference counts them), the
fraction of computed tokens that are padding or a repeated prompt, computed tokens/s (every token
the model runs, padding included) as a fraction of padded's and of bare's, over the whole step and
over forward and backward alone (the optimizer step costs the same per step, whatever its tokens),
achieved FLOP/s and its ratio to a matmul peak measured in the same run, and peak memory (RSS on CPU, max
allocated on GPU). FLOPs are 6 x non-embedding params per computed token plus 12 x layers x hidden
per attended (query, key) pair that the mask allows. Before timing, each mode's rewards and loss on
the first batch are compared with bare's, on the same weights. Writes OUT.json and OUT.md. Batches
and rewards come from minrm's `collate` and `reward_forward`; this file only times them. On a GPU
the model is bf16 and the step plain SGD (bare's too), so that `--size 8b` fits one 80 GB GPU.
"""

import argparse
import contextlib
import copy
import json
import os
import resource
import subprocess
import sys
import time
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from minrm.config import BATCHINGS, PACKED_ATTENTIONS
from minrm.data.batching import collate, to_device
from minrm.distributed import init_distributed
from minrm.model.reward import prepare, shard_model
from minrm.train import build_optimizer, forward_backward
from scripts.bench_context import run_longcontext
from scripts.bench_dialogue import run_dialogue
from scripts.bench_inputs import SIZES, file_pairs, model_config, synthetic_pairs
from scripts.bench_ranked import run_ranked

MODES = ("bare", *BATCHINGS)




def as_rows(pairs: list[dict]) -> list[dict]:
    """Pairs as the trainer's rows: a prompt with two responses, the chosen one preferred."""
    return [{"prompt": p["prompt"], "responses": [p["chosen"], p["rejected"]], "scores": [1.0, 0.0]} for p in pairs]


def shared_prefix_length(pair: dict) -> int:
    return len(pair["prompt"])  # the synthetic pairs' prompt ids begin both sequences


def attended_pairs(pairs: list[dict], batching: str) -> int:
    """(query, key) pairs the mask allows: what a block-sparse or varlen kernel computes."""
    tri = lambda n: n * (n + 1) // 2  # noqa: E731
    total = sum(tri(len(p["chosen"])) + tri(len(p["rejected"])) for p in pairs)
    if batching == "shared_prefix":
        total -= sum(tri(shared_prefix_length(p)) for p in pairs)  # the prompt's own block, once
    if batching in ("padded", "bare"):
        width = max(len(s) for p in pairs for s in (p["chosen"], p["rejected"]))
        total = 2 * len(pairs) * tri(width)
    return total


@contextlib.contextmanager
def one_process():
    """A process group of one (the trainer's: minrm.distributed), for the FSDP2 model; gone after,
    with the rank variables it set (a process started later would take itself for torchrun's)."""
    environ = dict(os.environ)
    d = init_distributed()
    try:
        yield d
    finally:
        dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


def build(d, size: str, packed_attention: str = "auto", modes=MODES):
    """Each mode's model, optimizer and attention, from one set of weights. The minrm modes share the
    trainer's model: `reward_forward` and the packed attention (model/reward.py's `prepare`), FSDP2
    sharding (one process) and minrm's AdamW; bare gets a plain Hugging Face copy and torch's AdamW
    as the reference builds it. On a GPU bf16 weights and a stateless SGD step for every mode, so
    that `--size 8b --modes padded packed shared_prefix` fits one 80 GB GPU (16 GB of weights, 16 of
    gradients, no Adam state)."""
    torch.manual_seed(0)
    cuda = d.device.type == "cuda"
    with d.device:
        plain = AutoModelForSequenceClassification.from_config(
            model_config(size), dtype=torch.bfloat16 if cuda else torch.float32
        )
    models, optimizers, attention = {}, {}, {"bare": plain.config._attn_implementation}
    if any(m != "bare" for m in modes):
        flags = types.SimpleNamespace(gradient_checkpointing=False, batching="packed", packed_attention=packed_attention)
        minrm = prepare(plain if "bare" not in modes else copy.deepcopy(plain), flags, cuda)
        shard_model(minrm, d, "no")  # FSDP2 in the weights' own dtype
        adamw = types.SimpleNamespace(learning_rate=1e-4, eps=1e-5, weight_decay=0.01)
        step = torch.optim.SGD(minrm.parameters(), lr=1e-4) if cuda else build_optimizer(minrm, adamw)
        for m in BATCHINGS:
            models[m], optimizers[m] = minrm, step
            attention[m] = attention["bare"] if m == "padded" else minrm.config._attn_implementation
    if "bare" in modes:
        models["bare"] = plain
        params = plain.parameters()
        optimizers["bare"] = torch.optim.SGD(params, lr=1e-4) if cuda else torch.optim.AdamW(params, lr=1e-4, eps=1e-5)
    return models, optimizers, attention


def bare_rewards(model, pairs: list[dict], device: torch.device) -> tuple[torch.Tensor, int]:
    """The reference's forward, nothing of minrm's: chosen then rejected sequences right-padded with
    id 0, through Hugging Face's own forward (which scores every position and pools at the last
    token that is not the pad id), bypassing the `reward_forward` this model carries for the other
    modes. Rewards (2B,) and the computed tokens."""
    seqs = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    width = max(len(s) for s in seqs)
    input_ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)  # (2B, T)
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (2B, 1)
    return logits.squeeze(-1).float(), input_ids.numel()


def rewards_of(models: dict, attention: dict, pairs: list[dict], mode: str, device) -> tuple[torch.Tensor, int]:
    """A mode's rewards (2B,), chosen then rejected, and its computed tokens."""
    model = models[mode]
    if model.config._attn_implementation != attention[mode]:
        model.set_attn_implementation(attention[mode])
    if mode == "bare":
        return bare_rewards(model, pairs, device)
    inputs, _ = to_device(collate(as_rows(pairs), 0, mode), device)
    rewards = model(**inputs).view(-1, 2)  # each pair's two responses side by side
    return torch.cat([rewards[:, 0], rewards[:, 1]]), inputs["input_ids"].numel()


LOSS_FLAGS = types.SimpleNamespace(loss="bradley_terry", center_rewards_coefficient=None)


def train_step(models: dict, optimizers: dict, attention: dict, pairs: list[dict], mode: str, device):
    """One optimizer step on one micro-batch: its computed tokens, the seconds of forward and
    backward, and the seconds of the optimizer step (a cost per step, whatever the tokens). The
    minrm modes run the trainer's own micro-batch (train.forward_backward), bare the reference's."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    model = models[mode]
    if model.config._attn_implementation != attention[mode]:
        model.set_attn_implementation(attention[mode])
    start = time.perf_counter()
    if mode == "bare":
        rewards, computed = bare_rewards(model, pairs, device)
        chosen, rejected = rewards.chunk(2)
        (-F.logsigmoid(chosen - rejected).mean()).backward()
    else:
        batch = to_device(collate(as_rows(pairs), 0, mode), device)
        forward_backward(model, batch, LOSS_FLAGS, rows=len(pairs))
        computed = batch[0]["input_ids"].numel()
    sync()
    middle = time.perf_counter()
    optimizers[mode].step()
    optimizers[mode].zero_grad(set_to_none=True)
    sync()
    return computed, middle - start, time.perf_counter() - middle


def parity(models: dict, attention: dict, pairs: list[dict], modes: list[str], device: torch.device) -> dict:
    """Each mode's largest reward difference and its loss difference against bare's (else the first
    mode's) on one batch, on the same weights. Run with autograd on, as a step runs, so that a
    compiled attention compiles here the graphs the steps reuse."""
    out = {}
    for m in modes:
        rewards = rewards_of(models, attention, pairs, m, device)[0].detach().double()
        chosen, rejected = rewards.chunk(2)
        out[m] = rewards, -F.logsigmoid(chosen - rejected).mean()
    ref_rewards, ref_loss = out["bare" if "bare" in out else modes[0]]
    return {
        m: {
            "reward_difference": (r - ref_rewards).abs().max().item(),
            "loss_difference": (loss - ref_loss).abs().item(),
        }
        for m, (r, loss) in out.items()
    }


def time_modes(
    modes: list[str],
    pairs: list[dict],
    per_batch: int,
    steps: int,
    size: str,
    repeats: int = 1,
    packed_attention: str = "auto",
) -> list[dict]:
    """All modes in one process on one model, their steps interleaved (the order rotating), so
    that load from other processes on a shared machine falls on every mode alike; step 0 warms up. With repeats,
    each step runs that many times per mode and the fastest counts: a step slowed by another
    process is dropped rather than averaged in. On GPU each mode's peak memory too (max allocated
    over its steps: the weights are shared, its gradients and activations are its own)."""
    with one_process() as d:
        return timed(d, modes, pairs, per_batch, steps, size, repeats, packed_attention)


def timed(d, modes, pairs, per_batch, steps, size, repeats, packed_attention) -> list[dict]:
    device = d.device
    run = build(d, size, packed_attention, modes)
    models, _, attention = run
    cfg = model_config(size)
    params = sum(p.numel() for p in models[modes[0]].parameters()) - cfg.vocab_size * cfg.hidden_size
    totals = {
        m: dict(seconds=0.0, forward_backward=0.0, pairs=0, real=0, unique=0, computed=0, flops=0.0) for m in modes
    }
    checks = parity(models, attention, pairs[:per_batch], modes, device)
    peaks = dict.fromkeys(modes, 0.0)
    turn = 0
    for i in range(steps + 1):
        batch = pairs[i * per_batch : (i + 1) * per_batch]
        fastest = {}
        for _ in range(repeats if i else 1):
            turn += 1
            for m in modes[turn % len(modes) :] + modes[: turn % len(modes)]:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                computed, model_s, step_s = train_step(*run, batch, m, device)
                if device.type == "cuda":
                    peaks[m] = max(peaks[m], torch.cuda.max_memory_allocated() / 2**20)
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
            attended = 12 * cfg.num_hidden_layers * cfg.hidden_size * attended_pairs(batch, m)
            t["flops"] += 6 * params * computed + attended
    rows = [
        {
            "mode": m,
            "attention": attention[m],
            "pairs_per_s": t["pairs"] / t["seconds"],
            "real_tokens_per_s": t["real"] / t["seconds"],
            "wasted_fraction": 1 - t["unique"] / t["computed"],
            "computed_tokens_per_s": t["computed"] / t["seconds"],
            "forward_backward_tokens_per_s": t["computed"] / t["forward_backward"],
            "flops_per_s": t["flops"] / t["seconds"],
            "seconds": t["seconds"],
            **checks[m],
        }
        for m, t in totals.items()
    ]
    if device.type == "cuda":
        for row in rows:
            row["peak_memory_mib"] = row["memory_above_base_mib"] = peaks[row["mode"]]
    return rows


def peak_memory(mode: str, pairs: list[dict], per_batch: int, steps: int, size: str, packed_attention: str) -> dict:
    """Peak memory of one mode's training steps on CPU, in a process of its own: peak RSS, and its
    rise over the RSS after the model and optimizer are built."""
    with one_process() as d:
        run = build(d, size, packed_attention, [mode])
        with open("/proc/self/statm") as f:
            base = int(f.read().split()[1]) * resource.getpagesize() / 2**20
        for i in range(steps + 1):
            train_step(*run, pairs[i * per_batch : (i + 1) * per_batch], mode, d.device)
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
    def first(mode: str) -> dict:
        return next((r for r in rows if r["mode"] == mode), rows[0])

    base, bare = first("padded"), first("bare")
    attention = ", ".join(f"{r['mode']} {r['attention']}" for r in rows)
    parity = ", ".join(f"{r['mode']} {r['reward_difference']:.1e} / {r['loss_difference']:.1e}" for r in rows)
    lines = [
        f"`{command}`  ",
        f"matmul peak: {peak / 1e9:.1f} GFLOP/s; attention: {attention}  ",
        f"rewards (largest difference) / loss against {bare['mode']}'s on the first batch: {parity}",
        "",
        "| mode | pairs/s | x padded | real tok/s | padding+repeated prompt | computed tok/s | x padded "
        "| fwd+bwd only | x bare | fwd+bwd x bare | GFLOP/s | of peak | peak MiB | above base MiB | x padded |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        computed, model = r["computed_tokens_per_s"], r["forward_backward_tokens_per_s"]
        lines.append(
            f"| {r['mode']} | {r['pairs_per_s']:.2f} | {r['pairs_per_s'] / base['pairs_per_s']:.2f} "
            f"| {r['real_tokens_per_s']:.0f} | {r['wasted_fraction']:.1%} | {computed:.0f} "
            f"| {computed / base['computed_tokens_per_s']:.1%} | {model / base['forward_backward_tokens_per_s']:.1%} "
            f"| {computed / bare['computed_tokens_per_s']:.1%} | {model / bare['forward_backward_tokens_per_s']:.1%} "
            f"| {r['flops_per_s'] / 1e9:.1f} "
            f"| {r['flops_per_s'] / peak:.1%} | {r['peak_memory_mib']:.0f} | {r['memory_above_base_mib']:.0f} "
            f"| {r['memory_above_base_mib'] / base['memory_above_base_mib']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    profiles = ["multiturn", "longresponse", "ranked", "dialogue", "longcontext"]
    parser.add_argument("--profile", choices=profiles, default="multiturn")
    parser.add_argument("--context_tokens", type=int, default=8192, help="longcontext: the row's computed tokens")
    parser.add_argument("--context_batching", choices=["shared_prefix", "packed"], default="shared_prefix",
                        help="longcontext: how the pair is laid out")  # fmt: skip
    parser.add_argument("--data", help="a preference file (.jsonl/.json/.parquet, any row format minrm reads)")
    parser.add_argument("--tokenizer", help="tokenizer for --data (default: the toy one)")
    parser.add_argument("--pairs", type=int, default=4, help="pairs (rows of 4 with --profile ranked) per optimizer step")
    parser.add_argument(
        "--steps",
        type=int,
        help="timed optimizer steps, after one warm-up step (default 8; dialogue: the first STEPS of its epoch, "
        "default all 75)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each step per mode; the fastest counts")
    parser.add_argument("--size", choices=list(SIZES), default="9m", help="model shape, by parameter count")
    parser.add_argument("--workdir", help="dialogue: the folder of its model, pairs and runs (default: a new temp one)")
    parser.add_argument(
        "--profile_loop", nargs="*", choices=MODES, default=[], help="dialogue: cProfile these systems' loops too"
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--packed_attention", choices=PACKED_ATTENTIONS, default="auto", help="the packed modes' attention, as in minrm"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench", help="writes OUT.json and OUT.md")
    parser.add_argument("--one_mode", help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    parser.add_argument("--bare", help=argparse.SUPPRESS)  # internal: dialogue's bare loop on a work folder
    parser.add_argument("--bare_profile", help=argparse.SUPPRESS)  # internal: ... under cProfile, stats there
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.profile == "dialogue":  # the trainer's whole loop on real lengths: scripts/bench_dialogue.py
        run_dialogue(args, "python -m scripts.bench " + " ".join(sys.argv[1:]))
        return
    if args.profile == "longcontext":  # C = 1, 2, 4 on one long row: scripts/bench_context.py
        args.steps, args.out = args.steps or 2, args.out if args.out != "bench" else "bench_longcontext"
        print(run_longcontext(args, "python -m scripts.bench " + " ".join(sys.argv[1:])), flush=True)
        return
    args.steps = args.steps or 8
    if args.profile == "ranked":  # rows of 4 responses: scripts/bench_ranked.py
        print(run_ranked(args, build, one_process), flush=True)
        return
    n = args.pairs * (args.steps + 1)
    if args.data:
        pairs = file_pairs(args.data, args.tokenizer, n)
    else:
        pairs = synthetic_pairs(args.profile, n, args.seed)
    if args.one_mode:
        memory = peak_memory(args.one_mode, pairs, args.pairs, args.steps, args.size, args.packed_attention)
        print(json.dumps(memory))
        return
    peak = matmul_peak()
    rows = time_modes(args.modes, pairs, args.pairs, args.steps, args.size, args.repeats, args.packed_attention)
    for row in rows:  # on CPU a fresh process per mode: peak RSS is per process
        mode = row["mode"]
        if not torch.cuda.is_available():
            out = subprocess.run(
                [sys.executable, "-m", "scripts.bench", *sys.argv[1:], "--one_mode", mode],
                capture_output=True,
                text=True,
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
