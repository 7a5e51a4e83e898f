"""Draw a run's metrics: six panels (loss, accuracy, chosen and rejected rewards, reward margin,
learning rate), train rows as lines and eval rows as dots, several runs overlaid.

    python -m minrm.plot output/RUN_NAME                              # -> metrics.png
    python -m minrm.plot output/run_a output/run_b --out ab.png --x time --smooth 0.9

A RUN is a run folder or a metrics.jsonl: minrm's, or any JSON-lines file with the same keys (a reference
run's W&B history exported to JSONL; null values count as absent). The figure is a plain matplotlib `Figure`
(savefig draws a PNG with Agg): no pyplot state and no display.
"""

import argparse
import itertools
import json
import os

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from minrm.training.tracking import ELAPSED

PANELS = ("loss", "accuracy", "chosen_rewards", "rejected_rewards", "reward_margin", "lr")
X_LABELS = {"episode": "episode (training pairs)", "time": f"wall-clock hours ({ELAPSED} / 3600)"}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_run(path: str) -> tuple[str, list[dict]]:
    """(run name, rows) of a run folder or a metrics file; the name is the folder's."""
    file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        what = f"run folder {path} has no metrics.jsonl" if os.path.isdir(path) else f"{path} does not exist"
        raise SystemExit(f"minrm: error: {what}; give a run folder or a metrics.jsonl file")
    folder, base = os.path.split(os.path.abspath(file))
    name = os.path.basename(folder) if base == "metrics.jsonl" else os.path.splitext(base)[0]
    rows = []
    with open(file) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"minrm: error: {file}, line {number}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise SystemExit(f"minrm: error: {file}, line {number}: expected a JSON object, got {row!r:.60}")
            rows.append(row)
    keys = {f"{side}/rm/{name}" for side in ("train", "eval") for name in PANELS}
    if not any(keys & row.keys() for row in rows):
        raise SystemExit(f"minrm: error: {file} has none of the metrics minrm plots (train/rm/loss, eval/rm/loss, ...)")
    return name, rows


def load_runs(paths: list[str]) -> list[tuple[str, list[dict]]]:
    """`load_run` of each path; runs that share a name (same-named folders) are named by their paths as given."""
    runs = [load_run(path) for path in paths]
    if len({name for name, _ in runs}) < len(runs):
        runs = [(path, rows) for path, (_, rows) in zip(paths, runs)]
    return runs


def series(rows: list[dict], key: str, x: str, run: str) -> tuple[list[float], list[float]]:
    """The (x, y) of every row that has a number under `key`."""
    x_key, scale = (ELAPSED, 3600) if x == "time" else ("episode", 1)
    points = [row for row in rows if _number(row.get(key))]
    if not all(_number(row.get(x_key)) for row in points):
        hint = "; plot it with --x episode" if x == "time" else ""
        raise SystemExit(f"minrm: error: run {run}: a row with {key} has no number under {x_key}{hint}")
    return [row[x_key] / scale for row in points], [row[key] for row in points]


def plot_runs(runs: list[tuple[str, list[dict]]], x: str = "episode", smoothing: float = 0.0) -> Figure:
    """The six panels for (name, rows) runs. Train lines are smoothed with `smoothing` (0: off;
    the raw line stays behind, faint); eval dots never are."""
    if not 0 <= smoothing < 1:
        raise SystemExit(f"minrm: error: --smooth: expected a weight in [0, 1), got {smoothing}")
    fig = Figure(figsize=(13, 7), layout="constrained")
    for ax, panel in zip(fig.subplots(2, 3).flat, PANELS):
        train_key, eval_key = f"train/rm/{panel}", f"eval/rm/{panel}"
        ax.set_title(train_key if panel == "lr" else f"{train_key}, {eval_key}", fontsize=10)
        ax.set_xlabel(X_LABELS[x], fontsize=8)
        ax.grid(alpha=0.3)
        for i, (name, rows) in enumerate(runs):
            color = f"C{i % 10}"
            xs, ys = series(rows, train_key, x, name)
            if smoothing > 0 and panel != "lr":  # the schedule is not noisy: its warm-up corner stays sharp
                ax.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8, gid="train_raw")
                # An exponential moving average: s_0 = y_0, s_i = w s_(i-1) + (1 - w) y_i.
                ys = list(itertools.accumulate(ys, lambda s, y: smoothing * s + (1 - smoothing) * y))
            ax.plot(xs, ys, color=color, linewidth=1.3, gid="train")
            xs, ys = series(rows, eval_key, x, name)
            ax.plot(xs, ys, "o", color=color, markeredgecolor="black", markersize=6, gid="eval")
    handles = [Line2D([], [], color=f"C{i % 10}", linewidth=2) for i in range(len(runs))]
    fig.legend(handles, [name for name, _ in runs], loc="outside upper center", ncols=min(len(runs), 4))
    how = f"train rows: lines (smoothed, EMA weight {smoothing})" if smoothing else "train rows: lines"
    fig.text(0.995, 0.995, f"{how}; eval rows: dots", ha="right", va="top", fontsize=8, color="0.35")
    return fig


def save_run_plot(run_dir: str, dpi: int = 100) -> str:
    """Draw a run folder's metrics against episodes into `run_dir/metrics.png`; returns the path."""
    path = os.path.join(run_dir, "metrics.png")
    plot_runs([load_run(run_dir)]).savefig(path, dpi=dpi)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minrm.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a run folder or a metrics.jsonl file")
    parser.add_argument("--out", default="metrics.png", help="the PNG to write (default: metrics.png)")
    parser.add_argument("--x", choices=X_LABELS, default="episode", help="x axis: episodes, or wall-clock hours")
    parser.add_argument("--smooth", type=float, default=0.0, metavar="WEIGHT",
                        help="smooth the train lines: an exponential moving average of this weight in [0, 1) (0: off)")  # fmt: skip
    parser.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (default: 100)")
    args = parser.parse_args(argv)
    plot_runs(load_runs(args.runs), args.x, args.smooth).savefig(args.out, dpi=args.dpi)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
