"""Stopping a run safely, on a signal (preemption, Ctrl-C) or on a loss, gradient or weight that is not
finite: every rank stops after the same step, a signal's stop writes a checkpoint and exits 128 + its
number, a non-finite value exits 1 with nothing after the last good step saved (docs/checkpointing.md).
"""

import contextlib
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from minrm.distributed import Dist, print0
from minrm.training.checkpoint import CheckpointWriter, find_latest

# A second signal within this many seconds is the same request delivered twice (SLURM signals every process
# of a job and torchrun forwards what it receives); a later one exits at once.
SAME_REQUEST_S = 1.0


class StopSignal:
    """From construction until `restore`, SIGTERM and SIGINT set `requested` instead of ending the process.
    The loop reads it in the step's stop vote, so every rank stops after the same step."""

    def __init__(self):
        self.requested, self.first_at = False, 0.0  # whether this rank got a signal, and when the first came
        # A rank that heard of the stop only through the vote names SIGTERM, and exits 143.
        self.name, self.exit_status = "SIGTERM", 128 + signal.SIGTERM
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame) -> None:
        if not self.requested:
            self.requested, self.first_at = True, time.monotonic()
            self.name, self.exit_status = signal.Signals(signum).name, 128 + signum
            what = "finishing this optimizer step, then saving a checkpoint (a second signal exits at once)"
            os.write(2, f"minrm: got {self.name}: {what}\n".encode())  # print() is not safe inside a signal handler
        elif time.monotonic() - self.first_at > SAME_REQUEST_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def exit_after_signal(stop: StopSignal, step: int, total: int, saver: CheckpointWriter, run_name: str) -> NoReturn:
    """Wait for the stop's checkpoint, say how to resume, exit (all ranks call this)."""
    saver.wait()
    print0(
        f"minrm: stopped by {stop.name} after step {step}/{total}; checkpoint {saver.last}. Resume with:\n"
        f"  {resume_command(run_name)}"
    )
    dist.destroy_process_group()
    raise SystemExit(stop.exit_status)


def resume_command(run_name: str) -> str:
    """This run's command line with `--run_name NAME --resume_from_checkpoint auto`; under torchrun, the launcher's
    own, read from the parent process (Linux)."""
    drop, argv = ("--run_name", "--resume_from_checkpoint"), sys.argv[1:]  # as `--flag value` or `--flag=value`
    args = [a for a, before in zip(argv, [None, *argv]) if before not in drop and a.split("=")[0] not in drop]
    launcher = [sys.executable, "-m", "minrm.train"]
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: torchrun is the parent
        launcher = ["torchrun", "<the launcher flags of this run>", "-m", "minrm.train"]
        with contextlib.suppress(OSError):
            parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")[:-1]
            if parent[len(parent) - len(argv) :] == argv:  # it ends with our arguments
                launcher = parent[: len(parent) - len(argv)]
    return shlex.join(launcher + args + ["--run_name", run_name, "--resume_from_checkpoint", "auto"])


# ----------------------------------------------------------------------------------------------
# Non-finite values


def nonfinite_weights(model: torch.nn.Module) -> str:
    """How many weights are NaN or infinite over all ranks' shards (DTensor's sum reduces over the ranks); '' when
    none (all ranks call this)."""
    count = sum((~torch.isfinite(p.detach())).sum() for p in model.parameters())  # int64: exact past 2^24
    n = int(count.full_tensor() if isinstance(count, DTensor) else count)
    return f"{n} weights are NaN or infinite after the update" if n else ""


def exit_nonfinite(what: str, step: int, lr: float, saver: CheckpointWriter, run_dir: str, d: Dist) -> NoReturn:
    """Exit saying what was not finite, at which step, and the last checkpoint (all ranks call this)."""
    saver.wait()  # a checkpoint in flight holds an earlier, finite state: let it complete
    latest = find_latest(run_dir) if d.is_main else None
    where = f"the last checkpoint is {latest}" if latest else "there is no checkpoint (see --checkpointing_steps)"
    dist.destroy_process_group()
    why = f"step {step}: {what} (learning rate {lr:.6g}). The run stops without saving or exporting these weights"
    raise SystemExit(f"minrm: error: {why}; {where}." if d.is_main else 1)
