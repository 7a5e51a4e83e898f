"""Packed and shared-prefix batches against padded ones: the same rewards, loss and gradients on one
micro-batch through each attention that runs packed rows, no attention across packed sequences,
token-budget micro-batches, and the same training metrics through the trainer (one process and two
under FSDP)."""

import json
import math
import re

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Gemma2Config,
    GptOssConfig,
    MistralConfig,
    Qwen2Config,
)

from minrm.checks import SEGMENTS, check_model, packing_problem
from minrm.config import parse_args
from minrm.data import toy
from minrm.data.batching import check_token_budget, collate, micro_batches, split_to, to_device
from minrm.data.mixer import fit_row
from minrm.model.attention import use_packed_attention
from minrm.model.loss import LOSS, row_statistics
from minrm.model.reward import reward_forward
from tests.conftest import read_metrics, run_minrm, run_minrm_here, tiny_llama_config

PAD, VOCAB = 0, 100
MODES = ["packed", "shared_prefix"]
# How packed rows get their attention: SDPA per sequence span (the default off GPU), or one dense
# L x L mask through the model's own SDPA (the fallback for models that cannot swap attention).
ATTENTIONS = ["segments", "mask"]


def pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict:
    return {"prompt": prompt, "responses": [prompt + chosen, prompt + rejected], "scores": [1.0, 0.0]}


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
    broken["prompt"] = ids(6)  # not a prefix: the data's length filter makes it [], and every batching lays out
    return pairs + [fit(broken)]  # both full sequences


def fit(row: dict) -> dict:
    """A row as the data's length filter leaves it, with no limits (its prompt the prefix all responses share)."""
    return fit_row({**row, "problem": ""}, math.inf, math.inf, None)


def tiny_model(attention: str | None = None, config=None):
    """The same weights every call; `attention` (a --packed_attention choice) switches the
    attention as model.skeleton does for the packed modes."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config or tiny_llama_config(VOCAB))
    model.config.pad_token_id = PAD
    if attention:
        use_packed_attention(model, attention)
        assert model.config._attn_implementation == {"segments": SEGMENTS, "mask": "sdpa"}[attention]
    return model


def forward(model, rows, batching, device="cpu"):
    """Rewards (R,) of the rows' responses, row by row, as the trainer computes them."""
    inputs, _ = to_device(collate(rows, PAD, batching), torch.device(device))
    return reward_forward(model, **inputs)


def rewards_loss_grads(model, pairs, batching, device="cpu"):
    """The reference's pairwise loss, written out: -logsigmoid(chosen - rejected), averaged."""
    model.zero_grad()
    rewards = forward(model, pairs, batching, device)
    chosen, rejected = rewards.view(-1, 2).unbind(1)  # each pair's responses side by side
    loss = -F.logsigmoid(chosen - rejected).mean()
    loss.backward()
    return rewards.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_shared_prefix_checks_the_prefix():
    pairs = varied_pairs()
    assert [fit(p)["prompt"] for p in pairs] == [p["prompt"] for p in pairs] and pairs[-1]["prompt"] == []


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("batching", MODES)
def test_rewards_loss_and_gradients_match_padded(batching, attention):
    pairs = varied_pairs()
    r0, l0, g0 = rewards_loss_grads(tiny_model(), pairs, "padded")
    r1, l1, g1 = rewards_loss_grads(tiny_model(attention), pairs, batching)
    assert collate(pairs, PAD, batching)[0]["input_ids"].shape[0] == 1  # one row, no padding
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
        before = forward(model, pairs, batching)
        edited = [dict(p) for p in pairs]
        # Pair 0's chosen response is new: in shared_prefix its rejected response sits right after it.
        n, (chosen, rejected) = len(pairs[0]["prompt"]), pairs[0]["responses"]
        edited[0]["responses"] = [chosen[:n] + [t % (VOCAB - 1) + 1 for t in chosen[n:]], rejected]
        after = forward(model, edited, batching)
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


@pytest.mark.parametrize("choice", ["mask", "flex_attention"])
def test_one_mask_for_mixed_window_layers_refused(choice):
    with pytest.raises(SystemExit, match="mixes sliding-window and full attention layers"):
        use_packed_attention(tiny_model(config=windowed_config("qwen2_mixed", 8)), choice)


