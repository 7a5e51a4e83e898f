"""scripts/bench.py on a preference file read as minrm reads it: the computed-token counts and the
wasted fraction against counts written out here from the pairs themselves, and the bare loop
against minrm's padded step on the same weights."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from minrm.data.batching import collate, computed_tokens, row_sizes
from scripts import bench, bench_context


@pytest.fixture(scope="module")
def file_pairs(pairs_file):
    return bench.file_pairs(pairs_file, None, 4)


def test_file_pairs_are_the_trainers_tokens(file_pairs):
    assert len(file_pairs) == 4
    for p in file_pairs:
        n = len(p["prompt"])
        assert n > 0 and p["chosen"][:n] == p["rejected"][:n] == p["prompt"]


def test_one_step_per_mode_counts_tokens(file_pairs):
    # Step 0 warms up on the first 4 pairs; step 1 is the same 4 again, run twice per mode.
    rows = {r["mode"]: r for r in bench.time_modes(list(bench.MODES), file_pairs * 2, 4, 1, "9m", repeats=2)}
    batch = file_pairs
    lengths = [(len(p["prompt"]), len(p["chosen"]), len(p["rejected"])) for p in batch]
    unique = sum(c + r - n for n, c, r in lengths)
    padded = 2 * len(batch) * max(max(c, r) for _, c, r in lengths)
    assert rows["padded"]["wasted_fraction"] == rows["bare"]["wasted_fraction"] == pytest.approx(1 - unique / padded)
    assert rows["packed"]["wasted_fraction"] == pytest.approx(1 - unique / sum(c + r for _, c, r in lengths))
    assert rows["shared_prefix"]["wasted_fraction"] == 0
    computed = {"bare": padded, "padded": padded, "packed": sum(c + r for _, c, r in lengths), "shared_prefix": unique}
    for mode, row in rows.items():
        assert row["computed_tokens_per_s"] == pytest.approx(computed[mode] / row["seconds"])
        assert row["forward_backward_tokens_per_s"] > row["computed_tokens_per_s"]  # the step less its optimizer
        real = sum(c + r for _, c, r in lengths)
        assert row["real_tokens_per_s"] == pytest.approx(real / row["seconds"])
        assert row["pairs_per_s"] == pytest.approx(len(batch) / row["seconds"])
        # Every mode's rewards and loss on the first batch are bare's (Hugging Face's own forward).
        assert row["reward_difference"] < 1e-5 and row["loss_difference"] < 1e-6, mode


def full_weights(model) -> dict:
    return {k: v.clone() for k, v in get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)).items()}


def test_bare_step_is_a_padded_minrm_step(file_pairs):
    """bare (Hugging Face's forward on right-padded pairs, torch's AdamW) and minrm's padded step
    (the trainer's forward_backward on the FSDP2 model, minrm's AdamW), each from the same weights
    and batch: the same loss, the computed tokens of 2 x pairs x the longest sequence, the same
    weights after."""
    longest = max(len(p[k]) for p in file_pairs for k in ("chosen", "rejected"))
    losses, weights = {}, {}
    for mode in ("bare", "padded"):
        with bench.one_process() as d:
            models, optimizers, attention = bench.build(d, "9m", modes=[mode])
            rewards, computed = bench.rewards_of(models, attention, file_pairs, mode, d.device)
            chosen, rejected = rewards.detach().chunk(2)
            losses[mode] = -F.logsigmoid(chosen - rejected).mean()
            before = full_weights(models[mode])
            assert bench.train_step(models, optimizers, attention, file_pairs, mode, d.device)[0] == computed
            assert computed == 2 * len(file_pairs) * longest
            weights[mode] = full_weights(models[mode])
            assert (weights[mode]["score.weight"] - before["score.weight"]).abs().min() > 1e-5  # the step moved it
    torch.testing.assert_close(losses["bare"], losses["padded"], rtol=0, atol=1e-6)
    assert weights["padded"].keys() == weights["bare"].keys()
    for name, value in weights["padded"].items():
        torch.testing.assert_close(weights["bare"][name], value, rtol=0, atol=1e-6, msg=name)


def test_ranked_profile_ways_train_the_same_loss_on_their_token_counts():
    """scripts/bench_ranked: rows of 4 responses, their 6 comparisons exploded into pairs (packed
    with the prompt once, or padded): the same loss on the same weights, and the computed tokens
    written out here from the lengths."""

    from scripts.bench import BATCHINGS, build, one_process
    from scripts.bench_ranked import exploded, ranked_rows, step

    rows = ranked_rows(2, 4, 8192, seed=0)
    pairs = exploded(rows)
    assert len(pairs) == 12 and all(p["responses"][0] != p["responses"][1] for p in pairs)
    with one_process() as d:
        models, optimizers, attention = build(d, "9m", modes=BATCHINGS)
        run = (models["shared_prefix"], optimizers["shared_prefix"], attention, d.device)
        result = {w: step(run, rows, w, update=False) for w in ("rows", "pairs", "pairs_padded")}
    assert result["pairs"][0] == pytest.approx(result["rows"][0], abs=1e-5)
    assert result["pairs_padded"][0] == pytest.approx(result["rows"][0], abs=1e-5)
    tails = [[len(s) - len(r["prompt"]) for s in r["responses"]] for r in rows]
    assert result["rows"][1] == sum(len(r["prompt"]) + sum(t) for r, t in zip(rows, tails))
    assert result["pairs"][1] == sum(len(p["prompt"]) + sum(len(s) - len(p["prompt"]) for s in p["responses"]) for p in pairs)
    assert result["pairs_padded"][1] == 2 * len(pairs) * max(len(s) for p in pairs for s in p["responses"])


def test_longcontext_pair_computes_its_tokens_under_shared_prefix():
    """The long-context profile's row (scripts/bench_context.py) is what its table divides by: --context_tokens
    computed tokens under shared_prefix, by the trainer's own cost formula and in the packed row collated."""
    pair = bench_context.long_pair(1000, seed=3)
    assert computed_tokens(*row_sizes(pair), "shared_prefix") == 1000
    assert collate([pair], 0, "shared_prefix")[0]["input_ids"].shape == (1, 1000)
    assert all(s[:500] == pair["prompt"] for s in pair["responses"]) and pair["responses"][0] != pair["responses"][1]
    packed = bench_context.long_pair(1000, seed=3, batching="packed")
    assert computed_tokens(*row_sizes(packed), "packed") == 1000 == collate([packed], 0, "packed")[0]["input_ids"].numel()
