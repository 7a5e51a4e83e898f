"""From a dataset mixer list to tokenized rows: each dataset read, its rows checked and tokenized
(`formats.py`), bad and over-long rows and responses counted, then its amount taken.

A tokenized row is a prompt with K responses and the comparisons among them: `prompt` (ids), `responses`
(whole sequences), `scores` (i is preferred to j when its score is higher) and `margin`.
"""

import collections
import contextlib
import math
import os
import re

import datasets
import numpy as np
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from minrm.config import DATA_FILES
from minrm.data import formats, toy
from minrm.data.files import read_local_file
from minrm.distributed import print0

# ----------------------------------------------------------------------------------------------
# Mixer list: read, check and tokenize each dataset, then take its amount


def read_raw(name: str, split: str) -> tuple[datasets.Dataset, str]:
    """One dataset of the mixer list (a local file read by `files.py`, the toy data or a Hub dataset) with
    each row's number in `row`, and the word for those numbers ("line" for JSON lines)."""
    if name.endswith(DATA_FILES):
        ds, unit = read_local_file(name)
    else:
        ds, unit = toy.toy_dataset(split) if name == toy.TOY else _hub_dataset(name, split), "row"
    return ds if "row" in ds.column_names else ds.add_column("row", list(range(len(ds)))), unit


def _hub_dataset(name: str, split: str) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(name, split=split)
    except (OSError, ValueError) as e:  # not found, offline, unknown split
        reason = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise SystemExit(f"minrm: error: dataset {name} [{split}] cannot be loaded ({reason})") from None
    if len(ds) == 0:
        raise SystemExit(f"minrm: error: dataset {name} [{split}] has no rows")
    return ds


def take_indices(n: int, amount: str, seed: int) -> list[int]:
    """Apply a mixer AMOUNT to n rows: a fraction if it has a decimal point, else a row count. Fewer rows
    than n keeps the first ones; more repeats all n whole, then draws the rest without replacement."""
    count = int(float(amount) * n) if "." in amount else int(amount)
    repeats, remainder = divmod(count, n) if n else (0, 0)
    if repeats == 0:
        return list(range(min(count, n)))
    extra = np.random.default_rng(seed).choice(n, size=remainder, replace=False)
    return list(range(n)) * repeats + sorted(extra.tolist())