@pytest.mark.parametrize("window", [None, 8])
def test_flex_attention_block_mask_matches_padded(window):
    """The GPU path's block mask (tiles from the spans), run forward-only on CPU (FlexAttention has
    no CPU backward), with and without a sliding window."""
    pairs, config = varied_pairs(), windowed_config("mistral", window)
    with torch.no_grad():
        r0 = forward(tiny_model(config=config), pairs, "padded")
        model = tiny_model(config=config)
        use_packed_attention(model, "flex_attention")
        assert model.config._attn_implementation == "flex_attention"
        for batching in MODES:
            r1 = forward(model, pairs, batching)
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

    tiny_model().save_pretrained(tmp_path / "eight")
    tiny_model(config=sixteen).save_pretrained(tmp_path / "sixteen")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # check_model asks torch
    flags = ["--packed_attention", "flex_attention", "--model_name_or_path"]
    with pytest.raises(SystemExit, match=why):
        check_model(parse_args([*flags, str(tmp_path / "eight")]))
    check_model(parse_args([*flags, str(tmp_path / "sixteen")]))


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
    AutoModelForSequenceClassification.from_config(gemma2).save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match="--batching shared_prefix: gemma2 softcaps its attention logits"):
        check_model(parse_args(["--model_name_or_path", str(tmp_path)]))
    check_model(parse_args(["--model_name_or_path", str(tmp_path), "--batching", "padded"]))
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

    def tokens(chunk):
        return collate([pairs[i] for i in chunk], PAD, batching)[0]["input_ids"].numel()

    chunks = micro_batches(pairs, batching, max_tokens=budget)
    assert [i for c in chunks for i in c] == list(range(50))  # every pair once, in order
    assert max(map(tokens, chunks)) <= budget
    # Greedy: the next chunk's first pair would not have fit in the chunk before it.
    for a, b in zip(chunks, chunks[1:]):
        assert tokens(a + b[:1]) > budget
    assert micro_batches(pairs, batching, max_rows=4) == [list(range(i, min(i + 4, 50))) for i in range(0, 50, 4)]
    # Longest first (the scorer): the same budget, the costliest row leads.
    longest = micro_batches(pairs, batching, max_tokens=budget, longest_first=True)
    assert sorted(i for c in longest for i in c) == list(range(50)) and max(map(tokens, longest)) <= budget
    assert tokens(longest[0][:1]) == max(tokens([i]) for i in range(50))
    # Cut into more, as a rank with fewer micro-batches than another must be.
    more = split_to(chunks, len(chunks) + 3)
    assert len(more) == len(chunks) + 3 and [i for c in more for i in c] == list(range(50))
    # Fewer rows than micro-batches (an eval rank near the end): the rest are empty, run weightless.
    assert split_to([[0]], 3) == [[0], [], []]


def test_token_budget_below_the_costliest_row_is_refused():
    three = {"prompt": [1], "responses": [[1, 3, 3], [1, 4], [1] + [5] * 20], "scores": [2.0, 1.0, 0.0]}
    ds = datasets.Dataset.from_list([pair([1, 2], [3] * 5, [4] * 9), pair([1], [3] * 30, [4]), three])
    check_token_budget(ds, 33, "packed", "training")  # row 1: 31 + 2 tokens, fits
    with pytest.raises(SystemExit, match="--max_tokens_per_batch 62 is below the 63 tokens that training row 2"):
        check_token_budget(ds, 62, "padded", "training")  # 3 responses x 21
    with pytest.raises(SystemExit, match="below the 32 tokens that training row 1 needs with --batching shared_pr"):
        check_token_budget(ds, 31, "shared_prefix", "training")  # 31 + 2 - 1 shared
    with pytest.raises(SystemExit, match="below the 24 tokens that eval row 0 needs with --batching shared_prefix"):
        check_token_budget(datasets.Dataset.from_list([three]), 23, "shared_prefix", "eval")  # 3 + 2 + 21 - 2 x 1


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
    run_minrm_here(run_flags(tiny_model_dir, pairs_file, eval_file, out, "padded", "padded", 4))
    return read_metrics(out / "padded")


