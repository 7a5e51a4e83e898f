"""Checkpoints, exact resume, export and Hub push, run as users run them:

- a training process is SIGKILLed after it has written a checkpoint, resumed with `auto`, and its
  metrics.jsonl and final weights compared with an uninterrupted run (bitwise on 1 process); its
  wall-clock column continues from the checkpoint's elapsed seconds;
- a run stopped by SIGTERM (to `python -m minrm.train`, and to torchrun, which forwards it) writes a
  checkpoint without --checkpointing_steps, prints the resume command, and that command finishes it
  bitwise like an uninterrupted run (1 and 2 processes); the 2-process checkpoint also resumes on 1;
- background saves write the state of the moment `save` was called, while the model and the
  optimizer change under them, and the second copies into the host buffers of the first;
- `auto` starts fresh without a checkpoint and skips one left half-written; a checkpoint from another model is refused;
- `python -m minrm.export CHECKPOINT OUT` reloads with AutoModelForSequenceClassification and
  scores the eval pairs as the run did;
- the Hub upload goes through huggingface_hub with its network calls replaced.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.hf_api
import pytest
import torch
import torch.distributed as dist
from huggingface_hub import HfApi
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from minrm.config import parse_args
from minrm.distributed import Dist
from minrm.model import hf_folder
from minrm.training.checkpoint import CheckpointWriter, TrainerState, checkpoint_interval, find_latest, load_checkpoint
from minrm.training.tracking import ELAPSED
from tests.conftest import ROOT, minrm_command, read_metrics, run_minrm, run_minrm_here

# 48 pairs, 2 per optimizer step, 2 epochs: 48 steps, enough for a kill to land mid-run.
STEPS, EVERY = 48, 6


def flags(model_dir, pairs_file, eval_file, out, name, pdbs=2):
    return [
        "--model_name_or_path", model_dir,
        "--dataset_mixer_list", pairs_file, "1.0",
        "--dataset_mixer_eval_list", eval_file, "1.0",
        "--dataset_mixer_eval_list_splits", "train",
        "--learning_rate", "2e-4",
        "--warm_up_steps", "2",
        "--seed", "3",
        "--total_episodes", str(2 * STEPS),
        "--per_device_train_batch_size", str(pdbs),
        "--gradient_accumulation_steps", "1",
        "--per_device_eval_batch_size", "4",
        "--num_evals", "4",
        "--checkpointing_steps", str(EVERY),
        "--output_dir", str(out),
        "--run_name", name,
        "--no_plot",
    ]  # fmt: skip


def run_and_kill(args: list[str], run_dir: Path, nproc: int = 1) -> None:
    """Start a run, SIGKILL it (all its processes) once it has written a checkpoint."""
    proc = subprocess.Popen(
        minrm_command(args, nproc), cwd=ROOT, env=minrm_env(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while find_latest(str(run_dir)) is None:
        assert proc.poll() is None, f"the run ended before its first checkpoint:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "model.safetensors").exists(), "the run finished before it was killed"


def run_and_signal(args: list[str], run_dir: Path, nproc: int = 1) -> tuple[int, str]:
    """Start a run, send SIGTERM to the launched process once two steps are logged; returns the
    exit status and the log."""
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            minrm_command(args, nproc), cwd=ROOT, env=minrm_env(), start_new_session=True, stdout=out, stderr=out
        )
        deadline = time.time() + 120
        metrics = run_dir / "metrics.jsonl"
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
            assert proc.poll() is None, f"the run ended before step 2:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, "no step 2 within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # to python, or to torchrun only
        status = proc.wait(timeout=120)
    assert not (run_dir / "model.safetensors").exists(), "the run finished before the signal"
    return status, log.read_text()


def without_checkpointing(args: list[str]) -> list[str]:
    return args[: args.index("--checkpointing_steps")] + args[args.index("--checkpointing_steps") + 2 :]


def check_preempted_and_resume(run_dir: Path, nproc: int, status: int, log: str) -> None:
    """Check a SIGTERM stop's checkpoint and message, and run the command it printed."""
    assert status == (143 if nproc == 1 else 1), log[-3000:]  # torchrun exits 1 when signalled
    step = int(log.split("stopped by SIGTERM after step ")[1].split("/")[0])
    # The checkpoint of the step every rank stopped after, without --checkpointing_steps.
    assert find_latest(str(run_dir)) == str(run_dir / "checkpoints" / f"step_{step}")
    assert len([m for m in read_metrics(run_dir) if "train/rm/loss" in m]) == step
    command = shlex.split(log.split("Resume with:\n")[1].splitlines()[0])
    assert command[-4:] == ["--run_name", run_dir.name, "--resume_from_checkpoint", "auto"]
    result = subprocess.run(command, cwd=ROOT, env=minrm_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step_{step} at step {step}" in result.stdout


def minrm_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def assert_same_run(a: Path, b: Path, atol: float) -> None:
    ma, mb = read_metrics(a), read_metrics(b)
    assert len(ma) == len(mb) == STEPS + 4
    for ra, rb in zip(ma, mb):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert rb[key] == pytest.approx(ra[key], abs=atol, rel=0), key
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, pairs_file, eval_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt_runs")
    # `auto` with no checkpoint yet: starts fresh (and says so). The trainer's main, in this process:
    # the runs killed, signalled and resumed against it are processes of their own.
    args = flags(tiny_model_dir, pairs_file, eval_file, out, "full")
    result = run_minrm_here(args + ["--resume_from_checkpoint", "auto"])
    assert "starting fresh" in result.stdout
    return out / "full"


@pytest.fixture(scope="module")
def uninterrupted_two_process(tiny_model_dir, pairs_file, eval_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt_runs")
    run_minrm(flags(tiny_model_dir, pairs_file, eval_file, out, "full2", pdbs=1), nproc=2)
    return out / "full2"


@pytest.fixture(scope="module")
def preempted_two_process(tiny_model_dir, pairs_file, eval_file, tmp_path_factory) -> tuple[Path, int, str]:
    """A 2-process run (same global batches: 2 x 1 pair) stopped by SIGTERM to torchrun, and a copy
    of its folder as the stop left it (`two_to_one`); its exit status and log."""
    out = tmp_path_factory.mktemp("ckpt_runs2")
    args = without_checkpointing(flags(tiny_model_dir, pairs_file, eval_file, out, "preempted2", pdbs=1))
    status, log = run_and_signal(args, out / "preempted2", nproc=2)
    shutil.copytree(out / "preempted2", out / "two_to_one")
    return out / "preempted2", status, log


def test_checkpoints_are_written_and_pruned(uninterrupted):
    names = sorted(os.listdir(uninterrupted / "checkpoints"))
    assert names == [f"step_{STEPS - EVERY}", f"step_{STEPS}"]  # --keep_last_n_checkpoints 2
    meta = json.loads((uninterrupted / "checkpoints" / f"step_{STEPS}" / "meta.json").read_text())
    assert meta["step"] == STEPS and meta["world_size"] == 1 and meta["derived"]["batch_size"] == 2
    assert not (uninterrupted / "metrics.png").exists()  # --no_plot


def test_kill_and_resume_one_process_is_bitwise(uninterrupted, tiny_model_dir, pairs_file, eval_file, tmp_path):
    args = flags(tiny_model_dir, pairs_file, eval_file, tmp_path, "resumed")
    run_dir = tmp_path / "resumed"
    run_and_kill(args, run_dir)
    meta = json.loads((Path(find_latest(str(run_dir))) / "meta.json").read_text())  # the one `auto` resumes
    before = read_metrics(run_dir, keep_time=True)
    started = time.monotonic()
    run_minrm(args + ["--resume_from_checkpoint", "auto"])
    resumed_for = time.monotonic() - started
    assert_same_run(uninterrupted, run_dir, atol=0)
    # The wall-clock column: the rows up to the checkpoint are kept as they were, and the resumed
    # rows continue from the checkpoint's elapsed seconds (not from 0): it never goes backwards.
    rows = read_metrics(run_dir, keep_time=True)
    kept = sum(r["episode"] <= meta["episode"] for r in rows)
    times = [r[ELAPSED] for r in rows]
    assert times[:kept] == [r[ELAPSED] for r in before[:kept]]
    assert times == sorted(times)
    assert times[kept - 1] <= meta["elapsed_s"] <= times[kept] < meta["elapsed_s"] + resumed_for


def test_two_process_checkpoint_resumes_on_one(
    uninterrupted_two_process, preempted_two_process, tiny_model_dir, pairs_file, eval_file
):
    run_dir = preempted_two_process[0].parent / "two_to_one"
    # The same batch size (2 pairs per step) on one process: 2 pairs per device.
    args = without_checkpointing(flags(tiny_model_dir, pairs_file, eval_file, run_dir.parent, "two_to_one", pdbs=2))
    result = run_minrm_here(args + ["--resume_from_checkpoint", "auto"])  # in this process
    assert "written by 2 processes" in result.stdout
    # After the resume point the reductions run in another order: equal within 1e-5, not bitwise.
    assert_same_run(uninterrupted_two_process, run_dir, atol=1e-5)


def test_sigterm_and_resume_one_process_is_bitwise(uninterrupted, tiny_model_dir, pairs_file, eval_file, tmp_path):
    args = without_checkpointing(flags(tiny_model_dir, pairs_file, eval_file, tmp_path, "preempted"))
    check_preempted_and_resume(tmp_path / "preempted", 1, *run_and_signal(args, tmp_path / "preempted"))
    assert_same_run(uninterrupted, tmp_path / "preempted", atol=0)


def test_sigterm_to_torchrun_and_resume_two_processes_is_bitwise(uninterrupted_two_process, preempted_two_process):
    run_dir, status, log = preempted_two_process
    check_preempted_and_resume(run_dir, 2, status, log)
    assert_same_run(uninterrupted_two_process, run_dir, atol=0)


def test_background_saves_keep_the_state_of_their_step_in_reused_buffers(tmp_path, monkeypatch):
    """Two saves with training between them, the loop's order: save, then `wait_staged` before the
    next optimizer step. Each checkpoint holds the weights of its step, bitwise, while the model
    and the optimizer change under the writes, and the second save copies into the host buffers
    of the first (the same memory, refilled), not into new ones."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        saver = CheckpointWriter(str(tmp_path), keep_last_n=2, d=Dist(0, 1, 0, torch.device("cpu"), mesh))
        staged = []  # the copies the stager hands DCP to write
        stage = saver.stager.stage
        monkeypatch.setattr(saver.stager, "stage", lambda state: staged.append(stage(state)) or staged[-1])
        expected = {}
        for step in (1, 2):
            model(torch.randn(2, 4)).sum().backward()
            optimizer.step()
            expected[step] = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
            saver.save(TrainerState(step=step, episode=2 * step), model, optimizer, meta={})
            saver.wait_staged()
            optimizer.step()  # training goes on while the save may still be writing
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        saver.wait()
    finally:
        dist.destroy_process_group()
    first, second = (host_buffers(f.result()) for f in staged)
    assert len(first) == 4 * 4 and second == first  # per parameter: itself, 2 AdamW moments, its step count
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_1", "step_2"]
    for step in (1, 2):
        dcp_to_torch_save(tmp_path / "checkpoints" / f"step_{step}", tmp_path / f"step_{step}.pt")
        saved = torch.load(tmp_path / f"step_{step}.pt", weights_only=False)
        assert saved["trainer"]["step"] == step and saved["model"].keys() == expected[step].keys()
        for key, value in expected[step].items():
            assert torch.equal(saved["model"][key], value), (step, key)


def host_buffers(staged: dict) -> set[tuple[int, int]]:
    """(address, bytes) of the host memory holding a staged copy's model and optimizer tensors."""
    found = set()

    def visit(x):
        if isinstance(x, torch.Tensor):
            local = x.to_local() if isinstance(x, DTensor) else x
            found.add((local.untyped_storage().data_ptr(), local.untyped_storage().nbytes()))
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)

    visit({"model": staged["model"], "optimizer": staged["optimizer"]})
    return found


def test_checkpointing_steps_epoch():
    assert checkpoint_interval("epoch", train_pairs=48, batch_size=5) == 10  # ceil(48 / 5)
    assert checkpoint_interval("7", 48, 5) == 7 and checkpoint_interval(None, 48, 5) is None
    with pytest.raises(SystemExit, match="checkpointing_steps"):
        parse_args(["--checkpointing_steps", "0"])


def test_auto_needs_a_run_name():
    with pytest.raises(SystemExit, match="needs --run_name"):
        parse_args(["--resume_from_checkpoint", "auto"])


def test_auto_skips_incomplete_checkpoints(uninterrupted, tmp_path):
    root = tmp_path / "run" / "checkpoints"
    shutil.copytree(uninterrupted / "checkpoints", root)
    newest, older = root / f"step_{STEPS}", root / f"step_{STEPS - EVERY}"
    # A save killed before its rename: a temp name is never a checkpoint.
    shutil.copytree(newest, root / f"step_{STEPS + EVERY}.tmp")
    # A complete-looking folder missing a shard file.
    shard = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    shard.unlink()
    assert find_latest(str(tmp_path / "run")) == str(older)
    # A truncated shard.
    shard = next(p for p in older.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:100])
    assert find_latest(str(tmp_path / "run")) is None
    # Named explicitly, an incomplete checkpoint is refused with what is wrong, before any loading.
    with pytest.raises(SystemExit, match=r"shard file __\d_\d\.distcp is truncated"):
        load_checkpoint(str(older), model=None, optimizer=None, meta_now={})


