"""The benchmarks' models and pairs (scripts/bench.py, scripts/bench_score.py): random-init Llama
shapes by parameter count, synthetic preference pairs of two length profiles, or a preference file's
first pairs tokenized as minrm tokenizes them."""

import sys

import numpy as np
from transformers import LlamaConfig

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
    from minrm.config import parse_args
    from minrm.data.batching import rows_at
    from minrm.data.mixer import build_side
    from minrm.data.tokenizer import load_tokenizer

    flags = ["--dataset_mixer_list", path, "1.0", "--max_token_length", "2048", "--max_prompt_token_length", "2048"]
    flags += ["--chat_template_name", "tulu"]  # the same format whatever the tokenizer carries
    if tokenizer_name:
        flags += ["--tokenizer_name_or_path", tokenizer_name]
    args = parse_args(flags)
    ds, _, log = build_side(args.dataset_mixer_list, ["train"], load_tokenizer(args), args, "bench")
    print("\n".join(log), file=sys.stderr)
    pairs = []
    for row in rows_at(ds, list(range(min(n, len(ds))))):
        # A random-init model of VOCAB rows: fold the ids into 1..VOCAB-1 (0 pads).
        fold = [[1 + t % (VOCAB - 1) for t in ids] for ids in (row["prompt"], *row["responses"])]
        pairs.append(dict(zip(("prompt", "chosen", "rejected"), fold)))
    return pairs
