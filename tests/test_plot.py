"""`python -m minrm.plot` on hand-written metrics files: the panels' titles, the plotted data read
back from the matplotlib Figure against the file's values, the smoothing against its formula, two
runs overlaid, the time axis, the PNG written, and the errors. (A finished run's own plot is
checked in test_train.py; the time column across a resume in test_checkpoint.py.)"""

import json

import matplotlib.image
import pytest

from minrm.plot import load_run, load_runs, main, plot_runs
from minrm.training.tracking import ELAPSED

TITLES = [
    "train/rm/loss, eval/rm/loss",
    "train/rm/accuracy, eval/rm/accuracy",
    "train/rm/chosen_rewards, eval/rm/chosen_rewards",
    "train/rm/rejected_rewards, eval/rm/rejected_rewards",
    "train/rm/reward_margin, eval/rm/reward_margin",
    "train/rm/lr",
]
NAMES = ["loss", "accuracy", "chosen_rewards", "rejected_rewards", "reward_margin"]


def metrics_rows(shift: float) -> list[dict]:
    """7 train rows and evals after steps 3 and 7, as train.py writes them; the eval rows carry
    nulls for the train keys, as a W&B history export does."""
    rows, elapsed = [], 0.0
    for step in range(1, 8):
        elapsed += 10.0 + step
        row = {"episode": 4 * step, "epoch": step / 7}
        for k, name in enumerate(NAMES):
            row[f"train/rm/{name}"] = shift + (-1) ** step * 0.1 * step + k
        row["train/rm/lr"] = 1e-3 * (1 - step / 7)
        rows.append({**row, ELAPSED: elapsed})
        if step in (3, 7):
            elapsed += 5.0
            evals = {f"eval/rm/{name}": shift + 0.5 * step + k for k, name in enumerate(NAMES)}
            rows.append({"episode": 4 * step, "epoch": step / 7, "train/rm/loss": None, **evals, ELAPSED: elapsed})
    return rows