def test_checkpoint_of_another_model_is_refused(uninterrupted, tiny_model_dir, pairs_file, eval_file, tmp_path):
    from tests.conftest import tiny_llama_config

    config = tiny_llama_config(AutoTokenizer.from_pretrained(tiny_model_dir).__len__(), hidden_size=16)
    other = tmp_path / "other_model"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    ckpt = uninterrupted / "checkpoints" / f"step_{STEPS}"
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    args = flags(str(other), pairs_file, eval_file, tmp_path, "other")
    cmd = minrm_command(args + ["--resume_from_checkpoint", str(ckpt)], 1)
    result = subprocess.run(cmd, cwd=ROOT, env=minrm_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "different run" in result.stderr and "model config" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before  # nothing overwritten


def test_export_round_trip(uninterrupted, eval_file, tmp_path):
    out = tmp_path / "exported"
    ckpt = uninterrupted / "checkpoints" / f"step_{STEPS}"
    # 40KB shards: the 82KB tiny model is written as several files with an index.
    cmd = [sys.executable, "-m", "minrm.export", str(ckpt), str(out), "--max_shard_size", "40KB"]
    subprocess.run(cmd, cwd=ROOT, env=minrm_env(), check=True, capture_output=True, timeout=120)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 1
    # The final checkpoint exports to the weights the end of training wrote, bitwise.
    final, exported = load_file(uninterrupted / "model.safetensors"), {}
    for shard in shards:
        exported.update(load_file(out / shard))
    assert final.keys() == exported.keys()
    for key in final:
        assert torch.equal(final[key], exported[key]), key
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    card = (out / "README.md").read_text()
    assert "eval/rm/accuracy" in card and "- loss: bradley_terry\n" in card  # the loss the model was trained with
    # And it scores the saved eval samples as the run did.
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    samples = [json.loads(line) for line in open(uninterrupted / "eval_samples.jsonl")]
    samples = [s for s in samples if s["step"] == STEPS]
    rows = [json.loads(line) for line in open(eval_file)]
    for sample, row in zip(samples, rows):
        for side in ("chosen", "rejected"):
            ids = tok.apply_chat_template(row[side], return_tensors="pt", return_dict=False)
            with torch.no_grad():
                assert model(input_ids=ids).logits.item() == pytest.approx(sample[f"{side}_reward"], abs=1e-6)


def test_push_to_hub_uploads_the_folder(uninterrupted, monkeypatch):
    calls = {}
    monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: {"name": "alice"})
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **k: calls.setdefault("repo", repo_id))
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, branch, **k: calls.setdefault("branch", branch))

    def create_commit(self, repo_id, operations, revision=None, **kwargs):
        calls["commit"] = (repo_id, revision, sorted(op.path_in_repo for op in operations))
        return SimpleNamespace(commit_url="https://huggingface.co/fake")

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    # With hf_xet installed, upload_folder streams through Xet storage (a server of its own); the
    # plain path lists the same files and ends in the one create_commit call we replace.
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)
    # upload_folder posts README.md's front matter to the Hub for validation: keep what it would send.
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, content, **k: calls.setdefault("card", content))
    args = SimpleNamespace(hf_entity=None, hf_repo_id=None, hf_repo_revision=None, run_name="full")
    repo_id, revision = hf_folder.resolve_hub_repo(args)
    url = hf_folder.push_folder(str(uninterrupted), repo_id, revision)
    assert url == "https://huggingface.co/alice/open_instruct_dev/tree/full"
    assert calls["repo"] == "alice/open_instruct_dev" and calls["branch"] == "full"
    repo, branch, files = calls["commit"]
    assert (repo, branch) == ("alice/open_instruct_dev", "full")
    assert {"model.safetensors", "config.json", "README.md", "tokenizer_config.json"} <= set(files)
    assert not any(f.startswith("checkpoints/") for f in files)
    assert "base_model: " in calls["card"]
