"""Score preference rows with a reward model: every row's rewards, accuracy overall and per
category, and section scores as RewardBench reports them.

    python -m minrm.score output/my_run --data prefs.jsonl --out scores.jsonl
    torchrun --nproc_per_node 8 -m minrm.score allenai/Llama-3.1-Tulu-3-8B-RM --data allenai/reward-bench-2 \\
        --benchmark rewardbench2 --out rb2.parquet

Rows are in any format minrm.train reads, `rejected` possibly a list (best-of-N): a row is right when its chosen
reward is strictly above every rejected one. Each process holds the whole model and scores every world_size-th row
(--context_parallel_size C: each group of C processes every (world_size / C)-th row, split by tokens), sorted by
length into forwards of `--max_tokens_per_batch` tokens; rank 0 writes them in file order.
"""

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers.hf_argparser import HfArg

from minrm import rewardbench
from minrm.checks import check_model as check_loadable
from minrm.config import BATCHINGS, DATA_FILES, PACKED_ATTENTIONS, Args, Columns, fail, parse_command
from minrm.data.batching import collate, micro_batches, to_device
from minrm.data.mixer import report_bad_rows, tokenize_dataset
from minrm.data.tokenizer import load_tokenizer
from minrm.distributed import Dist, gather_objects, init_distributed, print0
from minrm.model.loss import STATS, row_statistics
from minrm.model.reward import prepare, read_model

# The flags the scorer passes on to minrm.train's loading of the tokenizer and the model.
TRAIN_FLAGS = ("tokenizer_name_or_path", "chat_template_name", "add_bos", "trust_remote_code", "model_revision",
               "batching", "packed_attention", "context_parallel_size")  # fmt: skip
MAX_TOKENS = {"cuda": 16384, "cpu": 4096}  # --max_tokens_per_batch's default


@dataclass(kw_only=True)
class ScoreArgs(Columns):
    """Score preference rows with a reward model: python -m minrm.score MODEL --data FILE [--flag value ...]."""

    model: str = HfArg(help="A folder (minrm's export or any HF reward model) or a Hub id; the first argument.")
    data: str = HfArg(help="A .jsonl/.json/.parquet file or a Hub dataset id.")
    split: str | None = HfArg(default=None, help="Split of a Hub dataset (default train; a --benchmark's: its own).")
    out: str | None = HfArg(default=None, help="Write every row's rewards to this .jsonl or .parquet, the summary beside it.")
    subset_key: str = HfArg(default="subset", help="Column of a row's category (absent: no table).")
    sections: str | None = HfArg(default=None, help="JSON file {section: [categories]} or {section: {category: weight}}.")
    benchmark: Literal[tuple(rewardbench.SPLITS)] | None = HfArg(default=None, help="Score as RewardBench 1 or 2 publish it.")
    batching: Literal[BATCHINGS] = HfArg(default="shared_prefix", help="As minrm.train's; the same rewards.")
    packed_attention: Literal[PACKED_ATTENTIONS] = HfArg(default="auto", help="As minrm.train's.")
    context_parallel_size: int = HfArg(default=1, help="As minrm.train's: processes that split each row's tokens.")
    max_tokens_per_batch: int | None = HfArg(default=None, help="Computed tokens per forward (default 16384 GPU, 4096 CPU).")
    skip_bad_rows: bool = HfArg(default=False, help="Leave bad rows out, counted by reason.")
    tokenizer_name_or_path: str | None = HfArg(default=None, help="Tokenizer (default: the model's).")
    chat_template_name: str | None = HfArg(default=None, help="Chat template, as minrm.train's (and its default).")
    add_bos: bool = HfArg(default=False, help="Prepend bos to the chat template.")
    trust_remote_code: bool = HfArg(default=False, help="Allow the Hub repository's code to run.")
    model_revision: str | None = HfArg(default=None, help="Revision of the model on the Hub.")


def parse_args(argv: list[str] | None = None) -> ScoreArgs:
    args = parse_command(ScoreArgs, argv, "python -m minrm.score", positional=("model",))
    if args.max_tokens_per_batch is not None and args.max_tokens_per_batch < 1:
        fail("max_tokens_per_batch", f"must be at least 1, got {args.max_tokens_per_batch}")
    if args.out and not args.out.endswith((".jsonl", ".parquet")):
        fail("out", f"{args.out!r}: name a .jsonl or .parquet file")
    if args.data.endswith(DATA_FILES) and not Path(args.data).is_file():
        fail("data", f"{args.data!r}: no such file")
    if args.benchmark and args.sections:
        fail("sections", "and --benchmark: give one (a benchmark has its own sections)")
    args.split = args.split or rewardbench.SPLITS.get(args.benchmark, "train")
    args.sections = read_sections(args.sections) if args.sections else None
    return args


