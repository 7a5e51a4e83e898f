"""The cache of the tokenized, checked, mixed datasets (`mixer.build_side`), saved as an Arrow file per split in a
folder named by a hash of every input that shapes it, and how the processes of a run, on one node or many,
build it once and share it (docs/data.md, "Cache")."""

import hashlib
import json
import os
import pickle
import resource
import secrets
import shutil
import socket
import time
from pathlib import Path

import datasets
from datasets.arrow_writer import ArrowWriter
from transformers import PreTrainedTokenizerBase

from minrm.data import toy
from minrm.data.mixer import build_side, column_keys, mixer_entries, read_raw
from minrm.distributed import Dist, post, print0, wait_for_post

# Bump when a change to the code above changes what a cached dataset holds.
TRANSFORM_VERSION = 4


def _source_hash(name: str, split: str) -> str:
    """A hash of a dataset's content: a local file's bytes, the toy generator's code, or a Hub dataset's fingerprint."""
    path = toy.__file__ if name == toy.TOY else name
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    return hashlib.sha256(read_raw(name, split)[0]._fingerprint.encode()).hexdigest()


def cache_key(args, tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that shapes the datasets: sources, mixers, splits, tokenizer (vocabulary, merges,
    special tokens, chat template), length limits, responses kept a row, column keys, checks and seed."""
    entries = mixer_entries(args.dataset_mixer_list, args.dataset_mixer_list_splits)
    entries += mixer_entries(args.dataset_mixer_eval_list, args.dataset_mixer_eval_list_splits)
    sources = {f"{name} [{split}]": _source_hash(name, split) for name, _, split in entries}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    fields = ("dataset_mixer_list dataset_mixer_list_splits dataset_mixer_eval_list dataset_mixer_eval_list_splits "
              "max_token_length max_prompt_token_length max_responses_per_prompt skip_bad_rows eval_fraction seed")
    tokens = [vocab, tokenizer.chat_template, str(tokenizer.special_tokens_map), len(tokenizer)]  # hashed below
    ingredients = dict(version=TRANSFORM_VERSION, sources=sources, columns=column_keys(args), tokenizer=tokens)
    ingredients["args"] = {f: getattr(args, f) for f in fields.split()}
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_datasets(args, tokenizer: PreTrainedTokenizerBase) -> tuple[datasets.DatasetDict, list[str]]:
    """Train (and eval) rows, and the log lines that count what was dropped."""
    train, held, log = build_side(args.dataset_mixer_list, args.dataset_mixer_list_splits, tokenizer, args, "train",
                                  args.eval_fraction)  # fmt: skip
    if held is None and args.dataset_mixer_eval_list:
        held, _, eval_log = build_side(args.dataset_mixer_eval_list, args.dataset_mixer_eval_list_splits, tokenizer,
                                       args, "eval")  # fmt: skip
        log += eval_log
    return datasets.DatasetDict({"train": train} | ({} if held is None else {"eval": held})), log


def _complete(path: str) -> bool:
    """A cache folder only ever appears whole (built aside, then renamed); minrm_log.json is its last file."""
    return os.path.isfile(os.path.join(path, "minrm_log.json"))


def build_or_load_cache(args, tokenizer: PreTrainedTokenizerBase, key: str | None = None) -> str:
    """The cache folder of these inputs (`key`: their hash, computed if not given), built first if it is not there."""
    path = os.path.join(args.dataset_local_cache_dir, key or cache_key(args, tokenizer))
    if _complete(path):
        print(f"data: loading the tokenized datasets from the cache {path}", flush=True)
        return path
    start = time.perf_counter()
    dd, log = build_datasets(args, tokenizer)
    # Written aside under a name no other builder (process, node) can pick, then renamed: a crash
    # never leaves half a cache, and two builders never write into the same folder.
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    os.makedirs(tmp)
    for split, rows in dd.items():
        _save_rows(rows, os.path.join(tmp, f"{split}.arrow"))
    Path(tmp, "minrm_log.json").write_text(json.dumps(log))
    try:
        os.rename(tmp, path)  # atomic; fails when the folder exists and is not empty
    except OSError:
        if not _complete(path):
            raise
        # Another builder finished first (a shared folder seen late): keep its cache, never replace it.
        shutil.rmtree(tmp)
        print(f"data: another process built the cache {path} first; using it", flush=True)
        return path
    # Not print0: every process that builds says so (on node-local disks, one a node).
    print(f"data: built the cache {path} in {time.perf_counter() - start:.1f}s, {_peak_memory()}", flush=True)
    return path


def _save_rows(rows: datasets.Dataset, path: str, chunk: int = 1000) -> None:
    """The rows as one Arrow file, `chunk` rows (or 1%) at a time, each read through maps of its own (unpickling
    reopens a dataset's files): the pages a process reads through a map stay in its RSS until the map is closed."""
    chunk = max(chunk, -(-len(rows) // 100))  # at most 100 chunks: each opening reads every record batch's header
    with ArrowWriter(features=rows.features, path=path) as writer:
        for start in range(0, len(rows), chunk):
            # The chunk's rows are selected first: pickling all the rows would copy their index every time.
            part = pickle.loads(pickle.dumps(rows.select(range(start, min(start + chunk, len(rows))))))
            writer.write_table(part.with_format("arrow")[:])  # `part` and its maps go with the next chunk


def _peak_memory() -> str:
    """The peak RSS (ru_maxrss: read pages of memory-mapped files included) of this process and its largest child."""
    gb = [resource.getrusage(who).ru_maxrss * 1024 / 1e9 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return f"peak memory {gb[0]:.2f} GB" + (f" (a tokenizing worker: {gb[1]:.2f} GB)" if gb[1] else "")


def _find_or_build_and_post(args, tokenizer: PreTrainedTokenizerBase, key: str | None, rank: int) -> str:
    """`build_or_load_cache`, then post the key for the processes that wait on this one; on failure
    post the error instead (and raise it here), so that they stop with its message."""
    try:
        key = os.path.basename(build_or_load_cache(args, tokenizer, key))
    except BaseException as e:  # SystemExit (bad rows...) included
        post(f"dataset_cache/{rank}", {"error": str(e).removeprefix("minrm: error: ") or type(e).__name__})
        raise
    post(f"dataset_cache/{rank}", {"key": key})
    return key


def _wait_for_key(rank: int, say: bool) -> str:
    posted = wait_for_post(f"dataset_cache/{rank}", f"rank {rank} to find or build the dataset cache" if say else None)
    if "error" in posted:
        raise SystemExit(f"minrm: error: rank {rank} could not find or build the dataset cache: {posted['error']}")
    return posted["key"]


def load_datasets(args, tokenizer: PreTrainedTokenizerBase, d: Dist) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Train and eval rows through the cache: global rank 0 finds or builds it and posts its key; then each
    other node's first process looks for that key's folder in its own --dataset_local_cache_dir (there on a
    shared filesystem; on a node-local disk it builds this node's copy) and posts it; the other processes
    wait for their node's first. Waiting polls the store instead of a barrier, so a build longer than
    --timeout_minutes is no error; a builder's failure stops the waiting ranks with its message."""
    if args.dataset_skip_cache:
        dd, log = build_datasets(args, tokenizer)  # every process tokenizes for itself
    else:
        key = None
        if d.rank != 0:  # a node's first process waits for rank 0, the others for their node's first
            source = 0 if d.local_rank == 0 else d.rank - d.local_rank  # torchrun numbers a node's ranks in a row
            key = _wait_for_key(source, say=d.local_rank == 0 or d.rank == 1)
        if d.local_rank == 0:
            key = _find_or_build_and_post(args, tokenizer, key, d.rank)
        path = os.path.join(args.dataset_local_cache_dir, key)
        files = {split: os.path.join(path, f"{split}.arrow") for split in ("train", "eval")}
        dd = {split: datasets.Dataset.from_file(f) for split, f in files.items() if os.path.isfile(f)}  # memory-mapped
        log = json.loads(Path(path, "minrm_log.json").read_text())
    print0("\n".join(log))
    return dd["train"], dd.get("eval")
