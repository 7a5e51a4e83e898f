"""Stopping safely (minrm/training/failsafe.py):

- a row whose margin overflows float32 makes its step's loss infinite: the run stops at that step,
  with exit status 1, the step and the last checkpoint in the message, and no exported model; the
  checkpoint's weights are those of a clean run of the same flags that stops before that step;
- the weight check counts NaN and infinite values in FSDP2-sharded parameters;
- a signal sets the stop request, the same signal delivered twice at once is one request, and a
  later second signal ends the process at once;
- the resume command is the run's own, with `--run_name NAME --resume_from_checkpoint auto`.
(The SIGTERM-and-resume runs are in test_checkpoint.py, next to the uninterrupted runs they match.)
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.fsdp import fully_shard

from minrm.data.batching import stream_indices
from minrm.training import failsafe
from tests.conftest import ROOT, minrm_command, read_metrics, run_minrm_here


def flags(model_dir: str, data: str, out, name: str, steps: int) -> list[str]:
    # A constant learning rate: a run of 2 steps is the same run as a longer one, stopped earlier.
    return [
        "--model_name_or_path", model_dir,
        "--dataset_mixer_list", data, "1.0",
        "--lr_scheduler_type", "constant",
        "--seed", "3",
        "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1",
        "--total_episodes", str(2 * steps),
        "--checkpointing_steps", "2",
        "--output_dir", str(out),
        "--run_name", name,
    ]  # fmt: skip


def train_rows(run_dir) -> list[dict]:
    return [{k: v for k, v in row.items() if k.startswith("train/") or k == "episode"} for row in read_metrics(run_dir)]


def test_nonfinite_loss_stops_the_run(tiny_model_dir, pairs_file, tmp_path):
    """A margin of 1e39 (a float64, inf once the collator makes it float32) on the row the stream
    puts in step 3 makes that step's loss -logsigmoid(d - inf) = inf on any CPU: the first
    non-finite step is 3 by construction, not by where rounding makes a trajectory blow up."""
    rows = [json.loads(line) for line in open(pairs_file)]
    bad = stream_indices(2 * 2, 1, len(rows), 3)[0]  # step 3 trains stream positions 4 and 5
    rows[bad]["margin"] = 1e39
    data = tmp_path / "margins.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = minrm_command(flags(tiny_model_dir, str(data), tmp_path, "stopped", steps=12))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    run_dir = tmp_path / "stopped"
    error = re.search(r"minrm: error: step (\d+): (.*) \(learning rate .*\)\. .*", result.stderr).group(0)
    assert "step 3: loss = inf; its update was not applied" in error
    assert f"the last checkpoint is {run_dir}/checkpoints/step_2." in error
    assert not (run_dir / "model.safetensors").exists()
    assert len(train_rows(run_dir)) == 2  # the stopped step is not logged

    # The clean run: the same flags and data, 2 steps (the bad row is not reached). Its metrics and
    # final weights equal the stopped run's and its checkpoint's, bitwise.
    run_minrm_here(flags(tiny_model_dir, str(data), tmp_path, "clean", steps=2))  # in this process
    assert train_rows(tmp_path / "clean") == train_rows(run_dir)
    clean = load_file(tmp_path / "clean" / "model.safetensors")
    dcp_to_torch_save(run_dir / "checkpoints" / "step_2", tmp_path / "step_2.pt")
    saved = torch.load(tmp_path / "step_2.pt", weights_only=False)["model"]
    assert saved.keys() == clean.keys()
    for key, value in saved.items():
        assert torch.isfinite(value).all() and torch.equal(value, clean[key]), key


def test_nonfinite_weights_are_counted_over_shards():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
        fully_shard(model)  # DTensor parameters, as in training
        assert failsafe.nonfinite_weights(model) == ""
        with torch.no_grad():
            model[0].weight.to_local()[1, 2] = float("nan")
            model[1].bias.to_local()[0] = float("-inf")
        assert failsafe.nonfinite_weights(model) == "2 weights are NaN or infinite after the update"
    finally:
        dist.destroy_process_group()


def test_stop_signal_sets_a_request_once():
    before = signal.getsignal(signal.SIGINT)
    stop = failsafe.StopSignal()
    try:
        assert stop.requested == 0.0
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the same request delivered twice: not a second one
        assert stop.requested == 1.0 and stop.name == "SIGINT" and stop.exit_status == 130
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_later_second_signal_exits_at_once():
    code = (
        "import os, signal, time\n"
        "from minrm.training.failsafe import SAME_REQUEST_S, StopSignal\n"
        "stop = StopSignal()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(SAME_REQUEST_S + 0.2)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.5)\n"
        "print('still running')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGTERM and "still running" not in result.stdout
    assert "got SIGTERM" in result.stderr


def test_resume_command(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    argv = [
        "minrm/train.py",
        "--seed",
        "3",
        "--run_name",
        "x",
        "--resume_from_checkpoint=/c/step_4",
        "--output_dir",
        "o",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    expected = [sys.executable, "-m", "minrm.train", "--seed", "3", "--output_dir", "o"]
    expected += ["--run_name", "x", "--resume_from_checkpoint", "auto"]
    assert shlex.split(failsafe.resume_command("x")) == expected