def read_sections(path: str) -> dict:
    """The --sections file, checked: each section a list of categories, or categories with weights."""
    try:
        with open(path) as f:
            sections = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        fail("sections", f"{path}: cannot read it as JSON ({e})")
    ok = isinstance(sections, dict) and sections
    for members in sections.values() if ok else ():
        listed = isinstance(members, list) and all(isinstance(c, str) for c in members)
        weighted = isinstance(members, dict) and all(isinstance(w, (int, float)) and w > 0 for w in members.values())
        ok = ok and (listed or weighted) and len(members) > 0
    if not ok:
        expected = "{section: [category, ...]} or {section: {category: weight > 0, ...}}"
        fail("sections", f"{path}: expected {expected}, with at least one category per section")
    return sections


def train_args(args) -> Args:
    """The scorer's model and tokenizer flags as minrm.train's: the same loading and checks."""
    return Args(model_name_or_path=args.model, init_score_head=False, **{k: getattr(args, k) for k in TRAIN_FLAGS})


def check_model(args) -> None:
    """Refuse, before any data is read, a model that does not load (the trainer's checks) or is not a reward model."""
    config = check_loadable(train_args(args), flag="MODEL")
    if (kinds := config.architectures) and not any(k.endswith("ForSequenceClassification") for k in kinds):
        raise SystemExit(f"minrm: error: {args.model} is a {kinds[0]}, not a *ForSequenceClassification reward model")
    if config.num_labels != 1:
        raise SystemExit(f"minrm: error: {args.model} has {config.num_labels} labels; a reward model has one")


# ----------------------------------------------------------------------------------------------
# Rows: this rank's share of the file, tokenized and checked


