"""Stopping a run safely: on a signal (preemption, Ctrl-C), and on a loss, gradient or weight that is
not finite.

Signals. `StopSignal` turns SIGTERM and SIGINT into a request that the loop reads once per
optimizer step, inside the step's one all-reduce, so that every rank stops after the same step
even when the signal reaches the ranks at different times. The loop then writes a checkpoint,
waits for it, prints the command that resumes the run, and exits with 128 + the signal's number
(143 for SIGTERM, 130 for SIGINT; a rank that heard of the stop only through the reduction exits
with 143). A second signal exits at once, unless it comes within `SAME_REQUEST_S` of the first:
that is the same request delivered twice (SLURM signals every process of a job and torchrun
forwards what it receives, so a worker can get both).

Non-finite values. The loss and the global gradient norm are checked once per optimizer step,
before the update, from the values the step's reduction brings to the host anyway; the weights
are checked before every checkpoint and before the export. A non-finite value ends the run with
an error naming the step, the value and the last checkpoint, and exit status 1: nothing after
the last good step is applied, saved or exported.
"""

import os
import shlex
import signal
import sys
import time
from typing import NoReturn

import torch
import torch.distributed as dist

from minrm.distributed import Dist, all_reduce_sum, print0
from minrm.training.checkpoint import CheckpointWriter, find_latest
from minrm.training.sharding import counted_shards

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SAME_REQUEST_S = 1.0


class StopSignal:
    """From construction until `restore`, SIGTERM and SIGINT set `requested` instead of ending the process."""

    def __init__(self):
        self.signum = None  # the first signal received
        self.first_at = 0.0
        self.previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum, self.first_at = signum, time.monotonic()
            note = f"minrm: got {signal.Signals(signum).name}: finishing this optimizer step, then saving a checkpoint (a second signal exits at once)\n"
            os.write(2, note.encode())  # print() is not safe inside a signal handler
        elif time.monotonic() - self.first_at > SAME_REQUEST_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    @property
    def requested(self) -> float:
        """1.0 once this rank got a signal: summed over ranks in the step's reduction."""
        return float(self.signum is not None)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name

    @property
    def exit_status(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def exit_after_signal(stop: StopSignal, step: int, total: int, saver: CheckpointWriter, run_name: str) -> NoReturn:
    """After the stop's checkpoint was started (all ranks call this): wait for it, say how to resume, exit."""
    saver.wait()
    print0(
        f"minrm: stopped by {stop.name} after step {step}/{total}; checkpoint {saver.last}. Resume with:\n"
        f"  {resume_command(run_name)}"
    )
    dist.destroy_process_group()
    raise SystemExit(stop.exit_status)


def resume_command(run_name: str) -> str:
    """This run's command line with `--run_name NAME --resume_from_checkpoint auto`. Under torchrun the
    launcher's own command line is read from the parent process (Linux), so it is exact."""
    args = _without(sys.argv[1:], ("--run_name", "--resume_from_checkpoint"))
    launcher = [sys.executable, "-m", "minrm.train"]
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: torchrun is the parent
        launcher = ["torchrun", "<the launcher flags of this run>", "-m", "minrm.train"]
        try:
            with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
                parent = f.read().decode().split("\0")[:-1]
            if parent[len(parent) - len(sys.argv) + 1 :] == sys.argv[1:]:  # it ends with our arguments
                launcher = parent[: len(parent) - len(sys.argv) + 1]
        except OSError:
            pass
    return shlex.join(launcher + args + ["--run_name", run_name, "--resume_from_checkpoint", "auto"])


def _without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """`argv` less the given single-value flags, as `--flag value` or `--flag=value`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif not arg.startswith(tuple(f + "=" for f in flags)):
            out.append(arg)
    return out


# ----------------------------------------------------------------------------------------------
# Non-finite values


def nonfinite_weights(model: torch.nn.Module, device: torch.device) -> str:
    """How many weights are NaN or infinite, each counted once over all ranks' shards; '' when none
    (all ranks call this)."""
    count = torch.zeros((), dtype=torch.int64, device=device)  # exact past fp32's 2^24
    for local in counted_shards(p.detach() for p in model.parameters()):
        count += (~torch.isfinite(local)).sum()
    n = int(all_reduce_sum(count).item())
    return f"{n} weights are NaN or infinite after the update" if n else ""


def exit_nonfinite(what: str, step: int, lr: float, saver: CheckpointWriter, run_dir: str, d: Dist) -> NoReturn:
    """Stop the run with an error (all ranks call this): what was not finite, at which step, and the last
    checkpoint. `what` says whether the update was applied."""
    saver.wait()  # a checkpoint in flight holds an earlier, finite state: let it complete
    latest = find_latest(run_dir) if d.is_main else None
    where = f"the last checkpoint is {latest}" if latest else "there is no checkpoint (see --checkpointing_steps)"
    dist.destroy_process_group()
    raise SystemExit(
        f"minrm: error: step {step}: {what} (learning rate {lr:.6g}). The run stops without saving or "
        f"exporting these weights; {where}."
        if d.is_main
        else 1
    )
