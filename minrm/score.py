"""Score preference rows with a reward model: every row's rewards, accuracy overall and per
category, and section scores as RewardBench reports them.

    python -m minrm.score output/my_run --data prefs.jsonl --out scores.jsonl
    python -m minrm.score allenai/Llama-3.1-Tulu-3-8B-RM --data allenai/reward-bench-2 --split test \\
        --sections sections.json --out rb2.parquet
    torchrun --nproc_per_node 8 -m minrm.score output/my_run --data prefs.jsonl --out scores.jsonl

MODEL is a folder minrm exported or any Hugging Face `*ForSequenceClassification` with one label
(a folder or a Hub id). Rows are in any format minrm.train reads; `rejected` may hold a list of
responses (best-of-N). A row is right when its chosen reward is strictly above every rejected one.
All the responses of a row go through the model in one packed row, the prompt computed once
(`--batching shared_prefix`); rows are sorted by length into batches of `--max_tokens_per_batch`
tokens; bf16 on GPU, fp32 on CPU. Under torchrun each process holds the whole model and scores
every world_size-th row; rank 0 gathers the rewards in file order and writes them.
"""

import argparse
import json
import os
import time
import types

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel

from minrm import formats
from minrm.batching import batch_to_device, collate_responses, token_batches
from minrm.config import BATCHINGS, PACKED_ATTENTIONS, Args
from minrm.data import column_keys, json_or_none, load_tokenizer, read_raw, report_bad_rows
from minrm.distributed import Dist, gather_objects, init_distributed, print0
from minrm.model import reward_forward
from minrm.packed_attention import packing_problem, use_packed_attention

# Flags passed on to data.load_tokenizer as minrm.train's (the chat template: train's default when not given).
TOKENIZER_FLAGS = ("tokenizer_name_or_path", "chat_template_name", "add_bos", "trust_remote_code", "model_revision")
# Padding is masked out and never pooled: any id the embedding has will do (a tokenizer's added
# <pad> may have no row in a model that was trained without it).
PAD = 0
MAX_TOKENS = {"cuda": 16384, "cpu": 4096}  # --max_tokens_per_batch's default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minrm.score", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("model", help="a folder (minrm's export or any HF reward model) or a Hub id")
    p.add_argument("--data", required=True, help="a .jsonl/.json/.parquet file or a Hub dataset id")
    p.add_argument("--split", default="train", help="split of a Hub dataset (a local file has one: train)")
    p.add_argument("--out", help="write every row's rewards to this .jsonl or .parquet file, the summary beside it")
    p.add_argument("--subset_key", default="subset", help="column of a row's category (absent: no table)")
    p.add_argument("--sections", help="JSON file {section: [categories]} or {section: {category: weight}}")
    p.add_argument("--batching", choices=BATCHINGS, default="shared_prefix", help="as minrm.train's; same rewards")
    p.add_argument("--packed_attention", choices=PACKED_ATTENTIONS, default="auto", help="as minrm.train's")
    p.add_argument("--max_tokens_per_batch", type=int, help="computed tokens per forward (default 16384 GPU, 4096 CPU)")
    p.add_argument("--skip_bad_rows", action="store_true", help="leave bad rows out, counted by reason")
    for key, what in (
        ("chosen", "the chosen response"),
        ("rejected", "the rejected response(s)"),
        ("prompt", "the prompt"),
    ):
        p.add_argument(f"--{key}_key", default=key, help=f"column of {what}")
    p.add_argument("--tokenizer_name_or_path", help="tokenizer (default: the model's)")
    p.add_argument(
        "--chat_template_name", default=argparse.SUPPRESS, help="chat template, as minrm.train's (and its default)"
    )
    p.add_argument("--add_bos", action="store_true", help="prepend bos to the chat template")
    p.add_argument("--trust_remote_code", action="store_true", help="allow the Hub repository's code to run")
    p.add_argument("--model_revision", help="revision of the model on the Hub")
    args = p.parse_args(argv)
    if args.max_tokens_per_batch is not None and args.max_tokens_per_batch < 1:
        p.error(f"--max_tokens_per_batch must be at least 1, got {args.max_tokens_per_batch}")
    if args.out and not args.out.endswith((".jsonl", ".parquet")):
        p.error(f"--out {args.out!r}: name a .jsonl or .parquet file")
    if args.data.endswith((".jsonl", ".json", ".parquet")) and not os.path.isfile(args.data):
        p.error(f"--data {args.data!r}: no such file")
    args.sections = read_sections(args.sections) if args.sections else None
    return args


def read_sections(path: str) -> dict:
    """The --sections file, checked: each section a list of categories, or categories with weights."""
    try:
        with open(path) as f:
            sections = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"minrm: error: --sections {path}: cannot read it as JSON ({e})") from None
    ok = isinstance(sections, dict) and sections
    for members in sections.values() if ok else ():
        listed = isinstance(members, list) and all(isinstance(c, str) for c in members)
        weighted = isinstance(members, dict) and all(isinstance(w, (int, float)) and w > 0 for w in members.values())
        ok = ok and (listed or weighted) and len(members) > 0
    if not ok:
        raise SystemExit(
            f"minrm: error: --sections {path}: expected {{section: [category, ...]}} or "
            "{section: {category: weight > 0, ...}}, with at least one category per section"
        )
    return sections


