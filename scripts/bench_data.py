"""Tokenization throughput and cache-load speed of minrm's data path, offline.

    python -m scripts.bench_data              # 100k conversational pairs, from the repo root
    python -m scripts.bench_data --n 20000

Writes N Tulu-style pairs of realistic length (a ~120-word prompt, ~250-word responses, some with a
system turn) built from the toy vocabulary to a temporary .jsonl, builds the cache with the toy
tokenizer (checks, chat template, length filter; `datasets.map` over the CPUs), then loads it back.
"""

import argparse
import json
import os
import random
import tempfile
import time

import datasets

from minrm.config import parse_args
from minrm.data import toy
from minrm.data.cache import build_or_load_cache
from minrm.data.tokenizer import load_tokenizer


def write_pairs(path: str, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            words = lambda k: " ".join(rng.choices(toy.WORDS, k=k))  # noqa: E731
            prompt = [{"role": "user", "content": f"copy: {words(rng.randint(60, 180))}"}]
            if rng.random() < 0.25:
                prompt.insert(0, {"role": "system", "content": toy.SYSTEM})
            row = {
                "chosen": prompt + [{"role": "assistant", "content": words(rng.randint(150, 350))}],
                "rejected": prompt + [{"role": "assistant", "content": words(rng.randint(150, 350))}],
            }
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="number of pairs")
    n = parser.parse_args().n
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pairs.jsonl")
        write_pairs(path, n)
        args = parse_args(
            ["--dataset_mixer_list", path, "1.0", "--dataset_local_cache_dir", os.path.join(tmp, "cache")]
        )
        args.max_token_length, args.max_prompt_token_length = 2048, 1024
        tokenizer = load_tokenizer(args)
        start = time.perf_counter()
        build_or_load_cache(args, tokenizer)
        built = time.perf_counter() - start
        start = time.perf_counter()
        cached = datasets.Dataset.from_file(os.path.join(build_or_load_cache(args, tokenizer), "train.arrow"))
        loaded = time.perf_counter() - start
        sequences = [ids for responses in cached[:1000]["responses"] for ids in responses]
        tokens = sum(map(len, sequences)) / len(sequences)
    print(f"cpus: {os.cpu_count()}  pairs: {n}  mean tokens per sequence: {tokens:.0f}")
    print(f"build (read, check, tokenize, filter, save): {built:.1f}s = {n / built:.0f} pairs/s")
    print(f"cache load: {loaded:.2f}s = {built / loaded:.0f}x faster than building")


if __name__ == "__main__":
    main()