def read_rows(args, tokenizer, d: Dist) -> list[dict]:
    """This rank's rows (every data_size-th) as {"row", "subset", "id", "prompt", "responses", "scores", "margin"}.
    Every rank gathers all ranks' bad rows, so all stop together with the same list, or skip them."""
    extra = {"subset": args.subset_key, "id": "id"}  # RewardBench pairs Ties by id
    ds, unit = tokenize_dataset(args.data, args.split, tokenizer, args, extra, shard=(d.data_rank, d.data_size))
    rows = ds.to_list()
    bad = [(args.data, unit, r["row"], r["problem"]) for r in rows if r["problem"]]
    # One process of each context-parallel group speaks for it: they hold the same rows.
    gathered = gather_objects((len(rows), bad), "score/read", "read and tokenize its rows")[:: d.world_size // d.data_size]
    total, bad = sum(n for n, _ in gathered), sorted(itertools.chain(*(b for _, b in gathered)), key=lambda b: b[2])
    skipped = report_bad_rows(bad, args.skip_bad_rows)  # stops here without --skip_bad_rows
    if len(bad) == total:
        raise SystemExit(f"minrm: error: {args.data} has no row to score")
    print0("\n".join([f"score: {args.data} [{args.split}]: {total} rows, {len(bad)} bad", *skipped]))
    return [r for r in rows if not r["problem"]]


@torch.inference_mode()
def score_rows(model, rows: list[dict], batching: str, max_tokens: int, pad_id: int, device, bar):
    """Every row's rewards (its responses', in order) and training metrics (`loss.STATS`); a forward per batch."""
    outputs = []  # on the device: no sync per batch, so collation overlaps the GPU
    for batch in micro_batches(rows, batching, max_tokens=max_tokens, longest_first=True):
        inputs, prefs = to_device(collate([rows[i] for i in batch], pad_id, batching), device)
        rewards = model(**inputs)  # (the batch's responses,)
        # (N, K): each row's rewards by response, through the index (identical responses share one)
        outputs.append((batch, rewards[prefs.index], row_statistics(rewards, prefs)))
        bar.update(len(batch))
    rewards, stats = [None] * len(rows), [None] * len(rows)
    for batch, grid, values in outputs:
        for i, row_rewards, row_values in zip(batch, grid.tolist(), values.tolist()):
            rewards[i], stats[i] = row_rewards[: len(rows[i]["responses"])], dict(zip(STATS, row_values))
    return rewards, stats


# ----------------------------------------------------------------------------------------------
# Summary: the training metrics, overall, per category, per section


def means(stats: list[dict]) -> dict:
    """The rows' count and the mean of each metric, every row weighing the same."""
    return {"rows": len(stats), **{name: sum(s[name] for s in stats) / len(stats) for name in STATS}}


def summarize(stats: list[dict], subsets: list[str | None], sections: dict | None = None) -> dict:
    """The rows' metrics overall, per category, and RewardBench's sections of the categories' best-of-N accuracies
    (weighted by row counts, or by the file's weights; their mean the score; a section of no category: None)."""
    summary = means(stats)
    if categories := {c: means([m for s, m in zip(subsets, stats) if s == c]) for c in sorted(set(subsets) - {None})}:
        summary["categories"] = categories
    if sections:
        rows = {c: m["rows"] for c, m in categories.items()}
        weights = {n: m if isinstance(m, dict) else {c: rows[c] for c in m if c in rows} for n, m in sections.items()}
        best = {c: m["best_of_n_accuracy"] for c, m in categories.items()}
        summary["sections"] = scores = rewardbench.weighted_sections(best, weights)
        summary["score"] = rewardbench.weighted_sections(scores, {"score": dict.fromkeys(scores, 1)})["score"]
        summary["missing_categories"] = [c for members in sections.values() for c in members if c not in categories]
    return summary


def report(summary: dict) -> str:
    """The summary as text: a table per category, the section scores."""
    lines = ["| category | rows | accuracy | best of N | chosen | rejected | margin |", "|---|---|---|---|---|---|---|"]
    for name, m in [*summary.get("categories", {}).items(), ("all", summary)]:
        rewards = " | ".join(f"{m[k]:+.4f}" for k in ("chosen_rewards", "rejected_rewards", "reward_margin"))
        lines.append(f"| {name} | {m['rows']} | {m['accuracy']:.4f} | {m['best_of_n_accuracy']:.4f} | {rewards} |")
    if "sections" in summary:
        sections = [*summary["sections"].items(), ("score (mean of the sections)", summary["score"])]
        lines += ["", "| section | score |", "|---|---|"] + [f"| {n} | {rewardbench.number(s)} |" for n, s in sections]
        if summary["missing_categories"]:
            lines.append(f"categories of --sections not in the data: {', '.join(summary['missing_categories'])}")
    return "\n".join(lines)


def write_outputs(path: str, records: list[dict], summary: dict) -> Path:
    """Every row's rewards to PATH (.jsonl or .parquet), the summary to PATH's stem + .summary.json."""
    if path.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))
    summary_path = Path(path).with_suffix(".summary.json")
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary_path


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    check_model(args)
    d = init_distributed(None, args.context_parallel_size)
    tokenizer = load_tokenizer(train_args(args))
    rows = read_rows(args, tokenizer, d)
    max_tokens = args.max_tokens_per_batch or MAX_TOKENS[d.device.type]
    # As minrm.train reads it: the backbone in bf16 on GPU (fp32 on CPU), the score head in fp32 as in training,
    # since a bf16 head rounds every reward to bf16 (steps of 1/64 between 2 and 4): ties.
    cuda, flags = d.device.type == "cuda", train_args(args)
    model = read_model(flags, tokenizer, torch.bfloat16 if cuda else torch.float32).to(d.device)
    model = prepare(model, flags, cuda, d.context).eval()

    start = time.perf_counter()
    with tqdm(total=len(rows), disable=not d.is_main, desc="score", dynamic_ncols=True) as bar:
        rewards, stats = score_rows(model, rows, args.batching, max_tokens, tokenizer.pad_token_id, d.device, bar)
    seconds = time.perf_counter() - start
    print0(f"score: rank 0 scored {len(rows)} rows in {seconds:.1f} s ({len(rows) / seconds:.1f} rows/s)")

    # Every rank's rows back in file order (row numbers increase through the file).
    mine = [(r["row"], r["subset"], r["id"], r["scores"], rw, st) for r, rw, st in zip(rows, rewards, stats)]
    scored = gather_objects(mine, "score/scored", "score its rows")[:: d.world_size // d.data_size]  # one per group
    scored = sorted(itertools.chain(*scored), key=lambda x: x[0])
    categories = any(subset is not None for _, subset, *_ in scored)
    records = []
    for row, subset, row_id, scores, row_rewards, row_stats in scored:
        top = max(scores)  # the chosen responses: the best-scored
        record = {"row": row, "subset": subset} if categories else {"row": row}
        record["chosen_rewards"] = [r for r, s in zip(row_rewards, scores) if s == top]
        record["rejected_rewards"] = [r for r, s in zip(row_rewards, scores) if s != top]
        if args.benchmark:
            record["id"] = row_id
            record["credit"] = rewardbench.credit(args.benchmark, record)
        else:
            record["correct"] = row_stats["best_of_n_accuracy"] == 1.0
        records.append(record)
    if args.benchmark:
        summary = rewardbench.summarize(args.benchmark, records)
    else:  # the training metrics of every row
        summary = summarize([x[5] for x in scored], [x[1] for x in scored], args.sections)
    if d.is_main:
        print((rewardbench.report if args.benchmark else report)(summary), flush=True)
        if args.out:
            print(f"score: wrote {args.out} and {write_outputs(args.out, records, summary)}", flush=True)
    dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
