"""The cache of the tokenized, checked, mixed datasets, and the build-once-per-node protocol.

Building (`data.build_side`) reads, checks and tokenizes every row; the result is saved with
`save_to_disk` in a folder named by a hash of every input that shapes it, so a second run with the
same inputs loads it in a fraction of a second.
"""

import hashlib
import json
import os
import shutil
import time

import datasets
from transformers import PreTrainedTokenizerBase

from minrm import toy
from minrm.data import build_side, read_raw
from minrm.distributed import Dist, barrier, broadcast_object, print0

# Bump when a change to the code above changes what a cached dataset holds.
TRANSFORM_VERSION = 1


def _source_hash(name: str, split: str) -> str:
    """What identifies a dataset's content: a local file's bytes, the toy generator's code, or
    the fingerprint `datasets` gives a Hub dataset (it covers the resolved revision)."""
    h = hashlib.sha256()
    if name == toy.TOY:
        h.update(open(toy.__file__, "rb").read())
    elif os.path.isfile(name):
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        h.update(read_raw(name, split)[0]._fingerprint.encode())
    return h.hexdigest()


def cache_key(args, tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that shapes the datasets: sources, mixers, splits, tokenizer (vocabulary,
    merges, special tokens, chat template), length limits, column keys, checks and seed."""
    sources = {}
    for flag in ("dataset_mixer_list", "dataset_mixer_eval_list"):
        mixer, splits = getattr(args, flag), getattr(args, flag + "_splits")
        splits = splits * (len(mixer) // 2) if len(splits) == 1 else splits
        for name, split in zip(mixer[::2], splits):
            sources[f"{name} [{split}]"] = _source_hash(name, split)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    fields = (
        "dataset_mixer_list dataset_mixer_list_splits dataset_mixer_eval_list dataset_mixer_eval_list_splits "
        "max_token_length max_prompt_token_length chosen_key rejected_key prompt_key skip_bad_rows eval_fraction seed"
    ).split()
    ingredients = {
        "version": TRANSFORM_VERSION,
        "sources": sources,
        "args": {f: getattr(args, f) for f in fields},
        "tokenizer": [
            hashlib.sha256(vocab.encode()).hexdigest(),
            tokenizer.chat_template,
            str(tokenizer.special_tokens_map),
            len(tokenizer),
        ],
    }
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_datasets(args, tokenizer: PreTrainedTokenizerBase) -> tuple[datasets.DatasetDict, list[str]]:
    """Train (and eval) pairs in memory, and the log lines that count what was dropped."""
    train, held, log = build_side(
        args.dataset_mixer_list, args.dataset_mixer_list_splits, tokenizer, args, "train", args.eval_fraction
    )
    out = {"train": train}
    if held is not None:
        out["eval"] = held
    elif args.dataset_mixer_eval_list:
        out["eval"], _, eval_log = build_side(
            args.dataset_mixer_eval_list, args.dataset_mixer_eval_list_splits, tokenizer, args, "eval"
        )
        log += eval_log
    return datasets.DatasetDict(out), log


def build_or_load_cache(args, tokenizer: PreTrainedTokenizerBase) -> str:
    """The cache folder for these inputs, built first if it does not exist. Returns its path."""
    path = os.path.join(args.dataset_local_cache_dir, cache_key(args, tokenizer))
    if os.path.isdir(path):
        print(f"data: loading the tokenized datasets from the cache {path}", flush=True)
        return path
    start = time.perf_counter()
    dd, log = build_datasets(args, tokenizer)
    tmp = f"{path}.tmp{os.getpid()}"  # written aside, then renamed: a crash never leaves half a cache
    dd.save_to_disk(tmp)
    with open(os.path.join(tmp, "minrm_log.json"), "w") as f:
        json.dump(log, f)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    # Not print0: every process that builds says so, which is how a test counts the builds.
    print(f"data: built the cache {path} in {time.perf_counter() - start:.1f}s", flush=True)
    return path


def load_datasets(
    args, tokenizer: PreTrainedTokenizerBase, d: Dist
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Train and eval pairs. With the cache, one process per node (local rank 0) builds or finds
    it while the others wait at a barrier, then every process loads it from disk."""
    if args.dataset_skip_cache:
        dd, log = build_datasets(args, tokenizer)  # every process tokenizes for itself
    else:
        path = build_or_load_cache(args, tokenizer) if d.local_rank == 0 else None
        barrier()  # all ranks participate: the others wait here until their node's cache exists
        path = broadcast_object(path)  # the key is the same on every node
        dd = datasets.load_from_disk(path)
        with open(os.path.join(path, "minrm_log.json")) as f:
            log = json.load(f)
    for line in log:
        print0(line)
    return dd["train"], dd.get("eval")
