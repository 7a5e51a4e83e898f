"""Loading and sharding across processes, run through `torchrun` with tests/train_probe.py:

- the weights as loaded (rank 0 reads, every rank gets its shards) are bitwise those of the plain
  single-process transformers loading (resize with an added <pad>, seeded score head), and the
  rewards right after loading are Hugging Face's own forward (so the non-persistent buffers, such
  as rotary `inv_freq`, are right): 2 processes with a saved model, 1 (in this process) with the toy;
- memory on CPU, with a 25M-parameter model (96 MiB in fp32) whose size dominates: rank 1 never
  holds the full model while loading, rank 0 drops the copy it read, and the gradients accumulated
  over a step's micro-batches stay sharded;
- the CPU tests run with CUDA hidden, here and in the processes they start (torchrun would pick it);
  GPU-marked tests see it.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoModelForSequenceClassification

from minrm.config import parse_args
from minrm.data import toy
from minrm.data.tokenizer import load_tokenizer
from minrm.distributed import Dist
from minrm.model.reward import fill_from_rank0, read_model, shard_model, skeleton, toy_model_config
from tests.conftest import ROOT, tiny_llama_config, write_pairs
from tests.train_probe import save_loaded
from tests.waits_probe import waits_worker

SEED = 3


def run_probe(out, flags: list[str], nproc: int) -> dict:
    """tests/train_probe.py under torchrun; returns each rank's record."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    # Freed blocks above 1 MB go back to the OS at once, so that VmHWM is the peak of live memory.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "1048576"}
    common = ["--batching", "padded", "--seed", str(SEED), "--output_dir", str(out), "--run_name", "run"]
    common += ["--dataset_local_cache_dir", str(out / "cache")]
    result = subprocess.run(
        cmd + ["-m", "tests.train_probe", str(out), *common, *flags], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, f"probe failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)}


def todays_loading(model_or_config, vocab: int, pad_id: int) -> torch.nn.Module:
    """The single-process loading, with plain transformers calls: fp32, resize to `vocab` rows
    (+ <pad>, to a multiple of 8: new rows drawn from the old rows' statistics), seeded score head."""
    torch.manual_seed(SEED)
    if isinstance(model_or_config, str):
        model = AutoModelForSequenceClassification.from_pretrained(model_or_config, num_labels=1, dtype=torch.float32)
    else:
        model = AutoModelForSequenceClassification.from_config(model_or_config)
    model.resize_token_embeddings(vocab, pad_to_multiple_of=8)
    model.config.pad_token_id = pad_id
    std = 1 / (model.config.hidden_size + 1) ** 0.5
    with torch.no_grad():
        model.score.weight.normal_(0.0, std, generator=torch.Generator().manual_seed(SEED))
    return model.eval()


@pytest.fixture(scope="module")
def big_model_dir(tmp_path_factory) -> tuple[str, int]:
    """A 25M-parameter Llama (96 MiB in fp32; 16 blocks of 6 MiB) with the toy tokenizer, which has
    no pad token yet; and its size in KiB."""
    path = tmp_path_factory.mktemp("big_llama")
    tok = toy.toy_tokenizer()
    config = tiny_llama_config(
        len(tok), hidden_size=384, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=6
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), sum(p.numel() * p.element_size() for p in model.parameters()) / 1024


@pytest.fixture(scope="module")
def two_processes(big_model_dir, tmp_path_factory):
    """2 processes, a saved model: one step of 3 micro-batches (1 pair each per process)."""
    out = tmp_path_factory.mktemp("two")
    pairs = write_pairs(out / "train.jsonl", 6)
    flags = ["--model_name_or_path", big_model_dir[0], "--dataset_mixer_list", pairs, "1.0"]
    flags += ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "3", "--total_episodes", "6"]
    return out, run_probe(out, flags, nproc=2)


@pytest.fixture(scope="module")
def one_process_toy(tmp_path_factory):
    """1 process, the toy model (built from a config: no file to read), loaded as train.py loads it,
    in this process (a group of one); the same files as the probe's."""
    out = tmp_path_factory.mktemp("toy")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    d = Dist(0, 1, 0, torch.device("cpu"), init_device_mesh("cpu", (1,), mesh_dim_names=("shard",)))
    args = parse_args(["--seed", str(SEED), "--batching", "padded"])
    tokenizer = load_tokenizer(args)
    model = skeleton(args, tokenizer)
    shard_model(model, d, None)
    fill_from_rank0(model, read_model(args, tokenizer), d)
    save_loaded(model, d, str(out))
    dist.destroy_process_group()
    return out


