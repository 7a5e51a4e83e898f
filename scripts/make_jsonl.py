"""Write a synthetic JSONL of conversational preference pairs, of chat-like lengths, for data-path benchmarks.

    python -m scripts.make_jsonl big.jsonl --mb 400      # about 400 MB, from the repo root

Each row is `{"chosen": [messages], "rejected": [messages]}` in the Tulu conversational format, made
of the toy vocabulary (so the toy tokenizer reads every word and nothing is downloaded). Lengths
follow the long-tailed shape of real chat preference data (counted in words, about a token each
in real text): a prompt of median 80 words, a response of median 200, both log-normal and
clipped; a quarter of the rows open with a system turn and a fifth are multi-turn (one or two
earlier exchanges). The file is written row by row and stops at the first row past the size.
"""

import argparse
import json
import math
import random

from minrm.data import toy


def _words(rng: random.Random, median: int, sigma: float, most: int) -> str:
    n = min(most, max(1, round(rng.lognormvariate(math.log(median), sigma))))
    return " ".join(rng.choices(toy.WORDS, k=n))


def conversation_pair(rng: random.Random) -> dict:
    """One pair: a shared prompt (system turn, earlier exchanges, the user's turn), two answers."""
    prompt = [{"role": "system", "content": toy.SYSTEM}] if rng.random() < 0.25 else []
    for _ in range(rng.choice((1, 2)) if rng.random() < 0.2 else 0):
        prompt += [
            {"role": "user", "content": _words(rng, 40, 0.8, 600)},
            {"role": "assistant", "content": _words(rng, 150, 0.7, 1500)},
        ]
    prompt.append({"role": "user", "content": f"copy: {_words(rng, 80, 1.0, 2000)}"})
    answer = [{"role": "assistant", "content": _words(rng, 200, 0.8, 3000)} for _ in range(2)]
    return {"chosen": prompt + answer[:1], "rejected": prompt + answer[1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="the .jsonl file to write")
    parser.add_argument("--mb", type=float, default=400, help="size to reach, in MB (10^6 bytes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng, size, rows = random.Random(args.seed), 0, 0
    with open(args.path, "w") as f:
        while size < args.mb * 1e6:
            line = json.dumps(conversation_pair(rng)) + "\n"
            size += len(line)  # ASCII: one byte a character
            rows += 1
            f.write(line)
    print(f"{args.path}: {rows} pairs, {size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
