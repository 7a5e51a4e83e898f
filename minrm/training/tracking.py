"""Where metrics go on rank 0: a line per step on stdout, `<run dir>/metrics.jsonl`, and W&B with `--with_tracking`.
Each row carries `time/elapsed_s`, the seconds of training so far, which a resumed run continues from its checkpoint.
"""

import dataclasses
import json
import os
import time

ELAPSED = "time/elapsed_s"


class Tracker:
    def __init__(self, run_dir: str, args, derived: dict, started: float):
        # started: time.monotonic() when training began, moved back by a resumed checkpoint's elapsed_s
        self.run_dir, self.started, self.wandb = run_dir, started, None
        if args.with_tracking:
            import wandb

            config = {**dataclasses.asdict(args), **derived}
            self.wandb = wandb.init(
                project=args.wandb_project_name, entity=args.wandb_entity, name=args.run_name, config=config
            )

    def log(self, metrics: dict) -> None:
        row = {**metrics, ELAPSED: time.monotonic() - self.started}
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row)

    def log_eval(self, step: str, metrics: dict, samples: list[dict], write) -> None:
        """An eval's metrics, and its sampled rows in eval_samples.jsonl, in W&B, and three of them to `write`."""
        self.log(metrics)
        with open(os.path.join(self.run_dir, "eval_samples.jsonl"), "a") as f:
            f.writelines(json.dumps({"step": int(step.split("/")[0]), **row}) + "\n" for row in samples)
        if self.wandb is not None and samples:
            import wandb

            table = wandb.Table(columns=list(samples[0]), data=[list(r.values()) for r in samples])
            self.wandb.log({"preference_sample_texts": table})
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
