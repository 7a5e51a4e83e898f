"""Where metrics go: one line per step on stdout, one JSON object per line in
`<run dir>/metrics.jsonl`, and Weights & Biases with `--with_tracking`. Rank 0 only: the caller
creates a Tracker on rank 0 and None elsewhere.

Every logged row also carries `time/elapsed_s`: the seconds of training since the loop began, read
from a monotonic clock when the row is logged. A resumed run starts its clock at the checkpoint's
value, so the column runs on across restarts (what ran after the checkpoint and the restart's
setup are not counted). `python -m minrm.plot --x time` plots against it.
"""

import dataclasses
import json
import os
import time

ELAPSED = "time/elapsed_s"


class Tracker:
    def __init__(self, run_dir: str, args, derived: dict, started: float):
        self.started = started  # time.monotonic() when training began, moved back by a resumed checkpoint's elapsed_s
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.samples_path = os.path.join(run_dir, "eval_samples.jsonl")
        self.wandb = None
        if args.with_tracking:
            import wandb

            config = {**dataclasses.asdict(args), **derived}
            self.wandb = wandb.init(
                project=args.wandb_project_name, entity=args.wandb_entity, name=args.run_name, config=config
            )

    def log(self, metrics: dict) -> None:
        row = {**metrics, ELAPSED: time.monotonic() - self.started}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """The eval's sampled pairs: a table in W&B, lines in eval_samples.jsonl."""
        with open(self.samples_path, "a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")
        if self.wandb is not None and rows:
            import wandb

            columns = list(rows[0])
            self.wandb.log(
                {"preference_sample_texts": wandb.Table(columns=columns, data=[list(r.values()) for r in rows])}
            )

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def summary_line(metrics: dict) -> str:
    """One readable line: short names, 4 significant digits."""
    parts = []
    for key, value in metrics.items():
        name = key.split("/")[-1]
        parts.append(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}")
    return " ".join(parts)