def mixer_entries(mixer: list[str], splits: list[str]) -> list[tuple[str, str, str]]:
    """(name, amount, split) of each dataset of a mixer list (NAME AMOUNT ...); one split given serves them all."""
    return list(zip(mixer[::2], mixer[1::2], splits * (len(mixer) // 2) if len(splits) == 1 else splits))


ROW_COLUMNS = ["prompt", "responses", "scores", "margin"]  # a tokenized row, as the cache holds it


def column_keys(args) -> dict:
    """The column of each part of a row, from the --*_key flags."""
    return {part: getattr(args, f"{part}_key") for part in "chosen rejected prompt responses scores margin".split()}


def spread(indices: list[int], scores: list[float], most: int) -> list[int]:
    """`most` of the responses `indices` (most >= 2), at evenly spaced ranks by score from the best to
    the worst (equal scores ranked in row order), in row order. The best and the worst are always
    kept, so a row with a comparison keeps one; the ranks between keep the spread of its scores."""
    ranked = sorted(indices, key=lambda i: -scores[i])
    return sorted(ranked[k * (len(ranked) - 1) // (most - 1)] for k in range(most))


def fit_row(row: dict, max_prompt: float | None, max_response: float | None, most: int | None) -> dict:
    """The length filter and --max_responses_per_prompt: `status` "" (kept) or why a row is dropped ("bad", "prompt",
    "comparison"), responses removed (`too_long`, `cut`), a `tie` ranked apart; `prompt`: what all responses begin with."""
    if row["problem"] or len(row["prompt"]) > (max_prompt or math.inf):  # None: no limit (the scorer's)
        return {**row, "status": "bad" if row["problem"] else "prompt", "too_long": 0, "cut": 0, "tie": 0}
    fit = [i for i, ids in enumerate(row["responses"]) if len(ids) <= (max_response or math.inf)]
    too_long = len(row["responses"]) - len(fit)
    if len({row["scores"][i] for i in fit}) < 2:
        return {**row, "status": "comparison", "too_long": too_long, "cut": 0, "tie": 0}
    keep = spread(fit, row["scores"], most) if most is not None and len(fit) > most else fit
    prompt, responses, scores = row["prompt"], [row["responses"][i] for i in keep], [row["scores"][i] for i in keep]
    # The prompt's ids begin every response, each with a tail, unless the chat template renders the
    # prompt differently inside the conversation: such a row shares no prefix, and its prompt is [].
    shared = all(len(s) > len(prompt) and s[: len(prompt)] == prompt for s in responses)
    tie = len(set(zip(map(tuple, responses), scores))) > len(set(map(tuple, responses)))  # a sequence with two scores
    return {**row, "prompt": prompt if shared else [], "responses": responses, "scores": scores, "status": "",
            "too_long": too_long, "cut": len(fit) - len(keep), "tie": int(tie)}  # fmt: skip


def tokenize_dataset(name: str, split: str, tokenizer: PreTrainedTokenizerBase, args, extra: dict | None = None,
                     shard=(0, 1)) -> tuple[datasets.Dataset, str]:  # fmt: skip
    """Every row of one dataset (of its `shard`: every n-th from the i-th) tokenized, checked and length-filtered
    (`fit_row`; the scorer's `args` have no limits), with its `row` number and the `extra` columns ({name: column})."""
    raw, unit = read_raw(name, split)
    keys, extra, sample = column_keys(args), extra or {}, []
    for row in raw.select(range(min(len(raw), 100))):
        with contextlib.suppress(ValueError):  # a row that is not a JSON object is reported as it is tokenized
            sample.append(formats.parse_row(row))
    fmt = formats.detect_format(sample[0] if sample else {}, keys)
    check_columns(name, sample, keys, fmt, tokenizer)
    limits = [getattr(args, f, None) for f in ("max_prompt_token_length", "max_token_length", "max_responses_per_prompt")]
    i32, f64, text = (datasets.Value(t) for t in ("int32", "float64", "string"))
    ids = datasets.List(i32)  # half the disk of Arrow's default int64
    features = {"row": raw.features["row"], "prompt": ids, "responses": datasets.List(ids), "scores": datasets.List(f64),
                "margin": f64, "too_long": i32, "cut": i32, "tie": i32} | dict.fromkeys(["problem", "status", *extra], text)  # fmt: skip
    raw = raw.select(range(shard[0], len(raw), shard[1])) if shard[1] > 1 else raw
    # A pool costs a second or two to start: worth it only for thousands of rows (datasets starts one even for
    # num_proc=1, hence None). The map writes its output beside its input (a local file's, in files.py's scratch
    # folder): on disk.
    num_proc = max(1, min(os.cpu_count() or 1, len(raw) // 5000))
    ds = raw.map(lambda row: fit_row(formats.tokenize_row(row, fmt, keys, tokenizer, extra), *limits),
                 remove_columns=[c for c in raw.column_names if c != "row"], features=datasets.Features(features),
                 num_proc=num_proc if num_proc > 1 else None)  # fmt: skip
    print0(f"data: {name} [{split}]: {len(ds)} rows, format {fmt!r}, tokenized with {num_proc} processes")
    return ds, unit


def check_columns(name: str, sample: list[dict], keys: dict, fmt: str, tokenizer) -> None:
    """Before any row is tokenized, refuse a dataset whose first rows lack a response column (`chosen` and
    `rejected`, or `scores` beside `responses`), or that needs a chat template the tokenizer lacks."""
    columns = set().union(*sample) - {"row"}
    for side in ("scores",) if keys["responses"] in columns else ("chosen", "rejected"):
        if sample and keys[side] not in columns:
            raise SystemExit(
                f"minrm: error: {name}: no column {keys[side]!r} (--{side}_key) in its first {len(sample)} rows; "
                f"its columns are {sorted(columns)}"
            )
    if fmt != "plain" and tokenizer.chat_template is None:
        raise SystemExit(
            f"minrm: error: the tokenizer {tokenizer.name_or_path} has no chat template, and {name} holds "
            f"conversations: name one with --chat_template_name (e.g. --chat_template_name tulu)"
        )


def report_bad_rows(bad: list[tuple[str, str, int, str]], skip: bool) -> list[str]:
    """Stop on bad rows (the first 10 listed, and the total), or with --skip_bad_rows count them by reason."""
    if bad and not skip:
        listed = "\n".join(f"  {name} {unit} {row}: {why}" for name, unit, row, why in bad[:10])
        raise SystemExit(
            f"minrm: error: {len(bad)} bad rows in the dataset mixer (the first {min(10, len(bad))}):\n{listed}\n"
            "Fix the data, or pass --skip_bad_rows to leave them out (they are counted by reason)."
        )
    reasons = collections.Counter((name, re.sub(r"\d+", "N", re.sub(r" \(.*\)", "", why))) for name, _, _, why in bad)
    return [f"data: {name}: skipped {n} bad rows: {why}" for (name, why), n in sorted(reasons.items())]


def _where(ds: datasets.Dataset, column: str, value: str) -> np.ndarray:
    """Positions of the rows whose `column` is `value`, compared in Arrow (no Python object a row)."""
    return np.flatnonzero(pc.equal(ds.data.column(column), value).to_numpy(zero_copy_only=False))


def _total(ds: datasets.Dataset, column: str) -> int:
    return pc.sum(ds.data.column(column)).as_py() or 0


def build_side(mixer: list[str], splits: list[str], tokenizer, args, what: str, holdout: float = 0.0):
    """One side (train or eval) mixed, checked, tokenized and length-filtered: (rows, held-out rows or None,
    log lines). Amounts apply to the rows that pass; `holdout` carves that fraction of each dataset's rows out
    before its amount is taken, so no row (or upsampled copy of it) is on both sides."""
    most = args.max_responses_per_prompt
    parts, held, bad, log = [], [], [], []
    for name, amount, split in mixer_entries(mixer, splits):
        if "." not in amount and int(amount) <= 10:
            print0(f"data: warning: amount {amount!r} for {name} is a row COUNT ({amount} rows); write 1.0 for all rows.")
        ds, unit = tokenize_dataset(name, split, tokenizer, args)
        bad_rows, kept = ds.select(_where(ds, "status", "bad")), _where(ds, "status", "")
        bad += [(name, unit, row, why) for row, why in zip(bad_rows["row"], bad_rows["problem"])]
        long_prompt, no_comparison = len(_where(ds, "status", "prompt")), len(_where(ds, "status", "comparison"))
        responses = pc.list_value_length(ds.data.column("responses")).to_numpy()[kept].sum()
        log.append(
            f"data: {what}: {name} [{split}]: {len(ds)} rows, {len(bad_rows)} bad, {long_prompt + no_comparison} "
            f"dropped by the length filter ({long_prompt} with a prompt > {args.max_prompt_token_length} tokens, "
            f"{no_comparison} left without a comparison), {len(kept)} kept"
        )
        cut = f", {_total(ds, 'cut')} cut by --max_responses_per_prompt {most}" if most else ""
        log.append(
            f"data: {what}: {name}: {responses} responses in the kept rows; "
            f"{_total(ds, 'too_long')} responses > {args.max_token_length} tokens dropped{cut}"
        )
        if ties := _total(ds, "tie"):  # kept, as the reference keeps them
            log.append(
                f"data: {what}: {name}: {ties} kept rows rank identical responses apart (a chosen equal to a "
                "rejected): each such comparison is a tie, trained as the reference does (loss log 2, accuracy 0)"
            )
        if holdout > 0:
            order = np.random.default_rng(args.seed).permutation(len(kept))
            n_held = int(round(holdout * len(kept)))
            held.append(ds.select(np.sort(kept[order[:n_held]])))
            kept = np.sort(kept[order[n_held:]])
            log.append(f"data: {name}: {n_held} rows held out for eval (--eval_fraction {holdout})")
        chosen = kept[take_indices(len(kept), amount, args.seed)]
        parts.append(ds.select(chosen).select_columns(ROW_COLUMNS))
        log.append(f"data: {what}: {name}: amount {amount} -> {len(chosen)} rows")
    log += report_bad_rows(bad, args.skip_bad_rows)
    rows = datasets.concatenate_datasets(parts)
    log.append(f"data: {what}: {len(rows)} rows")
    if len(rows) == 0:
        raise SystemExit(f"minrm: error: no {what} row is left after the checks and the length filter; see above.")
    return rows, datasets.concatenate_datasets(held).select_columns(ROW_COLUMNS) if held else None, log


def show_pair(row: dict, tokenizer: PreTrainedTokenizerBase) -> str:
    """One row's tokens in ANSI colours alternating per token (so token boundaries show): the prompt once, then
    each response after the prompt with its score, the best-scored in green/yellow, the others red/magenta."""

    def paint(ids: list[int], colours: tuple[int, int]) -> str:
        return "".join(f"\033[{colours[i % 2]}m{tokenizer.decode([t])}\033[0m" for i, t in enumerate(ids))

    prompt, best = row["prompt"], max(row["scores"])
    lines = [f"prompt: {paint(prompt, (34, 36))}"]
    for ids, score in zip(row["responses"], row["scores"]):
        lines.append(f"{score:g}: {paint(ids[len(prompt) :], (32, 33) if score == best else (31, 35))}")
    return "\n".join(lines)
