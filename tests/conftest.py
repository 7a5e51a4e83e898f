"""Shared tiny fixtures: an offline tokenizer, tiny models saved as HF folders, small preference
files, and helpers that run minrm as users do (`python -m` or `torchrun`), or a one-process command's
own `main` in this process, where only its output is checked.

Tests marked `gpu` run only where CUDA is (skipped elsewhere); every other test runs with CUDA
hidden, in this process and in the processes it starts, so the CPU suite passes unchanged on a GPU
machine."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForSequenceClassification, LlamaConfig

from minrm.data import toy
from minrm.data.mixer import build_side
from minrm.training.tracking import ELAPSED

ROOT = Path(__file__).resolve().parents[1]
# pytest imports this file as `conftest` and the tests as `tests.conftest`: make them one module, so the
# state below (the real CUDA, read once before the session hides it; GPU_TEST) is the one state.
sys.modules.setdefault("tests.conftest", sys.modules[__name__])
# One thread, here and in every process a test starts: the tiny models' ops are too small to share,
# and OpenMP's spinning threads only slow them on a small, busy machine.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
CUDA = torch.cuda.is_available()  # read before the session hides it
REAL_CUDA_VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")
REAL_IS_AVAILABLE = torch.cuda.is_available
GPU_TEST = False  # True while a `gpu`-marked test runs: CUDA is visible to it


def cuda_hidden() -> bool:
    return False


def pytest_configure(config):
    """Hide CUDA for the whole session, module- and session-scoped fixtures included (they start
    before any function-scoped fixture): `torchrun --nproc_per_node 2` on a one-GPU machine would ask
    for cuda:1, and minrm's code in this process would pick CUDA. `gpu`-marked tests get it back."""
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one); other tests run with CUDA hidden")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # read by the CUDA runtime of every process started
    torch.cuda.is_available = cuda_hidden  # this process may have CUDA running already (CUDA above)


def pytest_unconfigure(config):
    if REAL_CUDA_VISIBLE_DEVICES is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = REAL_CUDA_VISIBLE_DEVICES
    torch.cuda.is_available = REAL_IS_AVAILABLE


@pytest.fixture(autouse=True)
def cuda_for_gpu_tests(request, monkeypatch):
    """A `gpu`-marked test sees the GPU again, here and in the processes it starts (its module-scoped
    fixtures ran with CUDA hidden); without CUDA it is skipped."""
    global GPU_TEST
    if not request.node.get_closest_marker("gpu"):
        yield
        return
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    if REAL_CUDA_VISIBLE_DEVICES is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", REAL_CUDA_VISIBLE_DEVICES)
    monkeypatch.setattr(torch.cuda, "is_available", REAL_IS_AVAILABLE)
    GPU_TEST = True
    yield
    GPU_TEST = False


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    config = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_labels=1,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**config, **overrides})


@pytest.fixture(scope="session")
def tokenizer():
    """The toy tokenizer with a <pad> token already added."""
    tok = toy.toy_tokenizer()
    tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def save_tiny_llama(path: Path, tokenizer, **overrides) -> str:
    """A tiny Llama reward model saved as a Hugging Face folder, with its tokenizer."""
    torch.manual_seed(0)
    config = tiny_llama_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id, **overrides)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tokenizer)


def write_pairs(path: Path, n: int, split: str = "train") -> str:
    rows = toy.toy_dataset(split).select(range(n))
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> str:
    """48 training pairs in the Tulu conversational format."""
    return write_pairs(tmp_path_factory.mktemp("data") / "train.jsonl", 48)


@pytest.fixture(scope="session")
def eval_file(tmp_path_factory) -> str:
    """21 held-out pairs: not a multiple of any batch size used in the tests."""
    return write_pairs(tmp_path_factory.mktemp("data") / "eval.jsonl", 21, "test")


def minrm_command(args: list[str], nproc: int = 1, module: str = "minrm.train", torchrun: bool = False) -> list[str]:
    """The command line a user types: `python -m minrm.train` or `torchrun ... -m minrm.train` (also
    for one process with `torchrun`, as on a GPU node)."""
    if nproc == 1 and not torchrun:
        return [sys.executable, "-m", module, *args]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return cmd + ["-m", module, *args]


def run_minrm(
    args: list[str],
    nproc: int = 1,
    timeout: int = 300,
    env: dict | None = None,
    module: str = "minrm.train",
    torchrun: bool = False,
) -> subprocess.CompletedProcess:
    """Run the trainer (or another minrm command) in a subprocess from the repo root, as a user would
    (`env`: more variables), with CUDA hidden unless a `gpu`-marked test runs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    visible = env.get("CUDA_VISIBLE_DEVICES")
    assert GPU_TEST or visible == "", f"a CPU test would start minrm with CUDA_VISIBLE_DEVICES={visible!r}, not ''"
    cmd = minrm_command(args, nproc, module, torchrun)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"minrm failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def run_minrm_here(args: list[str], module: str = "minrm.train") -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` (minrm.train or minrm.score) run by the command's own `main` in this
    process, from the repo root, its output captured: run_minrm's result without a process of its
    own, whose start (torch, transformers and datasets imported again) costs a tiny run most of its
    time. `main` makes its own group of one (setting the rank variables, as in a process of its own)
    and its own signal handlers: the variables, the handlers, the folder and the group are put back
    after it, whatever happens. What only a process shows (its exit status and stderr, signals,
    torchrun) is run_minrm's."""
    from minrm import score, train

    command = {"minrm.train": lambda: train.main(train.parse_args(args)), "minrm.score": lambda: score.main(args)}
    environ, folder = dict(os.environ), os.getcwd()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    out, err = io.StringIO(), io.StringIO()
    os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            command[module]()
    except BaseException as e:  # SystemExit included: the command's error line, as a process would print it
        log = f"{out.getvalue()[-3000:]}\n{err.getvalue()[-5000:]}"
        raise AssertionError(f"minrm failed ({type(e).__name__}: {e}):\n{log}") from e
    finally:
        os.chdir(folder)
        os.environ.clear()
        os.environ.update(environ)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if dist.is_initialized():  # the command failed before destroying it
            dist.destroy_process_group()
    return subprocess.CompletedProcess(minrm_command(args, module=module), 0, out.getvalue(), err.getvalue())


def read_metrics(run_dir: Path, keep_time: bool = False) -> list[dict]:
    """metrics.jsonl's rows, without the wall-clock column unless asked: no two runs share it."""
    with open(Path(run_dir) / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    if not keep_time:
        for row in rows:
            del row[ELAPSED]
    return rows


def build_dataset(mixer, splits, tokenizer, args, what: str):
    """One side of the data built in memory without the cache, its log printed (as train.py logs it)."""
    pairs, _, log = build_side(mixer, splits, tokenizer, args, what)
    print("\n".join(log))
    return pairs


@pytest.fixture
def group_of_one():
    """A process group of this process alone, in memory (no port, no rank variables)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
