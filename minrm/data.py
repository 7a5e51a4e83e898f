"""From a dataset mixer list to tokenized preference pairs, and from pairs to padded batches.

Each dataset of the mixer is read, its rows checked and tokenized (`formats.py`: conversational,
explicit-prompt or plain-text rows), bad and over-long rows counted, then its amount taken.
Tokenized, a pair is three id lists: `prompt`, `chosen` and `rejected` (whole sequences). The
collator pads from the right, as the reference does, or packs sequences without padding
(docs/batching.md). The cache is in `dataset_cache.py`.
"""

import collections
import functools
import json
import os
import re

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from minrm import formats, toy
from minrm.config import BATCHINGS
from minrm.distributed import print0

# Named chat templates. `tulu` is the Tulu 3 format: the last assistant turn ends with eos and
# no newline, so the reward is read at the eos token.
CHAT_TEMPLATES = {
    "tulu": (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ '<|system|>\n' + m['content'] + '\n' }}"
        "{% elif m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + '\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ '<|assistant|>\n' + m['content'] + eos_token }}"
        "{% if not loop.last %}{{ '\n' }}{% endif %}{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
        "{% endfor %}"
    ),
    "zephyr": (
        "{% for m in messages %}"
        "{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
        "{% endfor %}"
    ),
    "simple_chat": (
        "{% for m in messages %}"
        "{{ '\n\n' if not loop.first else '' }}{{ m['role'].capitalize() + ': ' + m['content'] }}"
        "{% if loop.last and not add_generation_prompt %}{{ eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}


def load_tokenizer(args) -> PreTrainedTokenizerBase:
    """The tokenizer with its chat template and a pad token distinct from eos."""
    if args.model_name_or_path == toy.TOY and args.tokenizer_name_or_path in (None, toy.TOY):
        tokenizer = toy.toy_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            args.tokenizer_name_or_path or args.model_name_or_path,
            revision=args.tokenizer_revision or args.model_revision,
            trust_remote_code=args.trust_remote_code,
            use_fast=not args.use_slow_tokenizer,
        )
    if args.chat_template_name in CHAT_TEMPLATES:
        tokenizer.chat_template = CHAT_TEMPLATES[args.chat_template_name]
    else:  # the name of a tokenizer whose own template we borrow
        tokenizer.chat_template = AutoTokenizer.from_pretrained(args.chat_template_name).chat_template
    if args.add_bos:
        tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    # Padding with eos would make a real eos look like padding, and vice versa.
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Mixer list: read, check and tokenize each dataset, then take its amount


def read_raw(name: str, split: str) -> tuple[datasets.Dataset, str]:
    """One dataset of the mixer list and the word for its row numbers ("line" for .jsonl).

    A .jsonl file is read line by line into `{"row", "json"}` and parsed while tokenizing, so that
    invalid JSON and rows of mixed types are reported with their line number instead of failing
    inside Arrow's type inference.
    """
    if name == toy.TOY:
        return toy.toy_dataset(split), "row"
    if name.endswith(".jsonl"):
        with open(name, encoding="utf-8") as f:
            lines = [(i, line) for i, line in enumerate(f, start=1) if line.strip()]  # blank lines are not rows
        return datasets.Dataset.from_dict({"row": [i for i, _ in lines], "json": [s for _, s in lines]}), "line"
    if name.endswith((".json", ".parquet")):
        # A data file has one split, which `datasets` calls "train".
        builder = "parquet" if name.endswith(".parquet") else "json"
        return datasets.load_dataset(builder, data_files=name, split="train"), "row"
    return datasets.load_dataset(name, split=split), "row"


def take_indices(n: int, amount: str, seed: int) -> list[int]:
    """Apply a mixer AMOUNT to n rows: a fraction if it has a decimal point, else a row count.

    Fewer rows than n keeps the first ones; more repeats all n whole, then draws the remainder
    without replacement from a fixed seed.
    """
    count = int(float(amount) * n) if "." in amount else int(amount)
    repeats, remainder = divmod(count, n) if n else (0, 0)
    if repeats == 0:
        return list(range(min(count, n)))
    extra = np.random.default_rng(seed).choice(n, size=remainder, replace=False)
    return list(range(n)) * repeats + sorted(extra.tolist())


