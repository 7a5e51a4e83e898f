"""Packed and shared-prefix batches against padded ones: the same rewards, loss and gradients on one
micro-batch through each attention that runs packed rows, no attention across packed sequences,
token-budget micro-batches, and the same training metrics through the trainer (one process and two
under FSDP)."""

import re

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, Gemma2Config, GptOssConfig, MistralConfig, Qwen2Config

from minrm.batching import check_token_budget, collate, device_batch, micro_batches, shared_prefix_length, split_to
from minrm.config import parse_args
from minrm.model import reward_forward
from minrm.packed_attention import SEGMENTS, check_packing, packing_problem, use_packed_attention
from tests.conftest import read_metrics, run_minrm, tiny_llama_config

PAD, VOCAB = 0, 100
MODES = ["packed", "shared_prefix"]
# How packed rows get their attention: SDPA per sequence span (the default off GPU), or one dense
# L x L mask through the model's own SDPA (the fallback for models that cannot swap attention).
ATTENTIONS = ["segments", "mask"]


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


def tiny_model(attention: str | None = None, config=None):
    """The same weights every call; `attention` (a --packed_attention choice) switches the
    attention as load_model does for the packed modes."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config or tiny_llama_config(VOCAB))
    model.config.pad_token_id = PAD
    if attention:
        use_packed_attention(model, attention)
        assert model.config._attn_implementation == {"segments": SEGMENTS, "mask": "sdpa"}[attention]
    return model


def rewards_loss_grads(model, pairs, batching, device="cpu"):
    model.zero_grad()
    rewards = reward_forward(model, **device_batch(pairs, PAD, batching, torch.device(device)))
    chosen, rejected = rewards.chunk(2)
    loss = -F.logsigmoid(chosen - rejected).mean()
    loss.backward()
    return rewards.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_shared_prefix_length_checks_the_prefix():
    pairs = varied_pairs()
    assert [shared_prefix_length(p) for p in pairs] == [len(p["prompt"]) for p in pairs[:-1]] + [0]


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("batching", MODES)
def test_rewards_loss_and_gradients_match_padded(batching, attention):
    pairs = varied_pairs()
    r0, l0, g0 = rewards_loss_grads(tiny_model(), pairs, "padded")
    r1, l1, g1 = rewards_loss_grads(tiny_model(attention), pairs, batching)
    assert collate(pairs, PAD, batching)["input_ids"].shape[0] == 1  # one row, no padding
    torch.testing.assert_close(r1, r0, rtol=0, atol=1e-5)
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("batching", MODES)
def test_no_attention_across_packed_sequences(batching, attention):
    """Change every token a sequence must not see; its reward must not move (and the changed ones
    must, so the check has teeth)."""
    model, pairs = tiny_model(attention).eval(), varied_pairs()
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


def windowed_config(arch: str, window: int | None):
    """Every layer slides (Mistral), or only the second of two does (Qwen2's max_window_layers)."""
    base = tiny_llama_config(VOCAB).to_dict()
    if arch == "mistral":
        return MistralConfig(**{**base, "model_type": "mistral", "sliding_window": window})
    return Qwen2Config(
        **{**base, "model_type": "qwen2", "use_sliding_window": window is not None, "sliding_window": window or 256},
        max_window_layers=1,
    )


@pytest.mark.parametrize(
    ("arch", "attention"), [("mistral", "segments"), ("mistral", "mask"), ("qwen2_mixed", "segments")]
)
@pytest.mark.parametrize("batching", MODES)
def test_sliding_window_model_matches_padded(batching, arch, attention):
    """An 8-token window (shorter than most sequences here): packed rows must apply it as the
    padded forward does, positions counted from each sequence's start, and only in the layers that
    slide."""
    pairs = varied_pairs()
    r0, l0, g0 = rewards_loss_grads(tiny_model(config=windowed_config(arch, 8)), pairs, "padded")
    unwindowed, _, _ = rewards_loss_grads(tiny_model(config=windowed_config(arch, None)), pairs, "padded")
    assert (unwindowed - r0).abs().max() > 1e-3  # the window changes the rewards: the test has teeth
    r1, l1, g1 = rewards_loss_grads(tiny_model(attention, windowed_config(arch, 8)), pairs, batching)
    torch.testing.assert_close(r1, r0, rtol=0, atol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=1e-5, msg=name)


def test_one_mask_for_mixed_window_layers_refused():
    with pytest.raises(SystemExit, match="mixes sliding-window and full attention layers"):
        use_packed_attention(tiny_model(config=windowed_config("qwen2_mixed", 8)), "mask")


@pytest.mark.parametrize("window", [None, 8])
def test_flex_attention_block_mask_matches_padded(window):
    """The GPU path's block mask (tiles from the spans), run forward-only on CPU (FlexAttention has
    no CPU backward), with and without a sliding window."""
    pairs, config = varied_pairs(), windowed_config("mistral", window)
    with torch.no_grad():
        r0 = reward_forward(tiny_model(config=config), **collate(pairs, PAD, "padded"))
        model = tiny_model(config=config)
        use_packed_attention(model, "flex_attention")
        assert model.config._attn_implementation == "flex_attention"
        for batching in MODES:
            r1 = reward_forward(model, **collate(pairs, PAD, batching))
            torch.testing.assert_close(r1, r0, rtol=0, atol=1e-5, msg=batching)


def test_auto_takes_flex_attention_on_gpu_only_where_its_kernel_runs(tmp_path, capsys, monkeypatch):
    """Inductor's CUDA FlexAttention refuses heads of fewer than 16 dims (its CPU kernel runs them):
    on GPU, `auto` runs segment attention there and says why, and an explicit flex_attention is
    refused, at start from the config. The choice is made from the config: `cuda=True` here on CPU."""
    model = tiny_model()  # hidden 32, 4 heads: 8 dims
    use_packed_attention(model, "auto", cuda=True)
    assert model.config._attn_implementation == SEGMENTS
    why = "llama has attention heads of 8 dims; FlexAttention's GPU kernel needs 16 or more"
    assert f"packed rows run attention {SEGMENTS} (not flex_attention: {why})" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=f"--packed_attention flex_attention: {why}; use auto or segments"):
        use_packed_attention(tiny_model(), "flex_attention", cuda=True)
    use_packed_attention(model, "flex_attention", cuda=False)  # on CPU it runs
    assert model.config._attn_implementation == "flex_attention"

    sixteen = tiny_llama_config(VOCAB, head_dim=16)
    model = tiny_model(config=sixteen)
    use_packed_attention(model, "auto", cuda=True)
    assert model.config._attn_implementation == "flex_attention"

    tiny_llama_config(VOCAB).save_pretrained(tmp_path / "eight")
    sixteen.save_pretrained(tmp_path / "sixteen")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # check_packing asks torch
    flags = ["--packed_attention", "flex_attention", "--model_name_or_path"]
    with pytest.raises(SystemExit, match=why):
        check_packing(parse_args([*flags, str(tmp_path / "eight")]))
    check_packing(parse_args([*flags, str(tmp_path / "sixteen")]))


