"""Where metrics go on rank 0: a line per step on stdout, `<run dir>/metrics.jsonl`, and W&B with
`--with_tracking`. Each row carries `time/elapsed_s`, the seconds of training so far (monotonic clock):
a resumed run's clock starts at its checkpoint's value, so the column runs on across restarts.
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

            table = wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
            self.wandb.log({"preference_sample_texts": table})

    def log_eval(self, step: str, metrics: dict, samples: list[dict], write) -> None:
        """An eval's metrics and sampled rows, logged, and written (`write`: a line of text) with three of the rows."""
        self.log(metrics)
        self.log_samples(int(step.split("/")[0]), samples)
        write(f"eval {step} {summary_line(metrics)}")
        for s in samples[:3]:
            rewards = f"{s['chosen_reward']:+.3f} vs {s['rejected_reward']:+.3f}"
            texts = f"{s['chosen_response'][:60]!r} / {s['rejected_response'][:60]!r}"
            write(f"  {'ok ' if s['correct'] else 'bad'} {rewards}: {texts}")

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def summary_line(metrics: dict) -> str:
    """One readable line: short names, 4 significant digits."""
    names = [key.split("/")[-1] for key in metrics]
    return " ".join(f"{n}={v:.4g}" if isinstance(v, float) else f"{n}={v}" for n, v in zip(names, metrics.values()))
