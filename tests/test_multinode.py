"""Many nodes, simulated on localhost: two `torchrun --nnodes 2 --nproc_per_node 2` launches meet
through a c10d rendezvous, as two machines would. With 4 processes, 2 per node, minrm shards
within a node and replicates across nodes (HSDP, a 2x2 mesh). Checked against a 1-process run:

- the 2x2 run's metrics (train and eval) and gradient norms equal a 1-process run's on the same
  global batches to 1e-5;
- a checkpoint written by the 2x2 run resumes on 1 process, to the 1-process run's metrics;
- on a shared cache folder the dataset cache is built once for both nodes; on node-local folders
  once per node (the protocol run by 4 threads standing for 2 nodes of 2 processes);
- a builder's failure stops the processes waiting for it with its message, and a cache that
  another builder completed first is kept, not replaced;
- one NaN weight is counted once, not once per replica, and the log names gloo's interface.
"""

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import datasets
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from minrm.config import parse_args
from minrm.data import cache as dataset_cache
from minrm.data.cache import build_datasets, build_or_load_cache, cache_key, load_datasets
from minrm.data.tokenizer import load_tokenizer
from minrm.distributed import Dist, init_distributed, print0
from minrm.model.reward import prepare, shard_model
from minrm.training.evaluate import evaluate
from minrm.training.failsafe import nonfinite_weights
from tests.conftest import ROOT, read_metrics, run_minrm_here, tiny_llama_config, write_pairs

# 48 pairs, 8 per optimizer step (2x2 run: 1 pair x 4 processes x GA 2; 1 process: 4 x GA 2): 6 steps.
PDBS, GA, STEPS, EVERY = 1, 2, 6, 3


def flags(model_dir, pairs_file, eval_file, out, name, cache, pdbs):
    return [
        "--model_name_or_path", model_dir,
        "--dataset_mixer_list", pairs_file, "1.0",
        "--dataset_mixer_eval_list", eval_file, "1.0",
        "--dataset_mixer_eval_list_splits", "train",
        "--dataset_local_cache_dir", str(cache),
        "--learning_rate", "5e-4",
        "--warm_up_steps", "1",
        "--seed", "5",
        "--per_device_train_batch_size", str(pdbs),
        "--gradient_accumulation_steps", str(GA),
        "--per_device_eval_batch_size", "3",
        "--num_evals", "2",
        "--checkpointing_steps", str(EVERY),
        "--keep_last_n_checkpoints", "0",
        "--output_dir", str(out),
        "--run_name", name,
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args: list[str], logs: Path, module: str = "minrm.train", env: dict | None = None) -> str:
    """Run minrm (or another module) as two 2-process "nodes" on localhost (`env`: more variables);
    returns both nodes' stdout, concatenated. (c10d hands out node ranks in order of arrival: rank 0
    may be in either launch.)"""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2"]
        cmd += ["--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"]
        with open(logs / f"node{node}.out", "w") as out, open(logs / f"node{node}.err", "w") as err:
            procs.append(subprocess.Popen(cmd + ["-m", module, *args], cwd=ROOT, env=env, stdout=out, stderr=err))
    for proc in procs:
        proc.wait(timeout=300)
    for node, proc in enumerate(procs):
        assert proc.returncode == 0, f"node {node} failed:\n{(logs / f'node{node}.err').read_text()[-5000:]}"
    return "".join((logs / f"node{node}.out").read_text() for node in range(2))


def grad_norms(stdout: str) -> list[float]:
    return [float(g) for g in re.findall(r"^step \d+/\d+ .* grad_norm=(\S+)$", stdout, re.M)]


def assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) == STEPS + 2  # one line per step, two evals
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert rb[key] == pytest.approx(ra[key], abs=1e-5, rel=0), key


