"""scripts/gpu_check: without any GPU it checks every command it would run and exits 0; a GPU that
nvidia-smi lists and torch cannot see exits 1; a dry run prints the install; every `gpu`-marked test
is in one part; parts run in turn under their budgets (a failing or slow one is recorded, the next
runs, the exit status says so), and the report's figures are this run's own. And the suite on a GPU
machine: CUDA hidden from the start of the session, module-scoped fixtures included."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from scripts import gpu_check
from scripts.gpu_check import Part
from tests.conftest import ROOT, run_minrm

NO_DRIVER = "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9"
ONE_GPU = "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0f1e2d3c)'"


def gpu_check_sh(tmp_path, nvidia_smi: str | None, *flags: str) -> subprocess.CompletedProcess:
    """`bash scripts/gpu_check.sh` with CUDA hidden from torch and, when given, a fake `nvidia-smi` first on PATH."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    if nvidia_smi is not None:
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "nvidia-smi").write_text(f"#!/bin/sh\n{nvidia_smi}\n")
        (tmp_path / "bin" / "nvidia-smi").chmod(0o755)
        env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
    cmd = ["bash", "scripts/gpu_check.sh", "--out", str(tmp_path / "out"), "--wheels", str(tmp_path / "wheels"), *flags]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_without_a_gpu_every_part_is_checked(tmp_path):
    result = gpu_check_sh(tmp_path, NO_DRIVER)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"gpu_check: torch {torch.__version__}, cuda {torch.version.cuda}, transformers " in result.stdout
    assert ", gpu none\n" in result.stdout and "no GPU here, so nothing runs" in result.stdout
    found = gpu_check.parts(tmp_path / "out")
    for part in found:
        assert f"  {part.name} ({part.budget_s} s): python -m {part.module} " in result.stdout
    worst = gpu_check.INSTALL_BUDGET_S + sum(part.budget_s + gpu_check.KILL_AFTER for part in found)
    assert worst <= 460  # 8 minutes less a margin for the start and the report
    assert not (tmp_path / "out").exists()  # nothing ran


def test_a_gpu_torch_cannot_see_fails(tmp_path):
    """nvidia-smi lists a GPU, torch sees none (here: CUDA hidden; there: a CPU wheel, a driver
    mismatch): an error, not a pass with nothing run."""
    result = gpu_check_sh(tmp_path, ONE_GPU)
    assert result.returncode == 1, result.stdout + result.stderr
    assert ", gpu GPU 0: NVIDIA H100 80GB HBM3" in result.stdout
    assert (
        "gpu_check: error: nvidia-smi lists 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0f1e2d3c)' but torch"
        in result.stderr
    )
    assert "sees no GPU" in result.stderr and not (tmp_path / "out").exists()


def test_a_dry_run_prints_the_install_and_every_part(tmp_path):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "liger_kernel-0.8.5-py3-none-any.whl").write_bytes(b"")
    result = gpu_check_sh(tmp_path, ONE_GPU, "--dry_run", "--site", str(tmp_path / "site"))
    assert result.returncode == 0, result.stdout + result.stderr
    install = (
        f"-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target {tmp_path / 'site'} "
    )
    assert (
        f"gpu_check: would install the wheels of {tmp_path / 'wheels'} (1 there now): {sys.executable} {install}"
        in result.stdout
    )
    assert str(tmp_path / "wheels" / "liger_kernel-0.8.5-py3-none-any.whl") in result.stdout
    assert "a dry run, so nothing runs" in result.stdout
    assert f"gpu_check: all {len(gpu_check.parts(tmp_path))} parts are there" in result.stdout
    assert not (tmp_path / "site").exists() and not (tmp_path / "out").exists()