def check_model(args) -> None:
    """Refuse, from the config alone and before any data is read, a model that is not a reward model."""
    try:
        config = AutoConfig.from_pretrained(
            args.model, revision=args.model_revision, trust_remote_code=args.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise SystemExit(f"minrm: error: cannot load the model config of {args.model!r}: {e}") from None
    kinds = config.architectures or []
    if kinds and not any(k.endswith("ForSequenceClassification") for k in kinds):
        raise SystemExit(f"minrm: error: {args.model} is a {kinds[0]}, not a *ForSequenceClassification reward model")
    if config.num_labels != 1:
        raise SystemExit(f"minrm: error: {args.model} has {config.num_labels} labels; a reward model has one")
    if args.batching != "padded" and (problem := packing_problem(config)):
        raise SystemExit(f"minrm: error: {config.model_type} {problem}; use --batching padded")


def load_reward_model(args, device: torch.device) -> PreTrainedModel:
    """The model for inference: bf16 on GPU, fp32 on CPU, eval mode, rewards from `reward_forward`."""
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model,
        revision=args.model_revision,
        trust_remote_code=args.trust_remote_code,
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
    )
    model.to(device).eval()
    if args.batching != "padded":
        use_packed_attention(model, args.packed_attention, device.type == "cuda")
    model.forward = types.MethodType(reward_forward, model)
    return model


# ----------------------------------------------------------------------------------------------
# Rows: this rank's share of the file, tokenized and checked