@pytest.mark.gpu  # FlexAttention's backward needs a GPU
@pytest.mark.parametrize("batching", MODES)
def test_flex_attention_gradients_match_padded_on_gpu(batching):
    """The `auto` GPU path end to end in fp32: rewards, loss and every gradient against padded (heads
    of 16 dims, the fewest FlexAttention's GPU kernel takes)."""
    pairs, cuda, config = varied_pairs(), torch.device("cuda"), tiny_llama_config(VOCAB, head_dim=16)
    r0, l0, g0 = rewards_loss_grads(tiny_model(config=config).to(cuda), pairs, "padded", cuda)
    model = tiny_model(config=config).to(cuda)
    use_packed_attention(model, "auto", cuda=True)
    assert model.config._attn_implementation == "flex_attention"
    r1, l1, g1 = rewards_loss_grads(model, pairs, batching, cuda)
    torch.testing.assert_close(r1, r0, rtol=0, atol=1e-4)
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-4)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=1e-4, msg=name)


def test_models_packing_cannot_run_are_refused_before_the_data(tmp_path):
    """Gemma 2 (logit softcapping) and gpt-oss (attention sinks): refused from the config alone, at
    start, unless --batching padded."""
    gemma2 = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_labels=1)  # fmt: skip
    gemma2.save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match="--batching shared_prefix: gemma2 softcaps its attention logits"):
        check_packing(parse_args(["--model_name_or_path", str(tmp_path)]))
    check_packing(parse_args(["--model_name_or_path", str(tmp_path), "--batching", "padded"]))
    with pytest.raises(SystemExit, match="gemma2 softcaps.*--batching padded"):
        use_packed_attention(AutoModelForSequenceClassification.from_config(gemma2))
    assert "attention sinks" in packing_problem(GptOssConfig())
    assert packing_problem(tiny_llama_config(VOCAB)) is None


