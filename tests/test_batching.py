"""Packed and shared-prefix batches against padded ones: the same rewards, loss and gradients on one
micro-batch, no attention across packed sequences, and the same training metrics through the
trainer (one process and two under FSDP)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from minrm.data import collate, shared_prefix_length
from minrm.model import reward_forward
from tests.conftest import read_metrics, run_minrm, tiny_llama_config

PAD, VOCAB = 0, 100
MODES = ["packed", "shared_prefix"]


def pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict:
    return {"prompt": prompt, "chosen": prompt + chosen, "rejected": prompt + rejected}


def varied_pairs() -> list[dict]:
    """Prompts of several turns and lengths, a pair whose responses differ in length by 10x, a pair
    without a prompt, and one whose prompt ids are not a prefix of its sequences (falls back)."""
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    turn = [5, 6]  # stands for the template's role markers, repeated at each turn
    pairs = [
        pair(turn + ids(7) + turn + ids(9) + turn + ids(4) + turn, ids(6), ids(11)),
        pair(turn + ids(3) + turn, ids(40), ids(4)),  # 10x
        pair([], ids(8), ids(13)),
        pair(turn + ids(21) + turn, ids(2), ids(1)),
    ]
    broken = pair(ids(6), ids(5), ids(7))
    broken["prompt"] = ids(6)  # not a prefix: shared_prefix lays out both full sequences
    return pairs + [broken]


def tiny_model():
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_llama_config(VOCAB))
    model.config.pad_token_id = PAD
    return model


def rewards_loss_grads(model, pairs, batching):
    model.zero_grad()
    rewards = reward_forward(model, **collate(pairs, PAD, batching))
    chosen, rejected = rewards.chunk(2)
    loss = -F.logsigmoid(chosen - rejected).mean()
    loss.backward()
    return rewards.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_shared_prefix_length_checks_the_prefix():
    pairs = varied_pairs()
    assert [shared_prefix_length(p) for p in pairs] == [len(p["prompt"]) for p in pairs[:-1]] + [0]


@pytest.mark.parametrize("batching", MODES)
def test_rewards_loss_and_gradients_match_padded(batching):
    model, pairs = tiny_model(), varied_pairs()
    r0, l0, g0 = rewards_loss_grads(model, pairs, "padded")
    r1, l1, g1 = rewards_loss_grads(model, pairs, batching)
    assert collate(pairs, PAD, batching)["input_ids"].shape[0] == 1  # one row, no padding
    torch.testing.assert_close(r1, r0, rtol=0, atol=1e-5)
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("batching", MODES)
def test_no_attention_across_packed_sequences(batching):
    """Change every token a sequence must not see; its reward must not move (and the changed ones
    must, so the check has teeth)."""
    model, pairs = tiny_model().eval(), varied_pairs()
    with torch.no_grad():
        before = reward_forward(model, **collate(pairs, PAD, batching))
        edited = [dict(p) for p in pairs]
        # Pair 0's chosen response is new: in shared_prefix its rejected response sits right after it.
        n = len(pairs[0]["prompt"])
        edited[0]["chosen"] = pairs[0]["prompt"] + [t % (VOCAB - 1) + 1 for t in pairs[0]["chosen"][n:]]
        after = reward_forward(model, **collate(edited, PAD, batching))
    assert abs(after[0] - before[0]) > 1e-4  # the edited sequence's own reward changes
    # No other one does, pair 0's rejected response (packed right after the chosen one) included.
    torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Through the trainer: 5 optimizer steps with eval, metrics equal to padded's


def run_flags(model_dir, pairs_file, eval_file, out, name, batching, pdbs):
    return [
        "--model_name_or_path", model_dir,
        "--dataset_mixer_list", pairs_file, "1.0",
        "--dataset_mixer_eval_list", eval_file, "1.0",
        "--dataset_mixer_eval_list_splits", "train",
        "--init_score_head", "False",
        "--learning_rate", "1e-3",
        "--seed", "3",
        "--total_episodes", str(5 * 8),
        "--per_device_train_batch_size", str(pdbs),
        "--gradient_accumulation_steps", "2",
        "--per_device_eval_batch_size", "3",
        "--num_evals", "1",
        "--batching", batching,
        "--output_dir", str(out),
        "--run_name", name,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def padded_run(tiny_model_dir, pairs_file, eval_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("batching")
    run_minrm(run_flags(tiny_model_dir, pairs_file, eval_file, out, "padded", "padded", 4))
    return read_metrics(out / "padded")


@pytest.mark.parametrize("nproc", [1, 2], ids=["1proc", "fsdp2proc"])
@pytest.mark.parametrize("batching", MODES)
def test_training_metrics_match_padded(padded_run, batching, nproc, tiny_model_dir, pairs_file, eval_file, tmp_path):
    # 2 processes x 2 pairs = 1 process x 4 pairs: the same global batches.
    run_minrm(run_flags(tiny_model_dir, pairs_file, eval_file, tmp_path, "run", batching, 4 // nproc), nproc=nproc)
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == len(padded_run) == 6  # 5 steps and one eval
    for a, b in zip(padded_run, rows):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
