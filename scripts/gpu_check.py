"""Everything only a GPU can show, in one command of at most 8 minutes on one H100/H200, run with the
lent machine's own `python3` (the one that holds its CUDA torch):

    bash scripts/gpu_wheels.sh                 # here, first: the wheels the machine's image lacks
    bash scripts/gpu_check.sh                  # there (carry .gpu_wheels): gpu_check/report.md, report.json
    bash scripts/gpu_check.sh --dry_run        # anywhere: the install command and every part's command

It installs the carried wheels (`--wheels`, made by scripts/gpu_wheels.sh) into `--site`, first on the
path of every process it starts, prints the versions it runs on, then runs the parts (`parts`) in the
order of what they tell: a warm-up (the GPU-only attention tests: CUDA is seen, FlexAttention's
kernels compile, forward and backward, and land in Inductor's cache), ONE short bf16 training run of
the trainer (`torchrun --nproc_per_node 1 -m minrm.train`: FSDP2, FlexAttention, Liger) against the
same run in fp32, Liger's kernel tests, then the benchmarks (`scripts.bench`: FlexAttention vs segment
attention vs padded on two profiles; `scripts.bench_liger`; the 8B bench test). Each part is its own
process under `timeout` with its own budget; the install's and the parts' budgets, each part's with
its `KILL_AFTER`, add up to 7.6 minutes. A part's files are removed before it starts and the report
is rewritten when it ends: a run cut short reports the parts it finished, and nothing older.

Exit status: 0 when every part passed, or when there is no GPU at all (no `nvidia-smi`, or it lists
none): then nothing runs, every part's command is checked (its module imports and takes its flags,
its test ids are collected), and the status is 1 if one is not there. 1 when a part failed or ran
out of time, and when `nvidia-smi` lists a GPU that torch does not see (a CPU build of torch, a
driver it cannot use).
"""

import argparse
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch

from scripts import gpu_wheels

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

# The `gpu`-marked tests, each in one part (tests/test_gpu_check.py checks them against pytest -m gpu).
TESTS_WARMUP = [
    "tests/test_distributed.py::test_gpu_tests_see_the_gpu",
    "tests/test_batching.py::test_flex_attention_gradients_match_padded_on_gpu",
    "tests/test_packed_attention.py::test_segment_attention_with_grouped_heads_matches_the_dense_mask",
]
TESTS_TRAINING = ["tests/test_gpu.py::test_bf16_rewards_close_to_fp32_on_gpu"]
TESTS_LIGER = [
    "tests/test_liger.py::test_rewards_and_grads_match_on_gpu",
    "tests/test_liger.py::test_training_matches_on_gpu",
]
TESTS_8B = ["tests/test_gpu.py::test_bench_8b_fits_one_gpu"]
INSTALL_BUDGET_S = 20  # pip installs about 24 MiB of wheels from the working tree
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


def pytest_part(name: str, budget: int, ids: list[str], out: Path) -> Part:
    """pytest on the `gpu`-marked tests of `ids`: -v puts each outcome in the log as it comes (there
    even if time runs out), the JUnit XML (xunit1, the family that keeps `record_property`) the
    figures tests record."""
    flags = ["-v", "-m", "gpu", "-p", "no:cacheprovider", "-o", "junit_family=xunit1"]
    return Part(name, budget, "pytest", [*flags, f"--junitxml={out / name}.xml", *ids], tuple(ids))


