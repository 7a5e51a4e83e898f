"""Resumable training: `OUTPUT_DIR/RUN_NAME/checkpoints/step_<N>/` holds DCP's shards of the model and AdamW state
(resharded on load: 2 processes' checkpoint resumes on 1 or 8), DCP's `.metadata`, and rank 0's `meta.json` naming
its run. The step alone places the data stream and the LR schedule. docs/checkpointing.md has the whole story.
"""

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import state_dict as dcp_state
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.stateful import Stateful

from minrm.distributed import Dist, broadcast_object, print0

PREFIX = "step_"
TMP_SUFFIX = ".tmp"
# What must be equal between the checkpoint's run and the resuming run for the result to be the
# same as never stopping: the model, the data stream and the schedule.
MUST_MATCH_ARGS = (
    "dataset_mixer_list dataset_mixer_list_splits max_token_length max_prompt_token_length seed learning_rate "
    "lr_scheduler_type warm_up_steps eps weight_decay max_grad_norm loss center_rewards_coefficient "
    "max_responses_per_prompt chosen_key rejected_key prompt_key responses_key scores_key margin_key"
).split()
MUST_MATCH_DERIVED = ("batch_size", "num_training_steps", "train_pairs")


@dataclasses.dataclass
class TrainerState(Stateful):
    """Where the loop is: the step (= data position and LR schedule state), episodes, RNGs."""

    step: int = 0
    episode: int = 0
    # The last logged metrics (for an export's model card) and the seconds of training so far (where a
    # resumed run's `time/elapsed_s` continues) go in meta.json, not the DCP state: they do not affect training.
    metrics: dict = dataclasses.field(default_factory=dict)
    elapsed_s: float = 0.0

    def state_dict(self) -> dict:
        # The loop draws from no global RNG (dropout is off, the data order has its own generators); they are
        # saved so that anything that did would still resume exactly. Every rank seeds alike: rank 0's stand for all.
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        return {"step": self.step, "episode": self.episode, "rng": rng}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.episode, rng = state["step"], state["episode"], state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if torch.cuda.is_available() and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])


def checkpoint_interval(value: str | None, train_pairs: int, batch_size: int) -> int | None:
    """Steps between checkpoints: `--checkpointing_steps N`, or `epoch` = ceil(train pairs / batch_size)."""
    if value == "epoch":
        return math.ceil(train_pairs / batch_size)
    return None if value is None else int(value)  # `config.validate` refuses all but positive integers


def config_hash(config) -> str:
    """A hash of the model config, minus what does not change the weights' meaning."""
    drop = ("architectures", "_name_or_path", "transformers_version")
    items = {k: v for k, v in config.to_dict().items() if k not in drop}
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _states(model, optimizer, trainer: TrainerState) -> dict:
    """What a checkpoint holds: the model's (sharded) state dict, AdamW's keyed by parameter name (not position,
    so that it survives resharding), and the loop's place. DCP saves and loads these tensors in place."""
    model_state, optimizer_state = dcp_state.get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state, "trainer": trainer}


# ----------------------------------------------------------------------------------------------
# Save


class CheckpointWriter:
    """Writes `checkpoints/step_<N>` in the background (`dcp.async_save`; 8B with AdamW is ~100 GB) into `.tmp`,
    renamed by rank 0 once every rank's files and `.metadata` are written: a crash leaves no whole-looking one."""

    def __init__(self, run_dir: str, keep_last_n: int, d: Dist):
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep_last_n, self.d = keep_last_n, d
        # DCP's collectives (the save plan, the gather of what each rank wrote) run in the writing thread:
        # on the training group they would interleave with FSDP's in a different order on each rank.
        self.group = dist.new_group(backend="gloo")  # every rank creates it, at the same point
        # The stager copies this rank's shards to host memory in a thread of its own, into buffers the first
        # save allocates and every later one refills (pinned on GPU, copied on a stream of their own).
        cuda = d.device.type == "cuda"
        options = StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_non_blocking_copy=cuda)
        self.stager = DefaultStager(options)  # use_async_staging: its default
        self.staging = None  # DCP's future of the copy in flight
        self.pending = None  # (DCP's future, step) of the save in flight
        self.last = None  # the path of the last checkpoint this writer completed

    def save(self, trainer: TrainerState, model, optimizer, meta: dict) -> None:
        """Start writing `step_<trainer.step>` (all ranks call this)."""
        self.wait()
        tmp = os.path.join(self.root, f"{PREFIX}{trainer.step}{TMP_SUFFIX}")
        if self.d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # the leftover of a crashed save of this same step
            os.makedirs(tmp)
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                where = {"step": trainer.step, "episode": trainer.episode, "world_size": self.d.world_size}
                json.dump({**meta, **where, "metrics": trainer.metrics, "elapsed_s": trainer.elapsed_s}, f, indent=1)
        dist.barrier()
        if self.d.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # the stager copies on its own stream, after the update
        states = _states(model, optimizer, trainer)
        saving = dcp.async_save(states, checkpoint_id=tmp, process_group=self.group, async_stager=self.stager)
        self.staging, self.pending = saving.staging_completion, (saving.upload_completion, trainer.step)

    def wait_staged(self) -> None:
        """Block until the save in flight has copied the state (before an optimizer step changes it in place)."""
        if self.staging is not None:
            self.staging.result()
            self.staging = None

    def poll(self) -> None:
        """Complete the save in flight if its writes are done (no collective: each rank looks at its own)."""
        if self.pending is not None and self.pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight is written and renamed (before a save, the export and any exit)."""
        if self.pending is None:
            return
        future, step = self.pending
        self.pending = None
        # Rank 0's future completes only after every rank reported its files and rank 0 wrote `.metadata`.
        future.result()  # waits for the writes; raises here if the save failed
        self.last = os.path.join(self.root, f"{PREFIX}{step}")
        if self.d.is_main:
            shutil.rmtree(self.last, ignore_errors=True)  # an older run's step_<N> that a resume went back past
            os.rename(self.last + TMP_SUFFIX, self.last)
            _prune(self.root, self.keep_last_n, step)
            print0(f"saved checkpoint {self.last}")


def _steps(root: str) -> list[tuple[int, str]]:
    """(step, path) of every `step_<N>` folder (not `step_<N>.tmp`), oldest first."""
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted((int(n[len(PREFIX) :]), os.path.join(root, n)) for n in names if re.fullmatch(PREFIX + r"\d+", n))


def _prune(root: str, keep_last_n: int, step: int) -> None:
    """Delete all but the newest `keep_last_n` checkpoints up to `step`. Later ones exist only when a
    run was resumed from an older checkpoint by path: they are left alone (not ours to delete)."""
    if keep_last_n > 0:
        for _, path in [s for s in _steps(root) if s[0] <= step][:-keep_last_n]:
            shutil.rmtree(path)


# ----------------------------------------------------------------------------------------------
# Find, check, load


def check_complete(path: str) -> dict:
    """The checkpoint's meta.json, once every file it needs is there and long enough (else ValueError, saying which)."""
    if not all(os.path.isfile(os.path.join(path, name)) for name in ("meta.json", ".metadata")):
        raise ValueError(f"{path} is not a complete minrm checkpoint (meta.json or DCP's .metadata is missing)")
    try:
        meta = json.loads(Path(path, "meta.json").read_text())
        storage = dcp.FileSystemReader(path).read_metadata().storage_data
    except Exception as e:  # a truncated json or pickle
        raise ValueError(f"{path}: cannot read its metadata ({type(e).__name__}: {e})") from e
    sizes = {}
    for info in storage.values():
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sizes.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ValueError(f"{path} is incomplete: shard file {name} is missing")
        if (have := os.path.getsize(file)) < size:
            raise ValueError(f"{path} is incomplete: shard file {name} is truncated ({have} < {size} bytes)")
    return meta