def test_every_gpu_test_is_in_one_part(tmp_path):
    """`pytest -m gpu --collect-only` over the suite against the parts' test lists: each GPU-only test
    runs in exactly one part, and each part's pytest selects the `gpu`-marked tests alone."""
    collect = [sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"]
    listed = subprocess.run(collect, cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
    gpu_tests = [line for line in listed.splitlines() if "::" in line]
    assert len(gpu_tests) > 10
    pytest_parts = [p for p in gpu_check.parts(tmp_path) if p.module == "pytest"]
    assert all(p.args[p.args.index("-m") + 1] == "gpu" for p in pytest_parts)
    for test in gpu_tests:
        owners = [p.name for p in pytest_parts for i in p.tests if test == i or test.startswith(i + "[")]
        assert len(owners) == 1, f"{test} runs in {owners or 'no part'} (scripts/gpu_check.py TESTS_*)"


def test_missing_names_what_would_not_run(tmp_path):
    # An id that names no test of a test file of its own: pytest collects the file in a moment
    # (tests/test_gpu.py imports the suite's fixtures, torch and transformers first, for seconds).
    tests = tmp_path / "test_gpu.py"
    tests.write_text("import pytest\n\n\n@pytest.mark.gpu\ndef test_there():\n    pass\n")
    found = [
        Part("gone", 10, "scripts.no_such_bench", []),
        Part("bad_flag", 10, "scripts.bench", ["--packed_attention", "flexible"]),
        Part("bench_ok", 10, "scripts.bench", ["--size", "8b", "--out", str(tmp_path / "b")]),
        Part("tests", 10, "pytest", [], (f"{tests}::test_no_such_test",)),
    ]
    problems = "\n".join(gpu_check.missing(found))
    assert "gone: python -m scripts.no_such_bench" in problems
    assert "bad_flag: python -m scripts.bench --packed_attention flexible" in problems
    assert "bench_ok" not in problems
    assert "pytest does not collect the GPU tests" in problems and "test_no_such_test" in problems


def test_parts_run_in_turn_the_report_holds_this_runs_figures_and_the_exit_says_what_failed(
    tmp_path, monkeypatch, capsys
):
    """main() on a (pretend) GPU: each part runs under its budget, a failing or slow one is recorded and
    the next runs; a part's figures left by an earlier run are not reported; the exit status is 1."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "test_fake.py").write_text(
        "import pytest\n\n\n@pytest.mark.gpu\ndef test_passes(record_property):\n"
        "    record_property('max_eval_reward_difference', 0.0125)\n\n\n"
        "@pytest.mark.gpu\ndef test_fails():\n    assert False\n\n\n"
        "def test_not_for_the_gpu():\n    assert False\n"
    )
    rows = [  # a bench run's rows, as scripts.bench writes them
        dict(mode="bare", attention="sdpa", computed_tokens_per_s=1000.0, forward_backward_tokens_per_s=1250.0),
        dict(mode="padded", attention="sdpa", computed_tokens_per_s=950.0, forward_backward_tokens_per_s=1200.0),
        dict(
            mode="packed",
            attention="flex_attention",
            computed_tokens_per_s=1100.0,
            forward_backward_tokens_per_s=1500.0,
        ),
    ]
    for r in rows:
        r.update(flops_per_s=4e14, reward_difference=1e-3, loss_difference=1e-4, peak_memory_mib=2048.0)
    (tmp_path / "rows.json").write_text(json.dumps({"rows": rows}))
    (out / "bench_slow.json").write_text(json.dumps({"rows": rows}))  # an earlier run's figures
    (out / "bench_fake.json").write_text("an earlier run's")
    (out / "report.md").write_text("an earlier run's report")
    found = [
        gpu_check.pytest_part("tests_fake", 60, [str(tmp_path / "test_fake.py")], out),
        Part("bench_slow", 1, "timeit", ["-n", "1", "import time; time.sleep(60)"]),
        Part("broken", 30, "json.tool", [str(tmp_path / "no_such.json")]),
        Part("bench_fake", 30, "json.tool", [str(tmp_path / "rows.json"), str(out / "bench_fake.json")]),
    ]
    monkeypatch.setattr(gpu_check, "parts", lambda _: found)
    written = []  # the report's parts each time it is written
    markdown = gpu_check.markdown
    monkeypatch.setattr(gpu_check, "markdown", lambda report: written.append(len(report["parts"])) or markdown(report))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *_: SimpleNamespace(total_memory=139.8 * 2**30))
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--out", str(out), "--wheels", str(tmp_path / "no_wheels")])
    failed = r"3 of 4 parts did not pass: tests_fake \(failed\), bench_slow \(timeout\), broken \(failed\)$"
    with pytest.raises(SystemExit, match=failed):
        gpu_check.main()
    printed = capsys.readouterr().out
    assert written == [0, 1, 2, 3, 4]  # before the first part (the earlier report goes), then after each
    assert "gpu_check: no wheels in" in printed and ", gpu NVIDIA H200\n" in printed
    report = json.loads((out / "report.json").read_text())
    assert [(p["name"], p["status"]) for p in report["parts"]] == [
        ("tests_fake", "failed"),  # a test failed: pytest's exit status
        ("bench_slow", "timeout"),
        ("broken", "failed"),
        ("bench_fake", "ok"),
    ]
    assert report["parts"][1]["seconds"] < 30
    assert report["versions"]["gpu"] == "NVIDIA H200" and report["versions"]["torch"] == torch.__version__
    outcomes = {t["test"].split("::")[-1]: t for t in report["tests"]}
    assert outcomes.keys() == {"test_passes", "test_fails"}  # -m gpu: the unmarked test did not run
    assert outcomes["test_passes"] == {
        "test": outcomes["test_passes"]["test"],
        "outcome": "passed",
        "max_eval_reward_difference": 0.0125,
    }
    assert outcomes["test_fails"]["outcome"] == "failed"
    assert report["bench"].keys() == {"bench_fake"}  # bench_slow's old file was removed, not reported
    assert not (out / "bench_slow.json").exists()
    packed = report["bench"]["bench_fake"][2]
    assert packed["x_bare"] == pytest.approx(1100 / 1000) and packed["fwd_bwd_x_bare"] == pytest.approx(1500 / 1250)
    assert packed["x_padded"] == pytest.approx(1100 / 950)
    assert packed["mfu"] == pytest.approx(4e14 / 989e12)
    table = (out / "report.md").read_text()
    assert "| bench_fake | packed | flex_attention | 1100 | 110.0% | 120.0% | 115.8% | 400.0 | 40.4% |" in table


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H200", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA L40S", 362),
        ("NVIDIA L4", 121),
        ("Tesla T4", None),
    ],
)
def test_bf16_peak_by_device_name(name, tflops):
    assert gpu_check.bf16_peak(name) == (tflops * 1e12 if tflops else None)


# ----------------------------------------------------------------------------------------------
# The suite on a GPU machine: CUDA hidden for the whole session (tests/conftest.py)

SEES_CUDA = "import os, torch; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')), torch.cuda.is_available())"


@pytest.fixture(scope="module")
def cuda_seen_by_a_module_fixture() -> tuple:
    """What a module-scoped fixture (one that trains a model for the module's tests) sees: it starts
    before any function-scoped fixture."""
    started = subprocess.run([sys.executable, "-c", SEES_CUDA], capture_output=True, text=True, check=True)
    return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available(), started.stdout.split()


def test_module_scoped_fixtures_see_cuda_hidden(cuda_seen_by_a_module_fixture):
    assert cuda_seen_by_a_module_fixture == ("", False, ["''", "False"])


def test_minrm_is_not_started_with_cuda_visible_from_a_cpu_test():
    with pytest.raises(AssertionError, match="a CPU test would start minrm with CUDA_VISIBLE_DEVICES='0', not ''"):
        run_minrm(["--help"], env={"CUDA_VISIBLE_DEVICES": "0"})
