"""GPU-only: the bf16 training path on a real CUDA device (`torchrun --nproc_per_node 1`, NCCL,
FSDP2, Liger on by default, packed rows through FlexAttention), against the same run in fp32 on the
same GPU; the 8B benchmark on one GPU (scripts/gpu_check.py reports the figures both record). The CPU suite runs the same policy on gloo
(tests/test_train.py::test_bf16_two_processes_close_to_fp32); this one checks the CUDA kernels.
Skips without CUDA."""

import json

import pytest
import torch

from scripts import bench, gpu_check
from tests.conftest import read_metrics, run_minrm, save_tiny_llama
from tests.test_train import GA, PDBS, STEPS, assert_close_to_fp32, common_flags

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def flex_model_dir(tmp_path_factory, tokenizer) -> str:
    """The CPU tests' tiny Llama with heads of 16 dims, the fewest FlexAttention's GPU kernel takes."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama16"), tokenizer, head_dim=16)


def eval_rewards(run_dir) -> torch.Tensor:
    rows = [json.loads(line) for line in open(run_dir / "eval_samples.jsonl")]
    return torch.tensor([[r["chosen_reward"], r["rejected_reward"]] for r in rows], dtype=torch.float64)


def test_bf16_rewards_close_to_fp32_on_gpu(flex_model_dir, pairs_file, eval_file, tmp_path, record_property):
    runs = {}
    for precision in ("bf16", "no"):
        flags = common_flags(flex_model_dir, pairs_file, eval_file, tmp_path, precision)
        flags += ["--per_device_train_batch_size", str(PDBS), "--gradient_accumulation_steps", str(GA)]
        result = run_minrm(flags + ["--mixed_precision", precision], torchrun=True)
        assert "packed rows run attention flex_attention" in result.stdout
        assert "liger: LlamaForSequenceClassification: " in result.stdout
        runs[precision] = tmp_path / precision
    bf16, fp32 = read_metrics(runs["bf16"]), read_metrics(runs["no"])
    assert len(bf16) == len(fp32) == STEPS + 1
    # The tolerances of the CPU test (bf16 rounding, then AdamW's sign-driven first update).
    assert_close_to_fp32(fp32, bf16, runs["no"], eval_file, 5e-2)
    ours, theirs = eval_rewards(runs["bf16"]), eval_rewards(runs["no"])
    record_property("max_eval_reward_difference", (ours - theirs).abs().max().item())  # for scripts/gpu_check.py
    torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-2)
    assert (ours - theirs).abs().max() > 1e-5  # bf16 did run
    as_fp32 = ours.float()  # the score head runs in fp32: rewards are not bf16 numbers
    assert not (as_fp32.bfloat16().float() == as_fp32).any()


def test_bench_8b_fits_one_gpu(tmp_path, record_property):
    """`python -m scripts.bench --size 8b` on one 80 GB GPU (bf16 weights, a stateless step): every
    mode runs, its computed tokens are those counted here from the same synthetic pairs, and its
    peak memory stays below the GPU's."""
    memory = torch.cuda.get_device_properties(0).total_memory
    if memory < 70 * 2**30:
        pytest.skip("needs an 80 GB GPU")
    out = tmp_path / "bench8b"
    flags = ["--size", "8b", "--pairs", "4", "--steps", "2", "--seed", "0", "--out", str(out), "--modes"]
    flags += ["padded", "packed", "shared_prefix"]  # bare's plain second model would not fit beside the trainer's
    run_minrm(flags, module="scripts.bench", timeout=1200)
    rows = {r["mode"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    pairs = bench.synthetic_pairs("multiturn", 4 * 3, 0)[4:]  # step 0 warms up
    steps = [pairs[:4], pairs[4:]]
    lengths = [[(len(p["prompt"]), len(p["chosen"]), len(p["rejected"])) for p in s] for s in steps]
    computed = {
        "padded": sum(2 * len(s) * max(max(c, r) for _, c, r in s) for s in lengths),
        "packed": sum(c + r for s in lengths for _, c, r in s),
        "shared_prefix": sum(c + r - n for s in lengths for n, c, r in s),
    }
    assert rows.keys() == computed.keys()
    peak = gpu_check.bf16_peak(torch.cuda.get_device_name())
    for mode, row in rows.items():
        record_property(f"{mode}_computed_tokens_per_s", row["computed_tokens_per_s"])  # for scripts/gpu_check.py
        record_property(f"{mode}_tflops_per_s", row["flops_per_s"] / 1e12)
        record_property(f"{mode}_mfu", row["flops_per_s"] / peak if peak else float("nan"))
        record_property(f"{mode}_peak_memory_gib", row["peak_memory_mib"] / 1024)
    for mode, row in rows.items():
        assert row["computed_tokens_per_s"] * row["seconds"] == pytest.approx(computed[mode]), mode
        assert 0 < row["peak_memory_mib"] < memory / 2**20, mode
