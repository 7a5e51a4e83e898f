"""Everything only a GPU can show, in one command of at most 8 minutes on one H100/H200:

    bash scripts/gpu_check.sh                  # writes gpu_check/report.md and gpu_check/report.json
    bash scripts/gpu_check.sh --out /tmp/gpu

The parts (`parts`): the GPU-only tests; FlexAttention vs segment attention vs padded on the
multiturn and longresponse profiles (`scripts.bench`: speed, and each mode's rewards and loss
against the bare loop's); Liger on and off (`scripts.bench_liger`); bf16 vs fp32 rewards (the
GPU-only training test records the largest eval-reward difference); `scripts.bench --size 8b`
(computed tokens/s, MFU against the GPU's dense bf16 peak, peak memory). Each part is its own
process under `timeout` with its own budget (6.7 minutes in all, 7.3 if every part also needs its
`KILL_AFTER`): a part that fails or runs out of time is recorded and the next one runs, and the
report is rewritten after every part. Without CUDA nothing runs: every part's command is checked
(its module imports and takes its flags, its test ids are collected), and the check exits 0 when
all are there.
"""

import argparse
import importlib
import json
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets for each GPU
# (half their "with sparsity" figures); the first name contained in the device's name counts.
BF16_PEAK_TFLOPS = {
    "H100 PCIe": 756,
    "H100 NVL": 835,
    "H200 NVL": 835,
    "H100": 989,  # SXM
    "H200": 989,  # SXM
    "A100": 312,
    "L40S": 362,
    "L4": 121,
}
PEAK_SOURCE = "NVIDIA datasheets, dense bf16 (half the sparse figure)"

TESTS_TRAINING = [
    "tests/test_gpu.py::test_bf16_rewards_close_to_fp32_on_gpu",
    "tests/test_batching.py::test_flex_attention_gradients_match_padded_on_gpu",
]
TESTS_LIGER = [
    "tests/test_liger.py::test_rewards_and_grads_match_on_gpu",
    "tests/test_liger.py::test_training_matches_on_gpu",
]
KILL_AFTER = 5  # seconds from timeout's TERM to its KILL (minrm.train finishes its step on a TERM)
# 100M at 16 pairs a step: enough tokens per step (4k-30k) for the attention to weigh on a GPU.
ATTENTION_BENCH = ["--size", "100m", "--pairs", "16", "--steps", "4", "--repeats", "2", "--packed_attention"]


@dataclass
class Part:
    name: str
    budget_s: int
    module: str  # run as `python -m module args`
    args: list[str]
    tests: tuple[str, ...] = ()  # pytest ids, for the check without a GPU


BATCHINGS_8B = ("padded", "packed", "shared_prefix")  # no bare: a second 8B model would not fit

def pytest_part(name: str, budget: int, ids: list[str], out: Path) -> Part:
    """pytest on `ids`: -v puts each outcome in the log as it comes (there even if time runs out),
    the JUnit XML (xunit1, the family that keeps `record_property`) the figures tests record."""
    flags = ["-v", "-p", "no:cacheprovider", "-o", "junit_family=xunit1", f"--junitxml={out / name}.xml"]
    return Part(name, budget, "pytest", flags + ids, tuple(ids))


def parts(out: Path) -> list[Part]:
    """What runs, in order, with its budget in seconds. FlexAttention compiles twice in a process (a
    static graph, then a dynamic one for new lengths); Inductor's cache shortens the second
    profile's compile. tests/test_gpu.py::test_bench_8b_fits_one_gpu runs the bench_8b command."""

    def bench(name: str, budget: int, *flags: str) -> Part:  # 8b: the trainer's model alone fits one GPU
        return Part(name, budget, "scripts.bench", [*flags, "--out", str(out / name)])

    return [
        pytest_part("tests_training", 80, TESTS_TRAINING, out),
        bench("bench_multiturn_flex_attention", 55, "--profile", "multiturn", *ATTENTION_BENCH, "flex_attention"),
        bench("bench_multiturn_segments", 25, "--profile", "multiturn", *ATTENTION_BENCH, "segments"),
        bench("bench_longresponse_flex_attention", 45, "--profile", "longresponse", *ATTENTION_BENCH, "flex_attention"),
        bench("bench_longresponse_segments", 20, "--profile", "longresponse", *ATTENTION_BENCH, "segments"),
        bench("bench_8b", 80, "--size", "8b", "--pairs", "4", "--steps", "2", "--modes", *BATCHINGS_8B),
        Part("liger", 35, "scripts.bench_liger", ["--out", str(out / "liger.json")]),
        pytest_part("tests_liger", 60, TESTS_LIGER, out),
    ]


