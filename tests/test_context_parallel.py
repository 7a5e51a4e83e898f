"""Context parallelism (--context_parallel_size, model/context_parallel.py) against one process.

tests/context_parallel_probe.py runs the trainer's forward and backward (`train.forward_backward`) under
`torchrun` on 4 processes, FSDP2 over all of them: in groups of C = 2 (two data-parallel groups, each of two
processes splitting the tokens) and C = 4. The reference is one process without FSDP or context parallelism,
running the same function on all the rows in one micro-batch: the reference's single-process computation of
each row's rewards, loss and metrics (SPEC §1), which context parallelism must not change.
The two-node training runs (HSDP x context parallel) and the resume on one process are in test_multinode.py.
"""

import functools
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, Gemma2Config, LlamaConfig

from minrm.checks import check_context_parallel
from minrm.config import parse_args
from minrm.data.batching import collate
from minrm.distributed import init_distributed
from minrm.model.reward import prepare
from minrm.train import forward_backward
from tests.conftest import run_minrm
from tests.context_parallel_probe import CASES, activation_bytes, case_args, count_responses, rows, wide_model
from tests.test_score import assert_rewards_are_hf, score_file

SIZES = (2, 4)  # C, each on 4 processes


@pytest.fixture(scope="module")
def probes(tiny_model_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("context")
    run_minrm([str(out), tiny_model_dir, *map(str, SIZES)], nproc=4, module="tests.context_parallel_probe")
    return {c: out / f"C{c}" for c in SIZES}


@functools.cache
def one_process(model_dir: str, batching: str, k: int, extra: tuple) -> dict:
    """The case in this process: the whole model, all the rows in one micro-batch, fp32."""
    args = case_args(model_dir, batching, {**dict(extra), "mixed_precision": None})
    model = prepare(AutoModelForSequenceClassification.from_pretrained(model_dir), args)
    all_rows = rows(k)
    inputs, prefs = collate(all_rows, model.config.pad_token_id, batching)
    stats = forward_backward(model, (inputs, prefs), args, len(all_rows), count_responses(all_rows))
    with torch.no_grad():
        rewards = model(**inputs)[prefs.index]
    return {"rewards": rewards, "stats": stats, "grads": {n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.parametrize("c", SIZES)
@pytest.mark.parametrize("name, batching, k, extra", CASES, ids=[case[0] for case in CASES])
def test_rewards_metrics_and_gradients_equal_one_process(probes, tiny_model_dir, c, name, batching, k, extra):
    got, want = torch.load(probes[c] / f"{name}.pt"), one_process(tiny_model_dir, batching, k, tuple(extra.items()))
    # bf16: the blocks compute in bf16 (8 bits of mantissa) against the fp32 reference; fp32: to 1e-5.
    tol = dict(rtol=2e-2, atol=2e-2) if extra.get("mixed_precision") == "bf16" else dict(rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got["rewards"]), want["rewards"], **tol)
    torch.testing.assert_close(got["stats"], want["stats"], **tol)  # STATS summed over the rows: loss, accuracy, ...
    assert got["grads"].keys() == want["grads"].keys()
    for name_, grad in want["grads"].items():
        torch.testing.assert_close(got["grads"][name_], grad, **tol, msg=name_)


def test_the_rows_reach_every_case_it_is_meant_to():
    """The probe's rows are what the cases say: a response given twice, and a long last response that
    leaves some of 4 processes without a sequence's last token in a packed row."""
    for k in (2, 4):
        inputs, prefs = collate(rows(k), 0, "packed")
        length = inputs["input_ids"].shape[1]
        share = -(-length // 4)
        holders = set((inputs["last_index"] // share).tolist())
        assert holders != {0, 1, 2, 3}, holders
        assert prefs.index[2, 1] == prefs.index[2, 0]  # one reward for the two identical responses


def test_activation_memory_falls_to_one_over_c(probes):
    """The bytes kept for the backward on a packed row of 8,192 tokens of a wider model (hidden 256, 8 heads):
    1/C of one process's on every process."""
    alone = activation_bytes(wide_model(), None)
    for c in SIZES:
        per_process = json.loads((probes[c] / "memory.json").read_text())
        for kept in per_process:
            assert abs(kept / alone - 1 / c) < 0.05 / c, (c, kept, alone)


def test_what_cannot_be_split_is_refused_in_one_line():
    llama = LlamaConfig(num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(SystemExit, match="context_parallel_size 3: must divide the model's 4 attention heads"):
        check_context_parallel(llama, 3, "auto")
    with pytest.raises(SystemExit, match="context_parallel_size 2: .*not --packed_attention flex_attention"):
        check_context_parallel(llama, 2, "flex_attention")
    with pytest.raises(SystemExit, match="context_parallel_size 2: gemma2 softcaps its attention logits"):
        check_context_parallel(Gemma2Config(num_attention_heads=4), 2, "auto")
    with pytest.raises(SystemExit, match="context_parallel_size: must be at least 1, got 0"):
        parse_args(["--context_parallel_size", "0"])


def test_a_group_larger_than_a_node_is_refused(group_of_one, monkeypatch):
    """One process cannot hold 1/2 of a row: refused in one line as the group forms, before any data is read."""
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(name, value)
    message = "^minrm: error: --context_parallel_size 2: must divide the 1 processes of a node$"
    with pytest.raises(SystemExit, match=message):
        init_distributed(None, 2)


def test_the_scorer_splits_rows_over_two_processes(tiny_model_dir, tmp_path):
    """`minrm.score --context_parallel_size 2` on 2 processes: every response's reward as Hugging Face's own
    forward gives it for the sequence alone."""
    data = score_file(tmp_path / "rows.jsonl")
    flags = [tiny_model_dir, "--data", data, "--chat_template_name", "tulu", "--skip_bad_rows"]
    run_minrm(flags + ["--out", str(tmp_path / "scores.jsonl"), "--context_parallel_size", "2"], nproc=2,
              module="minrm.score")  # fmt: skip
    assert_rewards_are_hf([json.loads(line) for line in open(tmp_path / "scores.jsonl")], data, tiny_model_dir)