# ----------------------------------------------------------------------------------------------
# Token budget: micro-batches cut by computed tokens


@pytest.mark.parametrize("batching", ["padded", *MODES])
def test_micro_batches_respect_the_token_budget(batching):
    g = torch.Generator().manual_seed(1)
    pairs = [
        pair(list(range(1, 1 + int(n))), [7] * int(c), [8] * int(r))
        for n, c, r in torch.randint(1, 40, (50, 3), generator=g)
    ]
    budget = 300
    chunks = micro_batches(pairs, 4, budget, batching)
    assert [p for c in chunks for p in c] == pairs  # every pair once, in order
    computed = [collate(c, PAD, batching)["input_ids"].numel() for c in chunks]
    assert max(computed) <= budget
    # Greedy: the next chunk's first pair would not have fit in the chunk before it.
    for a, b in zip(chunks, chunks[1:]):
        assert collate(a + b[:1], PAD, batching)["input_ids"].numel() > budget
    assert micro_batches(pairs, 4, None, batching) == [pairs[i : i + 4] for i in range(0, 50, 4)]
    # Cut into more, as a rank with fewer micro-batches than another must be.
    more = split_to(chunks, len(chunks) + 3)
    assert len(more) == len(chunks) + 3 and [p for c in more for p in c] == pairs
    # Fewer pairs than micro-batches (an eval rank near the end): the rest are empty, run weightless.
    assert split_to([pairs[:1]], 3) == [pairs[:1], [], []]


def test_token_budget_below_the_longest_pair_is_refused():
    ds = datasets.Dataset.from_list([pair([1, 2], [3] * 5, [4] * 9), pair([1], [3] * 30, [4])])
    check_token_budget(ds, 35, "packed", "training")  # 32 + 2 tokens: fits
    with pytest.raises(SystemExit, match="--max_tokens_per_batch 35 is below the 62 tokens that training pair 1"):
        check_token_budget(ds, 35, "padded", "training")  # 2 x 31


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
        "--no_plot",  # ten runs compared by their metrics: their pictures would only cost time
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
    flags = run_flags(tiny_model_dir, pairs_file, eval_file, tmp_path, "run", batching, 4 // nproc)
    log = run_minrm(flags, nproc=nproc).stdout
    assert log.count("model: packed rows run attention minrm_segments") == 1, log  # rank 0 loads twice, says it once
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == len(padded_run) == 6  # 5 steps and one eval
    for a, b in zip(padded_run, rows):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=1e-5), key


@pytest.mark.parametrize(
    ("batching", "nproc"),
    [("padded", 1), ("packed", 2), ("shared_prefix", 1)],
    ids=["padded", "packed-fsdp2proc", "shared_prefix"],
)
def test_token_budget_training_matches_padded(
    padded_run, batching, nproc, tiny_model_dir, pairs_file, eval_file, tmp_path
):
    """A 150-token budget cuts each step's 8 pairs into more micro-batches than the 2 of padded_run
    (the toy pairs need 36 to 88 tokens), unevenly across ranks; the metrics must not change."""
    flags = run_flags(tiny_model_dir, pairs_file, eval_file, tmp_path, "run", batching, 4 // nproc)
    result = run_minrm(flags + ["--max_tokens_per_batch", "150"], nproc=nproc)
    forwards = int(re.search(r"train: (\d+) micro-batches on rank 0 over 5 steps", result.stdout).group(1))
    assert forwards > 5 * 2
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == len(padded_run) == 6
    for a, b in zip(padded_run, rows):
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