def missing(found: list[Part]) -> list[str]:
    """What would not run: a module that does not import or rejects its flags, a test id that
    pytest does not collect, no `timeout` command."""
    problems = [] if shutil.which("timeout") else ["the `timeout` command (coreutils) is not on PATH"]
    for part in found:
        try:
            module = importlib.import_module(part.module)
            if hasattr(module, "parse_args"):
                module.parse_args(part.args)
        except (Exception, SystemExit) as e:  # an import that fails in any way, or argparse's exit
            problems.append(f"{part.name}: python -m {part.module} {' '.join(part.args)}: {type(e).__name__} {e}")
    ids = [i for part in found for i in part.tests]
    collect = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
        capture_output=True,
        text=True,
    )
    if collect.returncode:
        problems.append(f"pytest does not collect the GPU tests:\n{collect.stdout[-2000:]}{collect.stderr[-2000:]}")
    return problems


def run_part(part: Part, out: Path) -> dict:
    """The part as its own process under `timeout` (its children too), its output in OUT/logs."""
    log = out / "logs" / f"{part.name}.log"
    command = [sys.executable, "-m", part.module, *part.args]
    start = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.run(
            ["timeout", f"--kill-after={KILL_AFTER}", str(part.budget_s), *command], stdout=f, stderr=subprocess.STDOUT
        ).returncode
    status = "ok" if rc == 0 else "timeout" if rc in (124, 137) else "failed"
    seconds = round(time.monotonic() - start, 1)
    print(f"gpu_check: {part.name}: {status} in {seconds:.0f} s (budget {part.budget_s} s)", flush=True)
    return dict(name=part.name, status=status, rc=rc, seconds=seconds, budget_s=part.budget_s, log=str(log))