def parts(out: Path) -> list[Part]:
    """What runs, in order, with its budget in seconds. Nothing has timed them on a GPU yet: the
    budgets are estimates, and the 8B bench test runs last, the likeliest to run out. What the warm-up
    compiles (Inductor's FX-graph and AOTAutograd caches, on by default in torch 2.11, in
    /tmp/torchinductor_<user>) serves a later part wherever the graph is the same (dtype, head size,
    length class): the tiny models' FlexAttention; the 100M bench compiles its own."""

    def bench(name: str, budget: int, *flags: str) -> Part:
        return Part(name, budget, "scripts.bench", [*flags, "--out", str(out / name)])

    return [
        pytest_part("tests_warmup", 60, TESTS_WARMUP, out),
        pytest_part("tests_training", 80, TESTS_TRAINING, out),
        pytest_part("tests_liger", 50, TESTS_LIGER, out),
        bench("bench_multiturn_flex_attention", 40, "--profile", "multiturn", *ATTENTION_BENCH, "flex_attention"),
        bench("bench_multiturn_segments", 20, "--profile", "multiturn", *ATTENTION_BENCH, "segments"),
        bench("bench_longresponse_flex_attention", 35, "--profile", "longresponse", *ATTENTION_BENCH, "flex_attention"),
        bench("bench_longresponse_segments", 15, "--profile", "longresponse", *ATTENTION_BENCH, "segments"),
        Part("liger", 25, "scripts.bench_liger", ["--out", str(out / "liger.json")]),
        pytest_part("tests_8b", 65, TESTS_8B, out),
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
    """The part as its own process under `timeout` (its children too), its output in OUT/logs, its
    files from an earlier run (OUT/<name>.json, .md, .xml) removed first: a part that writes none
    reports none."""
    for old in out.glob(f"{part.name}.*"):
        old.unlink()
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
        ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items()),
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
    """Run the parts in turn and write the report first (what it runs on, no part yet: an earlier
    run's report goes) and after each part: a run cut short still leaves the figures of the parts
    it finished."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    ran = []

    def write() -> dict:
        report = collect(out, ran, device)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        (out / "report.md").write_text(markdown(report))
        return report

    report = write()
    for part in found:
        ran.append(run_part(part, out))
        report = write()
    return report


def nvidia_smi_gpus() -> list[str]:
    """The GPUs `nvidia-smi -L` lists: none when it is not there or fails (no driver, no device)."""
    if not shutil.which("nvidia-smi"):
        return []
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    return [line for line in listed.stdout.splitlines() if line.startswith("GPU ")] if listed.returncode == 0 else []


def install(wheels: Path, site: Path, dry_run: bool) -> None:
    """pip-install the carried wheels into `site` (no index: nothing can be fetched there), first on
    the path of this process and of every process it starts; then warn of any requirement the
    machine's own packages do not meet."""
    found = sorted(wheels.glob("*.whl"))
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    command += ["--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found or [wheels / "*.whl"])]
    if dry_run:
        print(f"gpu_check: would install the wheels of {wheels} ({len(found)} there now): {' '.join(command)}")
        return
    if not found:
        print(f"gpu_check: no wheels in {wheels} (bash scripts/gpu_wheels.sh makes them): running on what is installed")
        return
    rc = subprocess.run(["timeout", str(INSTALL_BUDGET_S), *command]).returncode
    if rc:
        raise SystemExit(f"gpu_check: error: installing the {len(found)} wheels of {wheels} into {site} failed ({rc})")
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    for line in gpu_wheels.check_installed(site):
        print(f"gpu_check: warning: {line}")


def versions(gpus: list[str]) -> dict:
    """What the check runs on: torch and its CUDA, the packages minrm swaps or loads, the GPU."""
    found = dict(torch=torch.__version__, cuda=torch.version.cuda)
    for name in ("transformers", "liger-kernel", "datasets", "huggingface-hub"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else (gpus or ["none"])[0]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", default="gpu_check", help="folder of report.md, report.json, logs and each part's files"
    )
    parser.add_argument("--wheels", default=str(gpu_wheels.DEFAULT_DIR), help="the wheels to install first")
    parser.add_argument("--site", default="/tmp/minrm_gpu_site", help="where they are installed")
    parser.add_argument("--dry_run", action="store_true", help="install and run nothing; print and check the commands")
    args = parser.parse_args()
    out, cuda = Path(args.out).resolve(), torch.cuda.is_available()
    gpus = [] if cuda else nvidia_smi_gpus()
    if cuda or args.dry_run:
        install(Path(args.wheels).resolve(), Path(args.site), args.dry_run)
    seen = versions(gpus)
    print("gpu_check: " + ", ".join(f"{k} {v}" for k, v in seen.items()), flush=True)
    found = parts(out)
    if not cuda and gpus and not args.dry_run:
        raise SystemExit(
            f"gpu_check: error: nvidia-smi lists {gpus[0]!r} but torch {torch.__version__} (CUDA {torch.version.cuda}) "
            f"sees no GPU: a CPU build of torch, or a driver it cannot use; run with the python that holds CUDA torch"
        )
    if not cuda or args.dry_run:
        why = "a dry run" if args.dry_run else "no GPU here"
        print(f"gpu_check: {why}, so nothing runs; checking that every part's command exists")
        if problems := missing(found):
            raise SystemExit("gpu_check: error: " + "\ngpu_check: error: ".join(problems))
        for part in found:
            print(f"  {part.name} ({part.budget_s} s): python -m {part.module} {' '.join(part.args)}")
        print(f"gpu_check: all {len(found)} parts are there ({sum(p.budget_s for p in found)} s of budgets)")
        return
    device = dict(
        device=seen["gpu"],
        versions=seen,
        torch=torch.__version__,
        memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
        bf16_peak_flops=bf16_peak(seen["gpu"]),
        peak_source=PEAK_SOURCE,
    )
    report = run_all(found, out, device)
    print(f"gpu_check: wrote {out / 'report.md'} and {out / 'report.json'}")
    if failed := [p for p in report["parts"] if p["status"] != "ok"]:
        listed = ", ".join(f"{p['name']} ({p['status']})" for p in failed)
        raise SystemExit(f"gpu_check: {len(failed)} of {len(found)} parts did not pass: {listed}")


if __name__ == "__main__":
    main()
