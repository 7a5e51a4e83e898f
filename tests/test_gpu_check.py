"""scripts/gpu_check: without a GPU it checks every command it would run and exits 0; it names what
would not run; parts run in turn under their budgets (a failing or slow one is recorded and the next
runs), and the report's figures are the parts' own, recomputed here."""

import json
import os
import subprocess
import sys

import pytest

from scripts import gpu_check
from scripts.gpu_check import Part
from tests.conftest import ROOT


def test_without_a_gpu_every_part_is_checked(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    cmd = ["bash", "scripts/gpu_check.sh", "--out", str(tmp_path / "out")]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no CUDA GPU here" in result.stdout
    found = gpu_check.parts(tmp_path / "out")
    for part in found:
        assert f"  {part.name} ({part.budget_s} s): python -m {part.module} " in result.stdout
    worst = sum(part.budget_s + gpu_check.KILL_AFTER for part in found)
    assert worst <= 450  # 8 minutes less a margin for the start and the report
    assert not (tmp_path / "out").exists()  # nothing ran


def test_missing_names_what_would_not_run(tmp_path):
    found = [
        Part("gone", 10, "scripts.no_such_bench", []),
        Part("bad_flag", 10, "scripts.bench", ["--packed_attention", "flexible"]),
        Part("bench_ok", 10, "scripts.bench", ["--size", "8b", "--out", str(tmp_path / "b")]),
        Part("tests", 10, "pytest", [], ("tests/test_gpu.py::test_no_such_test",)),
    ]
    problems = "\n".join(gpu_check.missing(found))
    assert "gone: python -m scripts.no_such_bench" in problems
    assert "bad_flag: python -m scripts.bench --packed_attention flexible" in problems
    assert "bench_ok" not in problems
    assert "pytest does not collect the GPU tests" in problems and "test_no_such_test" in problems


def test_parts_run_in_turn_and_the_report_holds_their_figures(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "test_fake.py").write_text(
        "def test_passes(record_property):\n    record_property('max_eval_reward_difference', 0.0125)\n\n\n"
        "def test_fails():\n    assert False\n"
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
    (out / "bench_fake.json").write_text(json.dumps({"rows": rows}))
    found = [
        gpu_check.pytest_part("tests_fake", 60, [str(tmp_path / "test_fake.py")], out),
        Part("slow", 1, "timeit", ["-n", "1", "import time; time.sleep(60)"]),
        Part("broken", 30, "json.tool", [str(tmp_path / "no_such.json")]),
        Part("bench_fake", 30, "json.tool", [str(out / "bench_fake.json")]),  # its figures are there already
    ]
    device = dict(device="NVIDIA H200", torch="x", memory_gib=139.8, bf16_peak_flops=gpu_check.bf16_peak("NVIDIA H200"))
    report = gpu_check.run_all(found, out, device)
    assert json.loads((out / "report.json").read_text()) == report
    assert [(p["name"], p["status"]) for p in report["parts"]] == [
        ("tests_fake", "failed"),  # a test failed: pytest's exit status
        ("slow", "timeout"),
        ("broken", "failed"),
        ("bench_fake", "ok"),
    ]
    assert report["parts"][1]["seconds"] < 30
    outcomes = {t["test"].split("::")[-1]: t for t in report["tests"]}
    assert outcomes["test_passes"] == {
        "test": outcomes["test_passes"]["test"],
        "outcome": "passed",
        "max_eval_reward_difference": 0.0125,
    }
    assert outcomes["test_fails"]["outcome"] == "failed"
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
