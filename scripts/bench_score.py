"""Scoring throughput: minrm.score's path (each prompt once with all its responses in one packed
row, rows sorted by length into token-budget batches) against Hugging Face's own padded forward
(`model(input_ids, attention_mask).logits`) of the same model on the same rows, batch by batch,
the two interleaved in one process (so load from other processes falls on both alike).

    python -m scripts.bench_score --profile multiturn --responses 4 --rows 256 --out docs/bench_score_multiturn

Synthetic rows of a random-init Llama (scripts/bench.py's profiles and sizes): the prompt and the
first response's length from one draw of the profile, each other response's from a draw of its own
(a `rejected` length). Both paths get the same rows in each forward: minrm.score's batches. bf16 on
GPU, fp32 on CPU; the first batch (the longest) warms both up untimed. Writes OUT.json and OUT.md.
"""

import argparse
import functools
import json
import sys
import time
import types

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification

from minrm.data.batching import computed_tokens, micro_batches, pad_right, row_sizes
from minrm.model.attention import use_packed_attention
from minrm.model.reward import reward_forward
from minrm.score import MAX_TOKENS, score_rows
from scripts.bench_inputs import SIZES, VOCAB, model_config, synthetic_lengths


def synthetic_rows(profile: str, n: int, responses: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    draws = [synthetic_lengths(profile, n, rng) for _ in range(responses - 1)]
    rows = []
    for i in range(n):
        p, c, _ = draws[0][i]
        prompt = rng.integers(1, VOCAB, p).tolist()
        lengths = [c] + [d[i][2] for d in draws]
        responses = [prompt + rng.integers(1, VOCAB, m).tolist() for m in lengths]
        rows.append({"prompt": prompt, "responses": responses, "scores": [1.0] + [0.0] * (len(responses) - 1)})
    return rows


def build(size: str, device: torch.device, packed: bool):
    """The same weights every call (pad id 0, which HF's own pooling looks for; rows use 1..VOCAB-1)."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForSequenceClassification.from_config(model_config(size), dtype=dtype).to(device).eval()
    if packed:  # as minrm.score loads a model
        use_packed_attention(model, "auto", device.type == "cuda")
        model.forward = types.MethodType(reward_forward, model)
    return model


@torch.inference_mode()
def hf_padded(model, rows: list[dict], device: torch.device) -> tuple[list[float], int]:
    """Every (prompt + response) sequence right-padded, through HF's forward; rewards and computed tokens."""
    batch = {k: v.to(device) for k, v in pad_right([s for r in rows for s in r["responses"]], 0).items()}
    return model(**batch).logits[:, 0].float().tolist(), batch["input_ids"].numel()


def minrm_score(model, rows: list[dict], device: torch.device, max_tokens: int) -> tuple[list[float], int]:
    """minrm.score's forward of the rows (collation included); rewards and computed tokens."""
    rewards, _ = score_rows(model, rows, "shared_prefix", max_tokens, 0, device, tqdm(disable=True))
    return [x for r in rewards for x in r], sum(computed_tokens(*row_sizes(r), "shared_prefix") for r in rows)


def time_scoring(rows: list[dict], size: str, max_tokens: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paths = {
        "minrm.score": functools.partial(minrm_score, build(size, device, packed=True), max_tokens=max_tokens),
        "hf_padded": functools.partial(hf_padded, build(size, device, packed=False)),
    }
    totals = {name: dict(seconds=0.0, rows=0, real=0, computed=0) for name in paths}
    worst = 0.0  # the largest reward difference between the two paths
    batches = micro_batches(rows, "shared_prefix", max_tokens=max_tokens, longest_first=True)
    for i, batch in enumerate(batches):
        chunk = [rows[j] for j in batch]
        out = {}
        for name in list(paths)[:: 1 if i % 2 else -1]:  # the order alternates
            start = time.perf_counter()
            out[name] = paths[name](chunk, device)  # both end in .tolist(): the GPU has finished
            if i == 0:
                continue  # warm-up
            t = totals[name]
            t["seconds"] += time.perf_counter() - start
            t["rows"] += len(chunk)
            t["real"] += sum(len(s) for r in chunk for s in r["responses"])
            t["computed"] += out[name][1]
        worst = max(worst, max(abs(a - b) for a, b in zip(out["minrm.score"][0], out["hf_padded"][0])))
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)"
    result = {"device": where, "batches": len(batches) - 1, "max_reward_difference": worst}
    for name, t in totals.items():
        result[name] = {
            "rows_per_s": t["rows"] / t["seconds"],
            "real_tokens_per_s": t["real"] / t["seconds"],
            "computed_tokens": t["computed"],
            "seconds": t["seconds"],
        }
    result["speedup"] = result["minrm.score"]["rows_per_s"] / result["hf_padded"]["rows_per_s"]
    return result


def markdown(r: dict, command: str) -> str:
    lines = [
        f"`{command}`  ",
        f"{r['device']}, {r['batches']} timed batches, largest reward difference {r['max_reward_difference']:.2g}",
        "",
        "| path | rows/s | x HF padded | real tok/s | computed tokens |",
        "|---|---|---|---|---|",
    ]
    for name in ("hf_padded", "minrm.score"):
        t = r[name]
        ratio = t["rows_per_s"] / r["hf_padded"]["rows_per_s"]
        lines.append(
            f"| {name} | {t['rows_per_s']:.1f} | {ratio:.2f} | {t['real_tokens_per_s']:.0f} | {t['computed_tokens']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["multiturn", "longresponse"], default="multiturn")
    parser.add_argument("--responses", type=int, default=4, help="responses per prompt (1 chosen + N-1 rejected)")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--size", choices=list(SIZES), default="9m", help="model shape, by parameter count")
    parser.add_argument("--max_tokens_per_batch", type=int, help="default: 16384 on GPU, 4096 on CPU (minrm.score's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_score", help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    max_tokens = args.max_tokens_per_batch or MAX_TOKENS["cuda" if torch.cuda.is_available() else "cpu"]
    rows = synthetic_rows(args.profile, args.rows, args.responses, args.seed)
    result = time_scoring(rows, args.size, max_tokens)
    command = "python -m scripts.bench_score " + " ".join(sys.argv[1:])
    with open(args.out + ".json", "w") as f:
        json.dump({"command": command, **result}, f, indent=1)
    table = markdown(result, command)
    with open(args.out + ".md", "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
