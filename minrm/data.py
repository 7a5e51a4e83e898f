"""From a dataset mixer list to tokenized preference pairs, and from pairs to padded batches.

A row is a Tulu-style conversation pair `{"chosen": [messages], "rejected": [messages]}` whose
prompt is every message of `chosen` but the last. Tokenized, a pair is three id lists:
`prompt` (template applied with the generation prompt), `chosen` and `rejected` (whole
conversations). The collator pads from the right, as the reference does, or packs sequences
without padding (docs/batching.md).
"""

import functools

import datasets
import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from minrm import toy
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
# Mixer list


def load_raw(name: str, split: str) -> datasets.Dataset:
    """One dataset of the mixer list: the toy set, a local file, or a Hub id."""
    if name == toy.TOY:
        return toy.toy_dataset(split)
    for ext, builder in ((".jsonl", "json"), (".json", "json"), (".parquet", "parquet")):
        if name.endswith(ext):
            # A data file has one split, which `datasets` calls "train".
            return datasets.load_dataset(builder, data_files=name, split="train")
    return datasets.load_dataset(name, split=split)


def take(ds: datasets.Dataset, amount: str, seed: int) -> datasets.Dataset:
    """Apply a mixer AMOUNT: a fraction if it has a decimal point, else a row count.

    Fewer rows than the dataset keeps the first ones; more repeats the dataset whole, then
    draws the remainder without replacement from a fixed seed.
    """
    n = int(float(amount) * len(ds)) if "." in amount else int(amount)
    repeats, remainder = divmod(n, len(ds))
    if repeats == 0:
        return ds.select(range(n))
    extra = np.random.default_rng(seed).choice(len(ds), size=remainder, replace=False)
    return ds.select(list(range(len(ds))) * repeats + sorted(extra.tolist()))


def mix(mixer: list[str], splits: list[str], seed: int) -> datasets.Dataset:
    names, amounts = mixer[::2], mixer[1::2]
    splits = splits * len(names) if len(splits) == 1 else splits
    parts = []
    for name, amount, split in zip(names, amounts, splits):
        ds = take(load_raw(name, split), amount, seed)
        parts.append(ds.select_columns(["chosen", "rejected"]))
        print0(f"data: {name} [{split}] amount {amount}: {len(ds)} pairs")
    return datasets.concatenate_datasets(parts)


# ----------------------------------------------------------------------------------------------
# Tokenization and the length filter


def tokenize_pair(row: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
    def ids(messages, generation_prompt=False):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, return_dict=False)

    return {
        "prompt": ids(row["chosen"][:-1], generation_prompt=True),
        "chosen": ids(row["chosen"]),
        "rejected": ids(row["rejected"]),
    }


def build_dataset(mixer, splits, tokenizer, args, what: str) -> datasets.Dataset:
    """Mix, tokenize and length-filter one side (train or eval); report what the filter dropped."""
    raw = mix(mixer, splits, args.seed)
    tokenized = raw.map(tokenize_pair, fn_kwargs={"tokenizer": tokenizer}, remove_columns=raw.column_names)

    def fits(row):
        return (
            len(row["prompt"]) <= args.max_prompt_token_length
            and len(row["chosen"]) <= args.max_token_length
            and len(row["rejected"]) <= args.max_token_length
        )

    kept = tokenized.filter(fits)
    print0(
        f"data: {what}: {len(kept)} pairs kept, {len(tokenized) - len(kept)} dropped by the length filter "
        f"(prompt > {args.max_prompt_token_length} or chosen/rejected > {args.max_token_length} tokens)"
    )
    if len(kept) == 0:
        raise SystemExit(f"minrm: error: no {what} pair is left after the length filter; raise --max_token_length.")
    return kept


# ----------------------------------------------------------------------------------------------
# Collator


def collate(pairs: list[dict], pad_id: int, batching: str = "padded") -> dict[str, torch.Tensor]:
    """One micro-batch for the model; its rewards come out chosen (B,) then rejected (B,).

    - `padded`: chosen then rejected sequences right-padded to the longest: input_ids and
      attention_mask (2B, T), as the reference does.
    - `packed`: the 2B sequences end to end in one row (1, L) without padding, positions restarting
      per sequence; `doc_ids` name each token's sequence, and a token attends only within it.
    - `shared_prefix`: each pair laid out once as prompt + chosen response + rejected response; both
      responses attend to the prompt, the rejected one not to the chosen one, and its positions
      continue from the prompt's end, so each reward equals the one of the full sequence alone.
    Packed modes carry `doc_ids` and `branch_ids` (1, L) from which the model builds its mask
    (model.packed_attention_mask), and `last_index` (2B,): the flat positions to read rewards at.
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
    ids, pos, doc, branch = [], [], [], []
    ends = {"chosen": [], "rejected": []}

    def add(tokens: list[int], first_pos: int, d: int, b: int) -> int:
        ids.extend(tokens)
        pos.extend(range(first_pos, first_pos + len(tokens)))
        doc.extend([d] * len(tokens))
        branch.extend([b] * len(tokens))
        return len(ids) - 1  # the flat index of the last token added

    if batching == "packed":
        for side in ("chosen", "rejected"):
            for p in pairs:
                ends[side].append(add(p[side], 0, len(ends["chosen"]) + len(ends["rejected"]), 0))
    else:
        for i, p in enumerate(pairs):
            n = shared_prefix_length(p)
            add(p["chosen"][:n], 0, i, 0)  # branch 0: seen by both responses
            ends["chosen"].append(add(p["chosen"][n:], n, i, 1))
            ends["rejected"].append(add(p["rejected"][n:], n, i, 2))

    def row(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)[None]

    return {
        "input_ids": row(ids),
        "position_ids": row(pos),
        "doc_ids": row(doc),
        "branch_ids": row(branch),
        "last_index": torch.tensor(ends["chosen"] + ends["rejected"], dtype=torch.long),
    }


def shared_prefix_length(pair: dict) -> int:
    """How many leading tokens a pair's two sequences can share: the prompt's ids when they are a
    prefix of both conversations (and leave each a non-empty response), else 0 (the pair falls back
    to two full sequences, as when a chat template renders the prompt differently)."""
    n = len(pair["prompt"])
    ok = all(len(pair[s]) > n and pair[s][:n] == pair["prompt"] for s in ("chosen", "rejected"))
    return n if ok else 0


def device_batch(pairs: list[dict], pad_id: int, batching: str, device: torch.device) -> dict[str, torch.Tensor]:
    """`collate`, moved to the device: what train.py and evaluate.py feed the model."""
    return {k: v.to(device) for k, v in collate(pairs, pad_id, batching).items()}


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