def find_latest(run_dir: str) -> str | None:
    """The newest complete checkpoint of a run, skipping (and naming) incomplete ones."""
    for _, path in reversed(_steps(os.path.join(run_dir, "checkpoints"))):
        try:
            check_complete(path)
            return path
        except ValueError as e:
            print0(f"skipping checkpoint: {e}")
    return None


def resolve_resume(args, run_dir: str, d: Dist) -> str | None:
    """The checkpoint `--resume_from_checkpoint` names (`auto`: the run's newest), or None (all ranks call this).
    `auto` looks on rank 0 and tells the others: another node's listing of a network filesystem can be stale."""
    if args.resume_from_checkpoint != "auto":
        return args.resume_from_checkpoint
    path = broadcast_object(find_latest(run_dir) if d.is_main else None)
    print0(f"resume: {path}" if path else f"resume: no complete checkpoint in {run_dir}/checkpoints; starting fresh")
    return path


def load_checkpoint(path: str, model, optimizer, meta_now: dict) -> TrainerState:
    """Load a checkpoint of this run into the (sharded) model and optimizer; returns the trainer state to continue."""
    try:
        meta = check_complete(path)
    except ValueError as e:
        raise SystemExit(f"minrm: error: --resume_from_checkpoint: {e}") from e
    wrong = []
    if meta["config_hash"] != meta_now["config_hash"]:
        wrong.append(f"model config ({meta['args']['model_name_or_path']} vs {meta_now['args']['model_name_or_path']})")
    for part, label, keys in (("derived", "", MUST_MATCH_DERIVED), ("args", "--", MUST_MATCH_ARGS)):
        for key in keys:
            if meta[part].get(key) != meta_now[part][key]:
                wrong.append(f"{label}{key} ({meta[part].get(key)} vs {meta_now[part][key]})")
    if wrong:
        raise SystemExit(
            f"minrm: error: checkpoint {path} was written by a different run; checkpoint vs now: {'; '.join(wrong)}. "
            "Resume with the flags it was written with (batch_size = per_device_train_batch_size x "
            "processes x gradient_accumulation_steps must stay the same)."
        )
    trainer = TrainerState(metrics=meta.get("metrics", {}), elapsed_s=meta.get("elapsed_s", 0.0))
    states = _states(model, optimizer, trainer)
    dcp.load(states, checkpoint_id=path)
    dcp_state.set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=states["optimizer"])
    print0(f"resumed from {path} at step {trainer.step} (written by {meta['world_size']} processes)")
    return trainer


def load_model_weights(path: str, model: torch.nn.Module) -> None:
    """Load only the model part of a checkpoint (`check_complete` passed) into an unsharded model (for export)."""
    state = {"model": dcp_state.get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=path)
    dcp_state.set_model_state_dict(model, state["model"])


def truncate_logs(run_dir: str, trainer: TrainerState) -> None:
    """Drop the log lines a killed run wrote after the checkpoint: the resumed run logs what an unbroken run does."""
    logs = {"metrics.jsonl": ("episode", trainer.episode), "eval_samples.jsonl": ("step", trainer.step)}
    for name, (key, limit) in logs.items():
        if (file := Path(run_dir, name)).is_file():
            lines = file.read_text().splitlines(keepends=True)
            file.write_text("".join(line for line in lines if line.strip() and json.loads(line)[key] <= limit))