def take(ds: datasets.Dataset, amount: str, seed: int) -> datasets.Dataset:
    return ds.select(take_indices(len(ds), amount, seed))


def tokenize_dataset(name: str, split: str, tokenizer: PreTrainedTokenizerBase, args) -> tuple[datasets.Dataset, str]:
    """Every row of one dataset tokenized and checked: ids, `problem` ("" if good), `fits`, `row`."""
    raw, unit = read_raw(name, split)
    if "row" not in raw.column_names:
        raw = raw.add_column("row", list(range(len(raw))))
    keys = {"chosen": args.chosen_key, "rejected": args.rejected_key, "prompt": args.prompt_key}
    first = next((r for r in (json_or_none(x) for x in raw.select(range(min(len(raw), 100)))) if r), {})
    fmt = formats.detect_format(first, keys)
    limits = (args.max_prompt_token_length, args.max_token_length)

    def tokenize(row):
        out = formats.tokenize_row(row, fmt, keys, tokenizer)
        out["fits"] = len(out["prompt"]) <= limits[0] and max(len(out["chosen"]), len(out["rejected"])) <= limits[1]
        return out

    # A pool costs a second or two to start: worth it only for thousands of rows.
    num_proc = max(1, min(os.cpu_count() or 1, len(raw) // 5000))
    keep = ["row"]
    ds = raw.map(tokenize, remove_columns=[c for c in raw.column_names if c not in keep], num_proc=num_proc)
    print0(f"data: {name} [{split}]: {len(ds)} rows, format {fmt!r}, tokenized with {num_proc} processes")
    return ds, unit


def json_or_none(row: dict) -> dict | None:
    """The row as a dict (parsing a .jsonl line), or None when it is not valid JSON."""
    if "json" not in row:
        return row
    try:
        parsed = json.loads(row["json"])
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def report_bad_rows(bad: list[tuple[str, str, int, str]], skip: bool) -> list[str]:
    """Stop on bad rows (the first 10 listed, and the total), or with --skip_bad_rows count them by reason."""
    if not bad:
        return []
    if not skip:
        listed = "\n".join(f"  {name} {unit} {row}: {why}" for name, unit, row, why in bad[:10])
        raise SystemExit(
            f"minrm: error: {len(bad)} bad rows in the dataset mixer (the first {min(10, len(bad))}):\n{listed}\n"
            "Fix the data, or pass --skip_bad_rows to leave them out (they are counted by reason)."
        )
    reasons = collections.Counter((name, re.sub(r"\d+", "N", re.sub(r" \(.*\)", "", why))) for name, _, _, why in bad)
    return [f"data: {name}: skipped {n} bad rows: {why}" for (name, why), n in sorted(reasons.items())]


def build_side(mixer: list[str], splits: list[str], tokenizer, args, what: str, holdout: float = 0.0):
    """Mix, check, tokenize and length-filter one side (train or eval).

    Returns (pairs, held-out pairs or None, log lines). Amounts apply to the rows that pass the
    checks and the length filter; `holdout` carves that fraction of each dataset's rows out before
    its amount is taken, so no row (or upsampled copy of it) is on both sides.
    """
    names, amounts = mixer[::2], mixer[1::2]
    splits = splits * len(names) if len(splits) == 1 else splits
    parts, held, bad, log = [], [], [], []
    for name, amount, split in zip(names, amounts, splits):
        if "." not in amount and int(amount) <= 10:
            print0(
                f"data: warning: amount {amount!r} for {name} is a row COUNT ({amount} rows); write 1.0 for all rows."
            )
        ds, unit = tokenize_dataset(name, split, tokenizer, args)
        problems, fits, rows = ds["problem"], ds["fits"], ds["row"]
        bad += [(name, unit, rows[i], why) for i, why in enumerate(problems) if why]
        good = [i for i, why in enumerate(problems) if not why]
        kept = [i for i in good if fits[i]]
        log.append(
            f"data: {what}: {name} [{split}]: {len(ds)} rows, {len(ds) - len(good)} bad, {len(good) - len(kept)} "
            f"dropped by the length filter (prompt > {args.max_prompt_token_length} or chosen/rejected > "
            f"{args.max_token_length} tokens), {len(kept)} kept"
        )
        if holdout > 0:
            order = np.random.default_rng(args.seed).permutation(len(kept))
            n_held = int(round(holdout * len(kept)))
            held.append(ds.select(sorted(kept[i] for i in order[:n_held])))
            kept = sorted(kept[i] for i in order[n_held:])
            log.append(f"data: {name}: {n_held} pairs held out for eval (--eval_fraction {holdout})")
        chosen = [kept[i] for i in take_indices(len(kept), amount, args.seed)]
        parts.append(ds.select(chosen).select_columns(["prompt", "chosen", "rejected"]))
        log.append(f"data: {what}: {name}: amount {amount} -> {len(chosen)} pairs")
    log += report_bad_rows(bad, args.skip_bad_rows)
    pairs = datasets.concatenate_datasets(parts)
    log.append(f"data: {what}: {len(pairs)} pairs")
    if len(pairs) == 0:
        raise SystemExit(f"minrm: error: no {what} pair is left after the checks and the length filter; see above.")
    held_out = datasets.concatenate_datasets(held).select_columns(["prompt", "chosen", "rejected"]) if held else None
    return pairs, held_out, log


def show_pair(pair: dict, tokenizer: PreTrainedTokenizerBase) -> str:
    """One pair's tokens with ANSI colours: prompt tokens blue/cyan, chosen response green/yellow,
    rejected response red/magenta (alternating, so token boundaries show)."""

    def paint(ids: list[int], colours: tuple[int, int]) -> str:
        return "".join(f"\033[{colours[i % 2]}m{tokenizer.decode([t])}\033[0m" for i, t in enumerate(ids))

    n = len(pair["prompt"])
    return (
        f"chosen:   {paint(pair['chosen'][:n], (34, 36))}{paint(pair['chosen'][n:], (32, 33))}\n"
        f"rejected: {paint(pair['rejected'][:n], (34, 36))}{paint(pair['rejected'][n:], (31, 35))}"
    )


# ----------------------------------------------------------------------------------------------
# Collator


def collate(pairs: list[dict], pad_id: int, batching: str = "padded") -> dict:
    """One micro-batch for the model; its rewards come out chosen (B,) then rejected (B,).

    - `padded`: chosen then rejected sequences right-padded to the longest: input_ids and
      attention_mask (2B, T), as the reference does.
    - `packed`: the 2B sequences end to end in one row (1, L) without padding, positions restarting
      per sequence; a token attends only within its sequence.
    - `shared_prefix`: each pair laid out once as prompt + chosen response + rejected response; both
      responses attend to the prompt, the rejected one not to the chosen one, and its positions
      continue from the prompt's end, so each reward equals the one of the full sequence alone.
    Packed modes carry `segments`, who attends to whom: (q_start, q_end, key spans) for each span of
    queries (model.segment_attention, model.packed_attention_mask), and `last_index` (2B,): the flat
    positions to read rewards at.
    """
    if batching == "padded":
        seqs = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention_mask[i, : len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    if batching not in BATCHINGS:
        raise ValueError(f"unknown batching {batching!r}; choose one of {BATCHINGS}")
    ids, pos, segments = [], [], []
    ends = {"chosen": [], "rejected": []}

    def add(tokens: list[int], first_pos: int) -> tuple[int, int]:
        """Append tokens, positions from first_pos; their span of the row."""
        ids.extend(tokens)
        pos.extend(range(first_pos, first_pos + len(tokens)))
        return len(ids) - len(tokens), len(ids)

    if batching == "packed":
        for side in ("chosen", "rejected"):
            for p in pairs:
                s, e = add(p[side], 0)
                segments.append((s, e, ((s, e),)))
                ends[side].append(e - 1)
    else:
        for p in pairs:
            n = shared_prefix_length(p)
            s, _ = add(p["chosen"][:n], 0)  # seen by both responses
            _, a = add(p["chosen"][n:], n)
            _, e = add(p["rejected"][n:], n)
            segments.append((s, a, ((s, a),)))  # prompt + chosen response: causal
            segments.append((a, e, ((s, s + n), (a, e)) if n else ((a, e),)))  # rejected: prompt and itself
            ends["chosen"].append(a - 1)
            ends["rejected"].append(e - 1)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long)[None],
        "position_ids": torch.tensor(pos, dtype=torch.long)[None],
        "last_index": torch.tensor(ends["chosen"] + ends["rejected"], dtype=torch.long),
        "segments": segments,
    }


def shared_prefix_length(pair: dict) -> int:
    """How many leading tokens a pair's two sequences can share: the prompt's ids when they are a
    prefix of both conversations (and leave each a non-empty response), else 0 (the pair falls back
    to two full sequences, as when a chat template renders the prompt differently)."""
    n = len(pair["prompt"])
    ok = all(len(pair[s]) > n and pair[s][:n] == pair["prompt"] for s in ("chosen", "rejected"))
    return n if ok else 0


def micro_batches(pairs: list[dict], size: int, max_tokens: int | None, batching: str) -> list[list[dict]]:
    """Cut one step's pairs (in order) into micro-batches: `size` pairs each, or, given a token
    budget, as few as keep each within `max_tokens` computed tokens (padding included: 2 x pairs x
    longest when padded). A pair over the budget by itself goes alone (`check_token_budget` refuses
    such data up front). The loss and gradient are means over the step's pairs, whatever the cut."""
    if not max_tokens:
        return [pairs[i : i + size] for i in range(0, len(pairs), size)]
    out, chunk, packed, longest = [], [], 0, 0  # packed: the chunk's tokens laid end to end
    for p in pairs:
        c, r = len(p["chosen"]), len(p["rejected"])
        own = c + r - (shared_prefix_length(p) if batching == "shared_prefix" else 0)
        grown = 2 * (len(chunk) + 1) * max(longest, c, r) if batching == "padded" else packed + own
        if chunk and grown > max_tokens:
            out.append(chunk)
            chunk, packed, longest = [], 0, 0
        chunk.append(p)
        packed, longest = packed + own, max(longest, c, r)
    return out + [chunk] if chunk else out


def split_to(chunks: list[list[dict]], k: int) -> list[list[dict]]:
    """`k` micro-batches from `chunks` (k >= len(chunks)), halving the largest until there are k,
    then adding empty ones when too few pairs are left to halve: under FSDP every rank must run the
    same number of forward passes (an empty one runs weightless, see evaluate.py)."""
    chunks = list(chunks)
    while len(chunks) < k:
        i = max(range(len(chunks)), key=lambda j: len(chunks[j]))
        half = len(chunks[i]) // 2
        chunks[i : i + 1] = [chunks[i][:half], chunks[i][half:]] if half else [chunks[i], []]
    return chunks


def check_token_budget(ds: datasets.Dataset | None, max_tokens: int | None, batching: str, what: str) -> None:
    """Refuse, before training, a --max_tokens_per_batch that the longest pair alone exceeds."""
    if not max_tokens or ds is None:
        return
    table = ds.with_format("arrow")[:]
    c, r, p = (pc.list_value_length(table[k]).to_numpy() for k in ("chosen", "rejected", "prompt"))
    need = {"padded": 2 * np.maximum(c, r), "packed": c + r, "shared_prefix": c + r - p}[batching]
    i = int(need.argmax())
    if need[i] > max_tokens:
        raise SystemExit(
            f"minrm: error: --max_tokens_per_batch {max_tokens} is below the {need[i]} tokens that {what} pair "
            f"{i} needs with --batching {batching}; raise the budget or lower --max_token_length."
        )


def device_batch(pairs: list[dict], pad_id: int, batching: str, device: torch.device) -> dict:
    """`collate`, moved to the device: what train.py and evaluate.py feed the model."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(pairs, pad_id, batching).items()}


def pairs_at(ds: datasets.Dataset, indices: list[int]) -> list[dict]:
    """Rows `indices` of a tokenized dataset as a list of {"prompt", "chosen", "rejected"} dicts."""
    columns = ds[indices]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def stream_indices(start: int, count: int, n: int, seed: int) -> list[int]:
    """Positions [start, start + count) of the training stream: epoch after epoch of the n pairs,
    each epoch in its own seeded order. A batch that runs past an epoch's end takes the rest from
    the next epoch, so every optimizer step is a full batch (the reference instead steps on a
    partial last batch without logging it or stepping the scheduler, SPEC §2)."""
    out = []
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n)
        out.append(_epoch_order(epoch, n, seed)[i])
    return out


@functools.lru_cache(maxsize=2)
def _epoch_order(epoch: int, n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