def write(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def run_a(tmp_path):
    """A run folder, as minrm leaves it."""
    write(tmp_path / "run_a" / "metrics.jsonl", metrics_rows(0.0))
    return str(tmp_path / "run_a")


@pytest.fixture
def run_b(tmp_path):
    """A bare metrics file (a reference run exported to JSONL)."""
    return write(tmp_path / "reference.jsonl", metrics_rows(2.0))


def lines(ax, gid: str) -> list:
    return [line for line in ax.get_lines() if line.get_gid() == gid]


def expected(rows: list[dict], key: str, x: str = "episode") -> list[list]:
    pick = (lambda r: r[ELAPSED] / 3600) if x == "time" else (lambda r: r["episode"])
    return [[pick(r), r[key]] for r in rows if r.get(key) is not None]


def test_six_panels_hold_the_file_values(run_a):
    fig = plot_runs([load_run(run_a)])
    rows = metrics_rows(0.0)
    assert [ax.get_title() for ax in fig.axes] == TITLES
    for ax, name in zip(fig.axes, NAMES + ["lr"]):
        (train,) = lines(ax, "train")
        assert train.get_xydata().tolist() == expected(rows, f"train/rm/{name}")
        (evals,) = lines(ax, "eval")
        assert evals.get_linestyle() == "None" and evals.get_marker() == "o"  # dots, not a line
        assert evals.get_xydata().tolist() == expected(rows, f"eval/rm/{name}")
        assert not lines(ax, "train_raw")  # smoothing is off by default
    assert len(expected(rows, "eval/rm/loss")) == 2 and len(expected(rows, "train/rm/loss")) == 7
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["run_a"]


def test_smoothing_is_an_exponential_moving_average(run_a):
    w = 0.6
    fig = plot_runs([load_run(run_a)], smoothing=w)
    ys = [y for _, y in expected(metrics_rows(0.0), "train/rm/loss")]
    # The closed form of s_0 = y_0, s_i = w s_(i-1) + (1 - w) y_i.
    closed = [w**i * ys[0] + sum((1 - w) * w ** (i - j) * ys[j] for j in range(1, i + 1)) for i in range(len(ys))]
    (train,) = lines(fig.axes[0], "train")
    assert train.get_ydata().tolist() == pytest.approx(closed, abs=1e-12)
    (raw,) = lines(fig.axes[0], "train_raw")  # the raw line stays, faint
    assert raw.get_ydata().tolist() == ys and raw.get_alpha() < 1
    (lr,) = lines(fig.axes[5], "train")  # nor is the learning rate: the schedule is not noisy
    assert lr.get_ydata().tolist() == [y for _, y in expected(metrics_rows(0.0), "train/rm/lr")]
    assert not lines(fig.axes[5], "train_raw")
    (evals,) = lines(fig.axes[0], "eval")  # eval dots are never smoothed
    assert [y for _, y in evals.get_xydata()] == [y for _, y in expected(metrics_rows(0.0), "eval/rm/loss")]


def test_two_runs_overlaid_from_the_command_line(run_a, run_b, tmp_path):
    out = tmp_path / "ab.png"
    main([run_a, run_b, "--out", str(out), "--dpi", "50"])
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (7 * 50, 13 * 50)  # figsize (13, 7) inches at 50 dpi
    assert image[..., :3].std() > 0.05  # something is drawn
    fig = plot_runs([load_run(run_a), load_run(run_b)])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["run_a", "reference"]
    for ax, name in zip(fig.axes, NAMES):
        a, b = lines(ax, "train")
        assert a.get_color() != b.get_color()
        assert b.get_xydata().tolist() == expected(metrics_rows(2.0), f"train/rm/{name}")
        assert [e.get_color() for e in lines(ax, "eval")] == [a.get_color(), b.get_color()]


def test_runs_of_the_same_name_are_told_apart_by_path(run_a, run_b, tmp_path):
    other = write(tmp_path / "elsewhere" / "run_a" / "metrics.jsonl", metrics_rows(1.0))
    assert [name for name, _ in load_runs([run_a, run_b])] == ["run_a", "reference"]
    assert [name for name, _ in load_runs([run_a, other])] == [run_a, other]


def test_time_axis_is_elapsed_hours(run_a, run_b):
    fig = plot_runs([load_run(run_a), load_run(run_b)], x="time")
    for ax, name in zip(fig.axes, NAMES):
        assert "hours" in ax.get_xlabel()
        for train, evals, shift in zip(lines(ax, "train"), lines(ax, "eval"), (0.0, 2.0)):
            assert train.get_xydata().tolist() == expected(metrics_rows(shift), f"train/rm/{name}", "time")
            assert evals.get_xydata().tolist() == expected(metrics_rows(shift), f"eval/rm/{name}", "time")


def test_bad_input_is_one_line_naming_the_file(run_a, tmp_path):
    with pytest.raises(SystemExit, match="has no metrics.jsonl"):
        main([str(tmp_path)])
    with pytest.raises(SystemExit, match="missing.jsonl does not exist"):
        main([str(tmp_path / "missing.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"episode": 1, "train/rm/loss": 0.5}\n{"episode": 2,\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl, line 2: not valid JSON"):
        load_run(str(bad))
    other = write(tmp_path / "other.jsonl", [{"step": 1, "loss": 0.5}])
    with pytest.raises(SystemExit, match="none of the metrics minrm plots"):
        load_run(other)
    no_time = write(tmp_path / "no_time.jsonl", [{k: v for k, v in r.items() if k != ELAPSED} for r in metrics_rows(0)])
    with pytest.raises(SystemExit, match=r"no number under time/elapsed_s; plot it with --x episode"):
        main([no_time, "--x", "time"])
    with pytest.raises(SystemExit, match=r"--smooth: expected a weight in \[0, 1\), got 1.0"):
        main([run_a, "--smooth", "1"])