@pytest.fixture(scope="module")
def runs(tiny_model_dir, pairs_file, eval_file, tmp_path_factory) -> dict:
    """The 2x2 run, a 1-process run on the same global batches, and the 2x2 run's checkpoint at
    step 3 resumed on 1 process (a copy of its run folder); the 1-process ones by the trainer's main,
    in this process."""
    out = tmp_path_factory.mktemp("multinode")
    common = (tiny_model_dir, pairs_file, eval_file, out)
    one = run_minrm_here(flags(*common, "one", out / "cache_one", pdbs=4 * PDBS))
    # `auto` with nothing to resume: every rank learns from rank 0 that it starts fresh.
    hsdp_flags = flags(*common, "hsdp", out / "cache", PDBS) + [
        "--resume_from_checkpoint",
        "auto",
        "--timeout_minutes",
        "45",
    ]
    hsdp = two_nodes(hsdp_flags, out)
    shutil.copytree(out / "hsdp", out / "resumed", ignore=shutil.ignore_patterns(f"step_{STEPS}"))
    checkpoint = out / "resumed" / "checkpoints" / f"step_{EVERY}"
    resumed = run_minrm_here(
        flags(*common, "resumed", out / "cache", 4 * PDBS) + ["--resume_from_checkpoint", str(checkpoint)]
    )
    # Context parallel in HSDP (2 groups of 2 processes that split every row's tokens) goes on from the 1-process
    # run's step-3 checkpoint (C = 1 to 2); its last checkpoint resumes on 1 process (C = 2 to 1), no step left.
    shutil.copytree(out / "one", out / "context", ignore=shutil.ignore_patterns(f"step_{STEPS}"))
    checkpoint = out / "context" / "checkpoints" / f"step_{EVERY}"
    context_flags = ["--context_parallel_size", "2", "--resume_from_checkpoint", str(checkpoint)]
    context = two_nodes(flags(*common, "context", out / "cache", 2 * PDBS) + context_flags, out)
    shutil.copytree(out / "context", out / "context_resumed")
    checkpoint = out / "context_resumed" / "checkpoints" / f"step_{STEPS}"
    context_resumed = run_minrm_here(
        flags(*common, "context_resumed", out / "cache", 4 * PDBS) + ["--resume_from_checkpoint", str(checkpoint)]
    )
    return {"out": out, "one": one.stdout, "hsdp": hsdp, "resumed": resumed.stdout, "context": context,
            "context_resumed": context_resumed.stdout}  # fmt: skip


def assert_matches_one_process(runs, name: str, start: int = 0) -> None:
    """The 4-process run `name` (from step `start` on) logged the 1-process run's metrics and evals; its gradient
    norms (printed to 4 digits) catch a wrong scale that AdamW would hide from the metrics."""
    assert_same_metrics(read_metrics(runs["out"] / "one"), read_metrics(runs["out"] / name))
    one, other = grad_norms(runs["one"]), grad_norms(runs[name])
    assert len(one) == STEPS and other == pytest.approx(one[start:], rel=2e-3)


def test_two_nodes_form_a_2x2_hsdp_mesh_and_match_one_process(runs):
    mesh = "distributed: 4 processes, 2 per node, gloo, HSDP mesh (replicate 2 x shard 2), collective timeout 45 min"
    assert f"{mesh}, gloo groups on " in runs["hsdp"] and "gloo groups" not in runs["one"]
    assert "distributed: 1 process, 1 per node, gloo, FSDP mesh (shard 1)" in runs["one"]
    assert "starting fresh" in runs["hsdp"]
    assert_matches_one_process(runs, "hsdp")


def test_a_2x2_checkpoint_resumes_on_one_process(runs):
    assert f"resumed from {runs['out'] / 'resumed' / 'checkpoints' / f'step_{EVERY}'}" in runs["resumed"]
    assert "written by 4 processes" in runs["resumed"]
    assert_same_metrics(read_metrics(runs["out"] / "one"), read_metrics(runs["out"] / "resumed"))


def test_context_parallel_in_hsdp_goes_on_from_a_one_process_checkpoint(runs):
    """--context_parallel_size 2 on 2 nodes x 2 processes, resumed from the 1-process run's step 3 (DCP reshards):
    steps 4 to 6 on the same global batches (2 rows per group x 2 groups x GA 2) with the metrics, the last eval
    and the gradient norms of the 1-process run."""
    assert "HSDP mesh (replicate 2 x shard 2)" in runs["context"]
    assert "context parallel (Ulysses): 2 groups (data) x 2 processes (context)" in runs["context"]
    assert f"resumed from {runs['out'] / 'context' / 'checkpoints' / f'step_{EVERY}'}" in runs["context"]
    assert_matches_one_process(runs, "context", start=EVERY)


def test_a_context_parallel_checkpoint_resumes_on_one_process_bitwise(runs):
    """The last checkpoint of the context-parallel run, written by its 4 processes, resumed on one process with
    no step left (the computation the same: none): the model it exports is bitwise the one that run exported."""
    assert "written by 4 processes" in runs["context_resumed"]
    exported, resumed = (load_file(runs["out"] / run / "model.safetensors") for run in ("context", "context_resumed"))
    assert exported.keys() == resumed.keys() and all(torch.equal(resumed[k], v) for k, v in exported.items())


def test_a_shared_cache_is_built_once_for_all_nodes(runs):
    assert runs["hsdp"].count("data: built the cache") == 1
    # The other node's first process found it on the (shared) filesystem; so did the resume.
    assert runs["hsdp"].count("data: loading the tokenized datasets from the cache") == 1
    assert "data: loading the tokenized datasets from the cache" in runs["resumed"]
    assert [p.name for p in (runs["out"] / "cache").iterdir()] == os.listdir(runs["out"] / "cache_one")