def bf16_peak(device_name: str) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s, None when it is not in the table."""
    return next((tflops * 1e12 for name, tflops in BF16_PEAK_TFLOPS.items() if name in device_name), None)


def test_outcomes(log: Path, junit: Path) -> list[dict]:
    """Each test's outcome from pytest -v's log, and the figures it recorded (`record_property`)
    from the JUnit XML when pytest finished."""
    figures = {}
    if junit.exists():
        for case in ET.parse(junit).iter("testcase"):
            figures[case.get("name")] = {p.get("name"): float(p.get("value")) for p in case.iter("property")}
    found = re.findall(r"^(\S+::(\S+)) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", log.read_text(), re.MULTILINE)
    return [dict(test=nodeid, outcome=outcome.lower(), **figures.get(name, {})) for nodeid, name, outcome in found]


def bench_rows(path: Path, peak: float | None) -> list[dict]:
    """A bench run's rows, with each mode's computed tokens/s against bare's and padded's (over the
    whole step and over forward and backward) and its MFU against `peak`."""
    rows = json.loads(path.read_text())["rows"]
    by_mode = {r["mode"]: r for r in rows}
    for r in rows:
        for ref in ("bare", "padded"):
            if ref in by_mode:
                r[f"x_{ref}"] = r["computed_tokens_per_s"] / by_mode[ref]["computed_tokens_per_s"]
                r[f"fwd_bwd_x_{ref}"] = (
                    r["forward_backward_tokens_per_s"] / by_mode[ref]["forward_backward_tokens_per_s"]
                )
        r["mfu"] = r["flops_per_s"] / peak if peak else None
    return rows


def collect(out: Path, ran: list[dict], device: dict) -> dict:
    """Every figure the parts left in OUT, by part."""
    report = {**device, "parts": ran, "tests": [], "bench": {}}
    for part in ran:
        name, path = part["name"], out / part["name"]
        if name.startswith("tests_"):
            report["tests"] += test_outcomes(Path(part["log"]), path.with_suffix(".xml"))
        elif name.startswith("bench_") and path.with_suffix(".json").exists():
            report["bench"][name] = bench_rows(path.with_suffix(".json"), device["bf16_peak_flops"])
        elif name == "liger" and (out / "liger.json").exists():
            report["liger"] = json.loads((out / "liger.json").read_text())["runs"]
    return report


def markdown(report: dict) -> str:
    peak = report["bf16_peak_flops"]
    lines = [
        f"# GPU check: {report['device']}, torch {report['torch']}",
        "",
        f"{report['memory_gib']:.0f} GiB; dense bf16 peak "
        + (f"{peak / 1e12:.0f} TFLOP/s ({PEAK_SOURCE})" if peak else "unknown for this GPU (no MFU)"),
        "",
        "| part | status | seconds | budget |",
        "|---|---|---|---|",
        *(f"| {p['name']} | {p['status']} | {p['seconds']:.0f} | {p['budget_s']} |" for p in report["parts"]),
        "",
        "## GPU-only tests",
        "",
        "| test | outcome | figures |",
        "|---|---|---|",
    ]
    for t in report["tests"]:
        figures = ", ".join(f"{k} {v:.3g}" for k, v in t.items() if k not in ("test", "outcome"))
        lines.append(f"| {t['test']} | {t['outcome']} | {figures} |")
    lines += [
        "",
        "## Batching modes and packed attentions (computed tokens/s; rewards and loss against bare's, same weights)",
        "",
        "| run | mode | attention | computed tok/s | x bare | fwd+bwd x bare | x padded | TFLOP/s | MFU "
        "| reward diff | loss diff | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in report["bench"].items():
        for r in rows:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            lines.append(
                f"| {name} | {r['mode']} | {r['attention']} | {r['computed_tokens_per_s']:.0f} "
                f"| {r.get('x_bare', float('nan')):.1%} | {r.get('fwd_bwd_x_bare', float('nan')):.1%} "
                f"| {r.get('x_padded', float('nan')):.1%} | {r['flops_per_s'] / 1e12:.1f} | {mfu} "
                f"| {r['reward_difference']:.1e} | {r['loss_difference']:.1e} | {r['peak_memory_mib'] / 1024:.1f} |"
            )
    if "liger" in report:
        lines += ["", "## Liger kernels", "", "| run | step ms | tokens/s | peak GiB |", "|---|---|---|---|"]
        for r in report["liger"]:
            lines.append(f"| {r['run']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_memory_gib']:.2f} |")
    lines += ["", "Logs: `logs/<part>.log`; each bench run's own table: `<part>.md`."]
    return "\n".join(lines) + "\n"


def run_all(found: list[Part], out: Path, device: dict) -> dict:
    """Run the parts in turn and write the report after each: a run cut short still leaves the
    figures of the parts it finished."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    ran = []
    for part in found:
        ran.append(run_part(part, out))
        report = collect(out, ran, device)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        (out / "report.md").write_text(markdown(report))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", default="gpu_check", help="folder of report.md, report.json, logs and each part's files"
    )
    out = Path(parser.parse_args().out).resolve()
    found = parts(out)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here, so nothing runs; checking that every part's command exists")
        if problems := missing(found):
            raise SystemExit("gpu_check: error: " + "\ngpu_check: error: ".join(problems))
        for part in found:
            print(f"  {part.name} ({part.budget_s} s): python -m {part.module} {' '.join(part.args)}")
        print(f"gpu_check: all {len(found)} parts are there ({sum(p.budget_s for p in found)} s of budgets)")
        return
    name = torch.cuda.get_device_name()
    device = dict(
        device=name,
        torch=torch.__version__,
        memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
        bf16_peak_flops=bf16_peak(name),
        peak_source=PEAK_SOURCE,
    )
    run_all(found, out, device)
    print(f"gpu_check: wrote {out / 'report.md'} and {out / 'report.json'}")


if __name__ == "__main__":
    main()