def read_rows(args, tokenizer, d: Dist) -> tuple[list[dict], list[str]]:
    """This rank's rows (every world_size-th of the file) as {"row", "subset", "prompt", "responses",
    "scores", "margin"} (the chosen responses are those of the top score), and log lines. Bad rows
    are gathered from every rank first, so all stop together with the same list, or skip and count
    them (--skip_bad_rows)."""
    raw, unit = read_raw(args.data, args.split)
    if "row" not in raw.column_names:
        raw = raw.add_column("row", list(range(len(raw))))
    keys = column_keys(args)
    first = next((r for r in (json_or_none(x) for x in raw.select(range(min(len(raw), 100)))) if r), {})
    fmt = formats.detect_format(first, keys)

    def tokenize(row):
        subset = (json_or_none(row) or {}).get(args.subset_key)
        out = formats.tokenize_row(row, fmt, keys, tokenizer)
        return {**out, "subset": None if subset is None else str(subset)}

    mine = raw.select(range(d.rank, len(raw), d.world_size))
    num_proc = max(1, min(os.cpu_count() or 1, len(mine) // 5000))  # a pool pays off for thousands of rows
    keep = ["row"]
    rows = mine.map(tokenize, remove_columns=[c for c in mine.column_names if c not in keep], num_proc=num_proc)
    rows = rows.to_list()
    bad = [(args.data, unit, r["row"], r["problem"]) for r in rows if r["problem"]]
    parts = gather_objects(bad, "score/read", "read and tokenize its rows")
    bad = sorted((b for part in parts for b in part), key=lambda b: b[2])
    log = [f"score: {args.data} [{args.split}]: {len(raw)} rows, format {fmt!r}, {len(bad)} bad"]
    log += report_bad_rows(bad, args.skip_bad_rows)
    if len(bad) == len(raw):
        raise SystemExit(f"minrm: error: {args.data} has no row to score")
    return [r for r in rows if not r["problem"]], log


@torch.inference_mode()
def score_rows(model, rows: list[dict], batching: str, max_tokens: int, device: torch.device, bar) -> list[list]:
    """Every row's rewards, its chosen response's first: batches of similar lengths, each one forward."""
    outputs = []  # (batch, rewards on the device): no sync per batch, so collation overlaps the GPU
    for batch in token_batches(rows, max_tokens, batching):
        inputs = batch_to_device(collate_responses([rows[i] for i in batch], PAD, batching), device)
        outputs.append((batch, model(**inputs)))  # (sum of the batch's responses,)
        bar.update(len(batch))
    rewards = [None] * len(rows)
    for batch, flat in outputs:
        flat = flat.float().tolist()
        for i in batch:
            n = len(rows[i]["responses"])
            rewards[i], flat = flat[:n], flat[n:]
    return rewards


# ----------------------------------------------------------------------------------------------
# Summary: accuracy, mean rewards, per category, per section


def is_correct(chosen: float, rejected: list[float]) -> bool:
    """Best-of-N, as RewardBench 2 scores its 4-candidate rows: right only when the chosen reward is
    strictly above every rejected one; a tie is wrong."""
    return all(chosen > r for r in rejected)


def means(records: list[dict]) -> dict:
    """Accuracy and mean rewards of some rows, each row weighing the same: its rejected reward is the
    mean of its rejected responses', its margin chosen minus that (with one rejected response,
    training's eval metrics)."""
    n = len(records)
    chosen = sum(r["chosen_reward"] for r in records) / n
    rejected = sum(sum(r["rejected_rewards"]) / len(r["rejected_rewards"]) for r in records) / n
    accuracy = sum(r["correct"] for r in records) / n
    return {
        "rows": n,
        "accuracy": accuracy,
        "chosen_rewards": chosen,
        "rejected_rewards": rejected,
        "reward_margin": chosen - rejected,
    }


def section_scores(categories: dict, sections: dict) -> dict:
    """RewardBench's sections: a section's score is the weighted mean of its categories' accuracies,
    weighted by their row counts (a list of categories: the accuracy over the section's rows) or by
    the weights the file gives; the overall score is the plain mean of the section scores. A
    category absent from the data is left out of its section and listed; a section with none
    present has no score."""
    scores, missing = {}, []
    for name, members in sections.items():
        weights = members if isinstance(members, dict) else {c: categories.get(c, {}).get("rows", 0) for c in members}
        present = {c: w for c, w in weights.items() if c in categories}
        missing += [c for c in members if c not in categories]
        total = sum(present.values())
        scores[name] = sum(w * categories[c]["accuracy"] for c, w in present.items()) / total if present else None
    found = [s for s in scores.values() if s is not None]
    return {"sections": scores, "score": sum(found) / len(found) if found else None, "missing_categories": missing}


def summarize(records: list[dict], sections: dict | None = None) -> dict:
    """The figures of a scored file: overall, per category (rows that have one), per section."""
    summary = means(records)
    groups = {}
    for r in records:
        if r.get("subset") is not None:
            groups.setdefault(r["subset"], []).append(r)
    if groups:
        summary["categories"] = {c: means(rs) for c, rs in sorted(groups.items())}
    if sections:
        summary.update(section_scores(summary.get("categories", {}), sections))
    return summary


def report(summary: dict) -> str:
    """The summary as text: one line, a table per category, the section scores."""

    def figures(m: dict) -> str:
        return f"{m['accuracy']:.4f} | {m['chosen_rewards']:+.4f} | {m['rejected_rewards']:+.4f} | {m['reward_margin']:+.4f}"

    lines = ["| category | rows | accuracy | chosen | rejected | margin |", "|---|---|---|---|---|---|"]
    for name, m in summary.get("categories", {}).items():
        lines.append(f"| {name} | {m['rows']} | {figures(m)} |")
    lines = lines if "categories" in summary else []
    lines.append(f"| all | {summary['rows']} | {figures(summary)} |")
    if "sections" in summary:
        lines += ["", "| section | score |", "|---|---|"]
        lines += [f"| {name} | {'-' if s is None else f'{s:.4f}'} |" for name, s in summary["sections"].items()]
        score = summary["score"]
        lines.append(f"| score (mean of the sections) | {'-' if score is None else f'{score:.4f}'} |")
        if summary["missing_categories"]:
            lines.append(f"categories of --sections not in the data: {', '.join(summary['missing_categories'])}")
    return "\n".join(lines)


def write_outputs(path: str, records: list[dict], summary: dict) -> str:
    """Every row's rewards to PATH (.jsonl or .parquet), the summary to PATH's stem + .summary.json."""
    if path.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    summary_path = os.path.splitext(path)[0] + ".summary.json"
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
    return summary_path


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    check_model(args)
    d = init_distributed()
    given = {k: getattr(args, k) for k in TOKENIZER_FLAGS if hasattr(args, k)}
    tokenizer = load_tokenizer(Args(model_name_or_path=args.model, **given))
    rows, log = read_rows(args, tokenizer, d)
    print0("\n".join(log))
    max_tokens = args.max_tokens_per_batch or MAX_TOKENS[d.device.type]
    model = load_reward_model(args, d.device)

    start = time.perf_counter()
    bar = tqdm(total=len(rows), disable=not d.is_main, desc="score", dynamic_ncols=True)
    rewards = score_rows(model, rows, args.batching, max_tokens, d.device, bar)
    bar.close()
    seconds = time.perf_counter() - start
    print0(f"score: rank 0 scored {len(rows)} rows in {seconds:.1f} s ({len(rows) / seconds:.1f} rows/s)")

    # Every rank's rows back in file order (row numbers increase through the file).
    mine = [(r["row"], r["subset"], rw) for r, rw in zip(rows, rewards)]
    parts = gather_objects(mine, "score/scored", "score its rows")
    scored = sorted((x for part in parts for x in part), key=lambda x: x[0])
    categories = any(subset is not None for _, subset, _ in scored)
    records = []
    for row, subset, (chosen, *rejected) in scored:
        record = {"row": row, "subset": subset} if categories else {"row": row}
        record.update(chosen_reward=chosen, rejected_rewards=rejected, correct=is_correct(chosen, rejected))
        records.append(record)
    summary = summarize(records, args.sections)
    if d.is_main:
        print(report(summary), flush=True)
        if args.out:
            print(f"score: wrote {args.out} and {write_outputs(args.out, records, summary)}", flush=True)
    dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