def test_a_nan_weight_is_counted_once_over_the_replicas(tmp_path):
    """One NaN in the model before sharding: under HSDP both replicas hold it, the count says 1, and
    still 1 after an eval (whose no-grad forward leaves the last block gathered on every rank).
    GLOO_SOCKET_IFNAME picks the interface of gloo's groups, and the log says so."""
    out = two_nodes([], tmp_path, module="tests.test_multinode", env={"GLOO_SOCKET_IFNAME": "lo"})
    assert "nonfinite: 1 weights are NaN or infinite after the update" in out
    assert "after an eval: 1 weights are NaN or infinite after the update" in out
    assert "HSDP mesh (replicate 2 x shard 2)" in out and "gloo groups on interface lo (GLOO_SOCKET_IFNAME)" in out


def count_one_nan() -> None:
    """Run by the test above in each of the 4 processes: the tiny Llama sharded as training shards
    it, one NaN among its weights."""
    d = init_distributed()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_llama_config(100, pad_token_id=0))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[5, 3] = float("nan")
    args = parse_args(["--per_device_eval_batch_size", "2"])
    shard_model(prepare(model, args), d, None)
    print0(f"nonfinite: {nonfinite_weights(model)}")
    row = {"prompt": [5, 6], "responses": [[5, 6, 7], [5, 6, 8]], "scores": [1.0, 0.0], "margin": 0.0}
    evaluate(model, datasets.Dataset.from_list([row] * 8), load_tokenizer(args), d, args)
    print0(f"nonfinite after an eval: {nonfinite_weights(model)}")
    dist.destroy_process_group()


def test_node_local_caches_are_built_once_per_node(group_of_one, pairs_file, tmp_path, capsys):
    """The protocol of `load_datasets` with 2 nodes x 2 processes as threads of this process, each
    node with its own cache folder (as a node-local disk would be)."""
    args = parse_args(["--dataset_mixer_list", pairs_file, "1.0"])
    tokenizer = load_tokenizer(args)
    loaded = {}

    def process(rank: int) -> None:
        mine = dataclasses.replace(args, dataset_local_cache_dir=str(tmp_path / f"node{rank // 2}"))
        train, _ = load_datasets(mine, tokenizer, Dist(rank, 4, rank % 2, torch.device("cpu"), mesh=None))
        loaded[rank] = train["responses"]

    processes = [threading.Thread(target=process, args=(rank,), daemon=True) for rank in range(4)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=60)
    assert not any(p.is_alive() for p in processes), "a process still waits"
    assert capsys.readouterr().out.count("data: built the cache") == 2
    expected = build_datasets(args, tokenizer)[0]["train"]["responses"]
    assert loaded == {rank: expected for rank in range(4)}
    assert [os.listdir(tmp_path / node) for node in ("node0", "node1")] == [[cache_key(args, tokenizer)]] * 2


def test_a_failed_build_stops_the_waiting_processes_with_its_message(group_of_one, tmp_path):
    bad = write_pairs(tmp_path / "bad.jsonl", 4)
    with open(bad, "a") as f:
        f.write("{not json\n")
    args = parse_args(["--dataset_mixer_list", bad, "1.0", "--dataset_local_cache_dir", str(tmp_path / "cache")])
    tokenizer = load_tokenizer(args)
    stopped = []

    def rank_1():  # waits for rank 0, as a process on rank 0's node does
        try:
            dataset_cache._wait_for_key(0, say=False)
        except SystemExit as e:
            stopped.append(str(e))

    waiter = threading.Thread(target=rank_1, daemon=True)
    waiter.start()
    with pytest.raises(SystemExit, match="1 bad rows"):  # rank 0 builds, and fails
        dataset_cache._find_or_build_and_post(args, tokenizer, None, rank=0)
    waiter.join(timeout=30)
    assert not waiter.is_alive(), "the waiting process still waits after the builder failed"
    assert stopped[0].startswith("minrm: error: rank 0 could not find or build the dataset cache: 1 bad rows")
    assert "line 5: invalid JSON" in stopped[0]
    assert not (tmp_path / "cache").exists()


def test_a_complete_cache_is_never_replaced(pairs_file, tmp_path, monkeypatch, capsys):
    """Two builders that both missed the cache (another node's, seen late on a network filesystem):
    the second to finish keeps the first's folder and drops its own."""
    args = parse_args(["--dataset_mixer_list", pairs_file, "1.0", "--dataset_local_cache_dir", str(tmp_path)])
    tokenizer = load_tokenizer(args)
    build = dataset_cache.build_datasets
    first = []

    def build_while_another_finishes(*a):
        built = build(*a)
        if not first:  # during our build, the other builder completes the cache
            first.append("building")
            first[0] = build_or_load_cache(args, tokenizer)
            (Path(first[0]) / "theirs").touch()
        return built

    monkeypatch.setattr(dataset_cache, "build_datasets", build_while_another_finishes)
    assert build_or_load_cache(args, tokenizer) == first[0]
    assert (Path(first[0]) / "theirs").exists()  # their folder, untouched
    assert os.listdir(tmp_path) == [os.path.basename(first[0])]  # our temporary folder is gone
    assert "another process built the cache" in capsys.readouterr().out


if __name__ == "__main__":  # the processes of test_a_nan_weight_is_counted_once_over_the_replicas
    count_one_nan()
