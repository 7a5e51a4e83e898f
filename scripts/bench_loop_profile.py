"""Where a training loop's time goes, for the `dialogue` profile (scripts/bench_dialogue.py): cProfile
of a `python -m minrm.train` run of N steps less cProfile of the same run stopped after step 1
(`--total_episodes` = N, then 1, step's pairs), so that what is left is steps 2 to N, whatever the
trainer's functions are called; the bare loop profiles those steps directly. The runs have one
thread and the clock is its CPU time (time.thread_time): other processes on a shared machine do not
count, every kernel runs on that thread, and there is no OpenMP spin-wait for a descheduled second
thread (which under load inflates the groups of many small ops most). Self times are grouped
by what runs them: the C++ kernels the profile can name (autograd's backward engine, the matmuls,
the attention calls, the optimizer's foreach kernels) have groups of their own, every other built-in
counts to the Python function that called it, and Python functions count by their file's package.
cProfile's own cost per Python call inflates the Python-heavy groups: the table gives each group's
share of the profiled loop and the loop's seconds with and without the profiler.
"""

import cProfile
import os
import pstats
import runpy
import shutil
import sys
import time

# Built-ins (C++ kernels) with a group of their own, by a piece of their name.
KERNELS = (
    ("autograd backward engine (C++: every op's backward)", ("run_backward",)),
    ("forward matmuls (linear, matmul)", ("_nn.linear", "torch.matmul", "torch.bmm", "torch.mm", "addmm")),
    ("attention kernel (scaled_dot_product_attention)", ("scaled_dot_product_attention",)),
    ("optimizer and grad-norm kernels (_foreach_*, fused Adam)", ("_foreach_", "_fused_adam")),
)
# Python files by a piece of their path, first match; built-ins they call count with them.
FILES = (
    ("minrm packed attention (host-side plan, per-segment calls)", ("minrm/model/attention.py",)),
    ("minrm rows, cut, collate", ("minrm/training/batching.py", "minrm/data/", "torch/nn/utils/rnn.py")),
    ("minrm grad norm, clipping, lr", ("minrm/training/optim.py",)),
    ("logging: metrics.jsonl, progress line", ("minrm/training/tracking.py", "tqdm/", "/json/")),
    ("minrm other (train step, loss, reward forward)", ("minrm/",)),
    ("data reading (datasets, Arrow)", ("datasets/", "pyarrow/")),
    ("FSDP2 hooks and copies", ("torch/distributed/fsdp/",)),
    ("DTensor dispatch (FSDP2's sharded parameters)", ("torch/distributed/tensor/",)),
    ("torch.distributed other (collectives of one process)", ("torch/distributed/",)),
    ("optimizer (Python)", ("torch/optim/",)),
    ("model forward: other ops and Python (transformers, torch.nn)", ("transformers/", "torch/nn/")),
    ("autograd Python (backward entry, hooks)", ("torch/autograd/", "torch/_tensor.py", "torch/utils/hooks.py")),
)
OTHER = "other"


def group_of(func: tuple) -> str | None:
    """A function's group; None for a built-in that counts to its caller."""
    path, _, name = func
    if path == "~":
        return next((group for group, keys in KERNELS if any(k in name for k in keys)), None)
    path = path.replace(os.sep, "/")
    return next((group for group, keys in FILES if any(k in path for k in keys)), OTHER)


def grouped(stats: dict) -> dict[str, float]:
    """Self seconds by group, from pstats' `stats` dict {func: (cc, nc, tt, ct, callers)}."""
    out = {}
    for func, (_, _, tt, _, callers) in stats.items():
        group = group_of(func)
        if group is not None:
            out[group] = out.get(group, 0.0) + tt
            continue
        for caller, (_, _, caller_tt, _) in callers.items():  # a built-in's time, split by who called it
            g = group_of(caller) or OTHER
            out[g] = out.get(g, 0.0) + caller_tt
        if (rest := tt - sum(c[2] for c in callers.values())) > 1e-9:  # called from no profiled frame
            out[OTHER] = out.get(OTHER, 0.0) + rest
    return out


def load(path: str) -> dict:
    return pstats.Stats(path).stats