@pytest.fixture(params=["two_processes", "one_process_toy"])
def loaded_and_expected(request, big_model_dir):
    """(run folder, the model as today's single-process loading gives it)."""
    tok = toy.toy_tokenizer()
    vocab, pad_id = len(tok) + 1, len(tok)  # load_tokenizer adds <pad> as the next id
    if request.param == "two_processes":
        out = request.getfixturevalue("two_processes")[0]
        return out, todays_loading(big_model_dir[0], vocab, pad_id)
    out = request.getfixturevalue("one_process_toy")
    return out, todays_loading(toy_model_config(len(tok)), vocab, pad_id)


def test_loaded_weights_are_bitwise_todays(loaded_and_expected):
    out, expected = loaded_and_expected
    loaded = torch.load(out / "loaded.pt")
    assert loaded.keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_rewards_after_loading_match_hf(loaded_and_expected):
    out, expected = loaded_and_expected
    probe = torch.load(out / "rewards.pt")
    with torch.no_grad():
        theirs = expected(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits.squeeze(-1)
    assert probe["rewards"].dtype == torch.float32
    torch.testing.assert_close(probe["rewards"], theirs, rtol=0, atol=1e-5)


def test_rank1_never_holds_the_full_model(two_processes, big_model_dir):
    # Each rank loading the full fp32 model and sharding it (the old way) peaks at 1.46x the model on
    # rank 1 (measured); now rank 1 holds its half of the shards plus one tensor of the broadcast.
    model_kb, records = big_model_dir[1], two_processes[1]
    assert records[1]["load"] < 0.75 * model_kb, (records[1]["load"], model_kb)
    assert records[0]["load"] > model_kb  # rank 0 reads the whole model: the probe sees it


def test_accumulated_gradients_stay_sharded(two_processes, big_model_dir):
    # At the first forward each rank holds its half of the parameters and the last of the 16 blocks
    # whole (kept gathered after a forward: the probe's), and no longer rank 0's read copy. After
    # each micro-batch the gradients are reduce-scattered: half the model's size more (fp32).
    # Without it FSDP2 keeps each rank's whole unsharded fp32 gradient until the last one.
    model_kb = big_model_dir[1]
    for rank, record in two_processes[1].items():
        (first, *later) = record["steps"][0]  # live tensor KiB at each micro-batch's forward
        assert len(later) == 2 and first < (0.55 + 1 / 16) * model_kb, (rank, record, model_kb)
        for held in later:
            assert held - first < 0.55 * model_kb, (rank, record, model_kb)


@pytest.mark.parametrize("which", ["saved", "toy"])
def test_skeleton_config_is_the_loaded_models(which, big_model_dir):
    # The skeleton's config is the one exported (config.json) and hashed into checkpoints; its
    # state dict is what the read model fills, name for name and shape for shape.
    args = parse_args(["--model_name_or_path", big_model_dir[0] if which == "saved" else toy.TOY])
    tokenizer = load_tokenizer(args)
    model = skeleton(args, tokenizer)
    assert all(p.is_meta for p in model.parameters())
    full = read_model(args, tokenizer)
    assert model.config.to_dict() == full.config.to_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in full.state_dict().items()}


def test_waits_outside_collectives_outlast_the_collective_timeout():
    """Rank 0 reads the model for longer than the group's timeout while rank 1 waits outside any
    collective: no timeout, and rank 0's error reaches rank 1 as its message. minrm.score's ranks
    finish their shares at different times: the gather waits for the last one outside any
    collective, and gives every rank all parts in rank order."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(waits_worker, args=(port, results), nprocs=2)
    assert (results[0, False], results[1, False]) == ("weights", None)
    assert results[0, True] == "OSError: the Hub said no"
    assert results[1, True] == "SystemExit: minrm: error: rank 0 failed to read the model: OSError: the Hub said no"
    expected = [{"rank": 0, "rows": [0]}, {"rank": 1, "rows": [1, 1]}]
    assert results[0] == results[1] == expected


# ----------------------------------------------------------------------------------------------
# CUDA hidden from the CPU tests (tests/conftest.py)

SEES_CUDA = "import os, torch; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')), torch.cuda.is_available())"


def test_cpu_tests_run_with_cuda_hidden():
    """As on a machine without a GPU, even on one that has some: on a one-GPU machine
    `torchrun --nproc_per_node 2` would ask for cuda:1."""
    assert not torch.cuda.is_available()
    seen = subprocess.run([sys.executable, "-c", SEES_CUDA], capture_output=True, text=True, check=True).stdout
    assert seen.split() == ["''", "False"]


@pytest.mark.gpu
def test_gpu_tests_see_the_gpu():
    seen = subprocess.run([sys.executable, "-c", SEES_CUDA], capture_output=True, text=True, check=True).stdout
    assert seen.split()[1] == "True" and torch.cuda.is_available()