@pytest.mark.parametrize(
    ("batching", "nproc", "budget"),
    [("packed", 1, None), ("shared_prefix", 2, None), ("padded", 1, 150), ("packed", 2, 150), ("shared_prefix", 1, 150)],
    ids=["packed", "shared_prefix-fsdp2proc", "padded-budget", "packed-budget-fsdp2proc", "shared_prefix-budget"],
)
def test_training_metrics_match_padded(
    padded_run, batching, nproc, budget, tiny_model_dir, pairs_file, eval_file, tmp_path
):
    """Every layout, on 1 process (the trainer's main, in this process) and 2 (torchrun; 2 x 2
    pairs = 1 x 4 pairs: the same global batches), with and without a token budget: the metrics of
    padded_run. A 150-token budget cuts each step's 8 pairs into more micro-batches than the 2 of
    padded_run (the toy pairs need 36 to 88 tokens), unevenly across ranks."""
    flags = run_flags(tiny_model_dir, pairs_file, eval_file, tmp_path, "run", batching, 4 // nproc)
    flags += ["--max_tokens_per_batch", str(budget)] if budget else []
    log = (run_minrm(flags, nproc=nproc) if nproc > 1 else run_minrm_here(flags)).stdout  # torchrun for 2
    if batching != "padded":
        assert log.count("model: packed rows run attention minrm_segments") == 1, log  # said once, by rank 0
    forwards = int(re.search(r"train: (\d+) micro-batches on rank 0 over 5 steps", log).group(1))
    assert forwards > 5 * 2 if budget else forwards == 5 * 2
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == len(padded_run) == 6  # 5 steps and one eval
    for a, b in zip(padded_run, rows):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=1e-5), key


# ----------------------------------------------------------------------------------------------
# Rows of K responses: each prompt and each response computed once


def k_rows(tokenizer) -> list[dict]:
    """Rows of K = 2, 3, 5 responses through the chat template, with and without a system prompt,
    scores with ties (equal scores compare nothing)."""
    words = ["red cat", "red dog", "cat red", "blue owl sun", "red", "one two three four"]
    rows = []
    for k, system, scores in [(2, False, [1, 0]), (3, True, [2, 0, 1]), (5, False, [3, 1, 1, 0, 2]), (5, True, [1, 1, 0, 0, 0])]:  # fmt: skip
        prompt = [{"role": "system", "content": "be exact"}] * system + [{"role": "user", "content": "copy: red cat"}]
        convs = [prompt + [{"role": "assistant", "content": words[(len(rows) + i) % len(words)]}] for i in range(k)]
        rows.append(
            {
                "prompt": tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False),
                "responses": [tokenizer.apply_chat_template(c, return_dict=False) for c in convs],
                "scores": [float(s) for s in scores],
            }
        )
    return rows


def hf_rewards(model, seqs: list[list[int]]) -> torch.Tensor:
    """Hugging Face's own forward and pooling, on the sequences right-padded together."""
    width = max(map(len, seqs))
    ids = torch.tensor([s + [PAD] * (width - len(s)) for s in seqs])
    return model(input_ids=ids, attention_mask=(ids != PAD).long()).logits[:, 0]


def exploded_pairs_loss(rewards_of_row: list[torch.Tensor], rows: list[dict]) -> torch.Tensor:
    """InstructGPT's loss with each comparison as a pair of its own: -logsigmoid(r_i - r_j) for
    scores[i] > scores[j], each row's pairs weighing 1 / (its comparisons), then the mean over rows."""
    total = 0
    for r, row in zip(rewards_of_row, rows):
        s = row["scores"]
        pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if s[i] > s[j]]
        total = total + sum(-F.logsigmoid(r[i] - r[j]) for i, j in pairs) / len(pairs)
    return total / len(rows)