def minus(full: dict, start: dict) -> dict:
    """The stats of `full` less those of `start` (a run stopped after step 1): self and per-caller
    times subtracted function by function, cumulative times too."""
    out = {}
    for func, (cc, nc, tt, ct, callers) in full.items():
        s_cc, s_nc, s_tt, s_ct, s_callers = start.get(func, (0, 0, 0.0, 0.0, {}))
        calls = {}
        for caller, c in callers.items():
            s = s_callers.get(caller, (0, 0, 0.0, 0.0))
            calls[caller] = (c[0] - s[0], c[1] - s[1], c[2] - s[2], c[3] - s[3])
        out[func] = (cc - s_cc, nc - s_nc, tt - s_tt, ct - s_ct, calls)
    return out


def top_minrm(stats: dict, n: int = 8) -> list[tuple[str, float, int]]:
    """minrm's functions by cumulative seconds (name, seconds, calls): where a step's phases are."""
    rows = [
        (f"minrm/{path.replace(os.sep, '/').rpartition('/minrm/')[2]}:{name}", ct, nc)
        for (path, _, name), (_, nc, _, ct, _) in stats.items()
        if "/minrm/" in path.replace(os.sep, "/") and name != "<module>"
    ]
    return sorted(rows, key=lambda r: -r[1])[:n]


def profile_system(system: str, folder: str, model: str, data: str, pairs: int, seed: int, steps: int) -> dict:
    """The loop of one system, steps 2 to `steps`, under cProfile: its self seconds by group and its
    minrm functions by cumulative seconds."""
    from scripts.bench_dialogue import bare_command, run, train_command

    path = os.path.join(folder, f"profile_{system}")
    if system == "bare":
        run(bare_command(folder, pairs, seed, steps) + ["--bare_profile", path + ".prof"], "bare profile", threads=1)
        stats = load(path + ".prof")
    else:
        done = {}
        for name, n in (("start", 1), ("full", steps)):
            shutil.rmtree(os.path.join(folder, "output", f"profile_{system}_{name}"), ignore_errors=True)
            command = train_command(model, data, system, folder, pairs, seed, "--total_episodes", str(n * pairs))
            command[1:3] = ["-m", "scripts.bench_loop_profile", f"{path}_{name}.prof", "minrm.train"]
            command[command.index("--run_name") + 1] = f"profile_{system}_{name}"
            run(command, f"profile of {system} ({name})", threads=1)
            done[name] = load(f"{path}_{name}.prof")
        stats = minus(done["full"], done["start"])
    groups = grouped(stats)
    return {"groups": dict(sorted(groups.items(), key=lambda kv: -kv[1])), "minrm": top_minrm(stats)}


def markdown(profiles: dict, steps: int, command: str) -> str:
    """One table of groups (ms a step and share, a column per system), then each system's minrm functions."""
    systems = list(profiles)
    totals = {s: sum(profiles[s]["groups"].values()) for s in systems}
    order = sorted(
        {g for p in profiles.values() for g in p["groups"]}, key=lambda g: -profiles[systems[0]]["groups"].get(g, 0)
    )
    lines = [
        f"`{command}`  ",
        f"Self CPU time at 1 thread by group over steps 2 to {steps} (ms a step, share of the profiled loop);",
        "a built-in counts to the Python function that called it unless it has a group of its own.",
        "",
        "| group | " + " | ".join(systems) + " |",
        "|---|" + "---|" * len(systems),
    ]
    for g in order:
        cells = []
        for s in systems:
            t = profiles[s]["groups"].get(g, 0.0)
            cells.append(f"{1e3 * t / (steps - 1):.1f} ({t / totals[s]:.1%})")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    cells = [f"{1e3 * totals[s] / (steps - 1):.1f}" for s in systems]
    lines.append("| **profiled loop** | " + " | ".join(cells) + " |")
    for s in systems:
        if profiles[s]["minrm"]:
            lines += ["", f"minrm's functions by cumulative time, {s} (ms a step, calls over the steps):", ""]
            lines += ["| function | ms a step | calls |", "|---|---|---|"]
            lines += [f"| `{f}` | {1e3 * t / (steps - 1):.1f} | {n} |" for f, t, n in profiles[s]["minrm"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    """`python -m scripts.bench_loop_profile OUT.prof MODULE ARGS...`: run MODULE as `python -m` would,
    under cProfile on the main thread's CPU clock, and save its stats to OUT.prof."""
    out, module, *argv = sys.argv[1:]
    sys.argv = [module, *argv]
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        profiler.disable()
        profiler.dump_stats(out)


if __name__ == "__main__":
    main()