@pytest.mark.parametrize(
    ("batching", "attention"), [("padded", None), ("packed", "segments"), *[("shared_prefix", a) for a in ATTENTIONS]]
)
def test_k_response_rows_match_hf_and_exploded_pairs(batching, attention, tokenizer):
    rows = k_rows(tokenizer)
    assert all(fit(row)["prompt"] == row["prompt"] and row["prompt"] for row in rows)
    reference = tiny_model()
    expected = [hf_rewards(reference, row["responses"]) for row in rows]
    exploded_pairs_loss(expected, rows).backward()
    model = tiny_model(attention)
    inputs, prefs = collate(rows, PAD, batching)
    rewards = reward_forward(model, **inputs)
    torch.testing.assert_close(rewards, torch.cat(expected).detach(), rtol=0, atol=1e-5)
    row_statistics(rewards, prefs)[:, LOSS].mean().backward()
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=0, atol=1e-5, msg=name)
    if batching == "shared_prefix":  # each prompt once in the row
        n = sum(len(r["prompt"]) + sum(len(s) - len(r["prompt"]) for s in r["responses"]) for r in rows)
        assert inputs["input_ids"].numel() == n


# ----------------------------------------------------------------------------------------------
# Identical responses ranked apart (a pair whose chosen and rejected are the same text): one sequence


def rows_with_identical_responses() -> list[dict]:
    """An identical pair, a normal pair, a ranked row with a duplicate ranked apart (responses 0 and 2)
    and one ranked level (3 and 4), and an identical pair whose prompt is not a prefix."""
    g = torch.Generator().manual_seed(5)

    def ids(n):
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    prompt, a, b, c = ids(7), ids(5), ids(9), ids(3)
    same = pair(prompt, a, a)
    ranked = {"prompt": prompt, "responses": [prompt + s for s in (a, b, a, c, c)], "scores": [3.0, 2.0, 1.0, 0.0, 0.0]}
    loose = pair(ids(4), b, b)
    loose["prompt"] = ids(4)  # not a prefix: shared_prefix lays its one sequence out whole
    return [same, pair(prompt, b, c), ranked, loose]


@pytest.mark.parametrize(
    ("batching", "attention"), [("padded", None), ("packed", "segments"), *[("shared_prefix", a) for a in ATTENTIONS]]
)
def test_identical_responses_are_one_sequence_and_tie_exactly(batching, attention):
    rows = rows_with_identical_responses()
    model = tiny_model(attention)
    inputs, prefs = collate(rows, PAD, batching)
    rewards = reward_forward(model, **inputs)
    distinct = [[s for k, s in enumerate(r["responses"]) if s not in r["responses"][:k]] for r in rows]
    assert len(rewards) == len(inputs["last_index"]) == sum(map(len, distinct)) == 1 + 2 + 3 + 1  # each once
    grid = rewards[prefs.index]  # (N, K): each response's reward
    for i, j, k in [(0, 0, 1), (2, 0, 2), (2, 3, 4), (3, 0, 1)]:
        assert prefs.index[i, j] == prefs.index[i, k]
        assert torch.equal(grid[i, j], grid[i, k])  # bitwise: one computation read twice
    # Each response's reward is Hugging Face's own forward of its sequence.
    for i, row in enumerate(rows):
        expected = hf_rewards(tiny_model(), row["responses"])
        torch.testing.assert_close(grid[i, : len(row["responses"])], expected, rtol=0, atol=1e-5)
    # The tie in the metrics: an identical pair's loss is log 2, its accuracy 0; the ranked row's
    # comparisons (by score) are 3 > 2, 3 > 1 (a tie: the same text), 3 > 0 (twice), 2 > 1, 2 > 0
    # (twice), 1 > 0 (twice).
    stats = row_statistics(rewards, prefs)
    assert stats[0, LOSS].item() == pytest.approx(math.log(2), abs=1e-7) and stats[0, 0].item() == 0.0
    r = grid[2].tolist()
    wins = [r[i] > r[j] for i, j in [(0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4), (2, 3), (2, 4)]]
    assert not wins[1] and stats[2, 0].item() == pytest.approx(sum(wins) / 9)
    # The gradient of both responses flows into the one computed sequence.
    stats[:, LOSS].mean().backward()
    assert all(p.grad is not None for p in model.parameters())


IDENTICAL = (2, 5, 9)  # the pairs of identical_pairs_file whose rejected side is their chosen one


@pytest.fixture(scope="module")
def identical_pairs_file(tmp_path_factory) -> str:
    """12 toy pairs in the Tulu format, 3 of them with the chosen conversation as the rejected one."""
    rows = [dict(r) for r in toy.toy_dataset("train").select(range(12))]
    for i in IDENTICAL:
        rows[i]["rejected"] = rows[i]["chosen"]
    path = tmp_path_factory.mktemp("identical") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def reference_metrics(model_dir: str, path: str) -> dict:
    """The reference's loop written out: each pair's chosen and rejected conversations through the
    chat template, the chosen ones then the rejected ones right-padded together into one batch (2B,
    T), Hugging Face's own forward and pooling, then loss = -logsigmoid(r_c - r_r).mean(), accuracy =
    (r_c > r_r).mean(). An identical pair is the same sequence twice: a tie (loss log 2, accuracy 0),
    set equal here rather than left to this CPU's rounding of two copies in a padded batch."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    rows = [json.loads(line) for line in open(path)]
    seqs = [tok.apply_chat_template(r[side], return_dict=False) for side in ("chosen", "rejected") for r in rows]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        chosen, rejected = model(input_ids=ids, attention_mask=mask).logits[:, 0].double().split(len(rows))
    same = torch.tensor([r["chosen"] == r["rejected"] for r in rows])
    assert same.nonzero().flatten().tolist() == list(IDENTICAL)
    # No near tie elsewhere (the closest pair is 4e-5 apart; the layouts differ here by 1e-7): no coin flips.
    assert (chosen - rejected)[~same].abs().min() > 1e-5
    rejected = torch.where(same, chosen, rejected)
    return {
        "loss": -F.logsigmoid(chosen - rejected).mean().item(),
        "accuracy": (chosen > rejected).double().mean().item(),
        "chosen_rewards": chosen.mean().item(),
        "rejected_rewards": rejected.mean().item(),
        "reward_margin": (chosen - rejected).mean().item(),
    }


@pytest.mark.parametrize("batching", ["padded", *MODES])
def test_identical_pairs_train_with_the_reference_metrics(batching, identical_pairs_file, tiny_model_dir, tmp_path):
    """One optimizer step over all 12 pairs (2 micro-batches of 6) at learning rate 0, then an eval
    of the same 12 pairs in batches of 5 (the trainer's main, in this process): both the
    reference's metrics, the identical pairs included as ties; their sampled rewards equal and wrong;
    counted once in the data log."""
    flags = [
        "--model_name_or_path", tiny_model_dir,
        "--dataset_mixer_list", identical_pairs_file, "1.0",
        "--dataset_mixer_eval_list", identical_pairs_file, "1.0",
        "--dataset_mixer_eval_list_splits", "train",
        "--init_score_head", "False",
        "--learning_rate", "0",
        "--total_episodes", "12",
        "--per_device_train_batch_size", "6",
        "--gradient_accumulation_steps", "2",
        "--per_device_eval_batch_size", "5",
        "--num_evals", "1",
        "--batching", batching,
        "--output_dir", str(tmp_path),
        "--run_name", "run",
        "--no_plot",
    ]  # fmt: skip
    log = run_minrm_here(flags).stdout
    line = f"data: train: {identical_pairs_file}: 3 kept rows rank identical responses apart"
    assert log.count(line) == 1 and log.count(f"data: eval: {identical_pairs_file}: 3 kept rows rank") == 1
    expected = reference_metrics(tiny_model_dir, identical_pairs_file)
    train, evaluated = read_metrics(tmp_path / "run")
    for name, value in expected.items():
        assert train[f"train/rm/{name}"] == pytest.approx(value, abs=1e-5), name
        assert evaluated[f"eval/rm/{name}"] == pytest.approx(value, abs=1e-5), name
    samples = [json.loads(line) for line in open(tmp_path / "run" / "eval_samples.jsonl")]
    assert len(samples) == 10  # the first 10 eval rows, in order
    for i, s in enumerate(samples):
        tied = s["chosen_reward"] == s["rejected_reward"]
        assert tied == (i in IDENTICAL) and s["correct"] is (s["chosen_reward"] > s["rejected_reward"])
