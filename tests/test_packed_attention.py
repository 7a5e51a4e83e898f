"""The attentions that run packed rows, against who-attends-to-whom written out here per token from
the layout itself: FlexAttention's block lists built from the spans (exact, tight, and small at
L = 32k), and `segment_attention` with grouped-query heads, sliding windows included. FlexAttention
compiles a few graphs over many packed lengths, never reaching dynamo's recompile limit."""

import json
import subprocess
import sys

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters
from transformers import AutoModelForSequenceClassification

from minrm.data.batching import PackedLayout, Segment, collate
from minrm.model.attention import BLOCK, block_lists, mask_rule, segment_attention, use_packed_attention
from minrm.model.reward import reward_forward
from tests.conftest import ROOT, tiny_llama_config

WINDOWS = [None, 8, 300]


def lengths_pairs(lengths: list[tuple[int, int, int]]) -> list[dict]:
    """Pairs of (prompt, chosen response, rejected response) lengths; token ids do not matter here."""
    return [{"prompt": [1] * p, "responses": [[1] * (p + c), [1] * (p + r)], "scores": [1, 0]} for p, c, r in lengths]


# Rows of 3 to 5 tiles, none a multiple of BLOCK long; a pair without a prompt; sequences long
# enough for whole tiles to be allowed.
PAIRS = lengths_pairs([(150, 40, 260), (0, 30, 7), (5, 140, 3), (60, 20, 33)])


def layout(batching: str) -> tuple[torch.Tensor, ...]:
    """Per token of the row, from the pairs alone: its sequence (a pair in shared_prefix), its part
    (0 prompt, 1 chosen response, 2 rejected response) and its position in its own sequence."""
    seq, part, pos = [], [], []
    if batching == "packed":  # each pair's two sequences, whole, one after the other
        for i, s in enumerate(s for p in PAIRS for s in p["responses"]):
            seq += [i] * len(s)
            part += [0] * len(s)
            pos += range(len(s))
    else:
        for i, p in enumerate(PAIRS):
            n, (c, r) = len(p["prompt"]), map(len, p["responses"])
            seq += [i] * (c + r - n)
            part += [0] * n + [1] * (c - n) + [2] * (r - n)
            pos += [*range(c), *range(n, r)]
    return tuple(torch.tensor(x) for x in (seq, part, pos))


def expected_mask(seq, part, pos, window) -> torch.Tensor:
    """(L, L): q sees k in its own sequence, not after it, the rejected response not the chosen one,
    with a window: fewer than `window` positions back."""
    q, k = (slice(None), None), (None, slice(None))
    ok = (seq[q] == seq[k]) & (torch.arange(len(seq))[q] >= torch.arange(len(seq))[k])
    ok &= ~((part[q] == 2) & (part[k] == 1))
    return ok if window is None else ok & (pos[q] - pos[k] < window)


def scorer_row(prompt: int, responses: list[int]) -> tuple[PackedLayout, torch.Tensor]:
    """One prompt and N responses in one row, the prompt a segment of its own and each response
    attending to it and itself: its layout and its expected mask (window None)."""
    segments, end = [Segment(0, prompt)], prompt
    for r in responses:
        segments.append(Segment(end, end + r, 0, prompt))
        end += r
    owner = torch.repeat_interleave(torch.arange(len(responses) + 1), torch.tensor([prompt, *responses]))
    i = torch.arange(end)
    ok = (i[:, None] >= i[None, :]) & ((owner[:, None] == owner[None, :]) | (owner[None, :] == 0))
    return PackedLayout(segments), ok


def tiles_to_dense(lists, rule, L: int) -> torch.Tensor:
    """The (L, L) mask FlexAttention computes from block lists: full tiles whole, partial tiles
    through the per-token rule, the rest nothing."""
    n = -(-L // BLOCK)
    dense = torch.zeros(n * BLOCK, n * BLOCK, dtype=torch.bool)
    idx = torch.arange(n * BLOCK).clamp(max=L - 1)
    partial_n, partial_i, full_n, full_i = (torch.from_numpy(t) for t in lists)
    for t in range(n):
        rows = slice(t * BLOCK, (t + 1) * BLOCK)
        for j in partial_i[t, : partial_n[t]]:
            cols = slice(j * BLOCK, (j + 1) * BLOCK)
            dense[rows, cols] = rule(None, None, idx[rows, None], idx[None, cols])
        for j in full_i[t, : full_n[t]]:
            dense[rows, j * BLOCK : (j + 1) * BLOCK] = True
    return dense[:L, :L]


def tile_classes(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) per BLOCK x BLOCK tile of an (L, L) mask, padded with False as FlexAttention's
    own create_block_mask does."""
    n = -(-mask.shape[0] // BLOCK)
    padded = F.pad(mask, (0, n * BLOCK - mask.shape[1], 0, n * BLOCK - mask.shape[0]))
    count = padded.view(n, BLOCK, n, BLOCK).sum((1, 3))
    return (count > 0) & (count < BLOCK * BLOCK), count == BLOCK * BLOCK


def listed(num: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    dense = torch.zeros(len(num), indices.shape[-1], dtype=torch.bool)
    for t in range(len(num)):
        dense[t, indices[t, : num[t]].long()] = True
    return dense


def cases():
    for batching in ("packed", "shared_prefix"):
        for window in WINDOWS:
            yield pytest.param(batching, window, id=f"{batching}-window{window}")
    yield pytest.param("scorer", None, id="scorer")


def case(batching: str, window):
    if batching == "scorer":
        return scorer_row(300, [100, 3, 200, 41, 9, 5])
    return collate(PAIRS, 0, batching)[0]["packed_layout"], expected_mask(*layout(batching), window)


@pytest.mark.parametrize(("batching", "window"), cases())
def test_block_lists_from_spans_match_the_per_token_mask(batching, window):
    packed, want = case(batching, window)
    L = want.shape[0]
    assert L % BLOCK and L > 3 * BLOCK
    lists = block_lists(packed, window)
    rule = mask_rule(packed.key_ranges(), window)
    torch.testing.assert_close(tiles_to_dense(lists, rule, L), want, rtol=0, atol=0)
    # Tight: the full tiles are exactly those the mask allows whole (FlexAttention skips the mask
    # there), and no listed partial tile is empty.
    partial, full = tile_classes(want)
    lists = [torch.from_numpy(t) for t in lists]
    assert torch.equal(listed(*lists[:2]), partial) and torch.equal(listed(*lists[2:]), full)
    assert full.any() or window == 8  # whole tiles exist: the full-tile path is tested
    # The per-token rule alone is the mask too (the dense `mask` path).
    i = torch.arange(L)
    torch.testing.assert_close(rule(None, None, i[:, None], i[None, :]), want, rtol=0, atol=0)


MEMORY_PROBE = """
import json, torch
from torch.nn.attention.flex_attention import BlockMask
from transformers import AutoModelForSequenceClassification
from minrm.data.batching import collate
from minrm.model.attention import packed_attention_mask
from tests.conftest import tiny_llama_config
model = AutoModelForSequenceClassification.from_config(tiny_llama_config(8))
model.set_attn_implementation("flex_attention")
pairs = [{"prompt": [1] * 700, "responses": [[1] * 1300, [1] * 1500], "scores": [1, 0]} for _ in range(16)]
batch, _ = collate(pairs, 0, "shared_prefix")  # L = 33,600
def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
before = hwm()
mask = packed_attention_mask(model, batch["packed_layout"], torch.device("cpu"))
assert isinstance(mask, BlockMask)
print(json.dumps({"L": batch["input_ids"].shape[1], "rise": hwm() - before, "tiles": int(mask.kv_num_blocks.sum())}))
"""


def test_block_mask_at_32k_tokens_stays_small():
    """The L x L mask would be 1 GiB of bools at L = 32k (about 10 GB as create_block_mask sums
    it); the BlockMask from spans must stay under 64 MiB of peak RSS."""
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["L"] > 32 * 1024 and probe["tiles"] > 0
    assert probe["rise"] < 64, probe


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize(("batching", "window"), cases())
def test_segment_attention_with_grouped_heads_matches_the_dense_mask(batching, window, device):
    """4 query heads on 2 KV heads: the rejected responses, the scorer's responses and the windows
    against softmax attention written out with the mask above, in fp32."""
    packed, want = case(batching, window)
    L, g = want.shape[0], torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, L, 8, generator=g).to(device) for h in (4, 2, 2))
    out, _ = segment_attention(None, q, k, v, None, scaling=0.3, packed_layout=packed, sliding_window=window)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~want.to(device), float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(1, 2)  # (1, L, heads, head_dim)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6 if device == "cpu" else 1e-5)


def test_layouts_the_attentions_cannot_run_are_refused():
    with pytest.raises(ValueError, match="a shared prompt must begin an earlier segment"):
        PackedLayout([Segment(0, 10), Segment(10, 20, 2, 6)])  # a prompt in the middle of a segment
    with pytest.raises(ValueError, match="a shared prompt must begin an earlier segment"):
        PackedLayout([Segment(0, 10, 10, 12), Segment(10, 20)])  # a prompt after the segment


def test_flex_attention_compiles_few_graphs_over_many_lengths(monkeypatch):
    """transformers compiles `flex_attention` once, but dynamo compiles again for what its graphs do
    not cover, and past `recompile_limit` (8 per function) it falls back to eager FlexAttention,
    which computes the L x L scores. Over 16 packed lengths of 1 to 5 tiles (127, 128, 129 and 256 among them: the tile edges where CUDA guards one more class), each run in train mode
    (grad on) and in eval mode (no_grad): 6 graphs, per grad mode one for the first length, one for
    any other length of one tile and one for any length of more, all 6 there after the third length.
    Forward only (FlexAttention has no CPU backward): train mode runs on frozen weights."""
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", False)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_llama_config(100, pad_token_id=0)).requires_grad_(False)
    use_packed_attention(model, "flex_attention", log=False)
    assert torch._dynamo.config.fail_on_recompile_limit_hit  # choosing flex turns it on: raise, not fall back
    graphs, lengths = [], []
    sizes = [(5, 10, 6), (5, 40, 21), (5, 100, 51)] + [(9 + 7 * k, 11 * k + 3, 5 * k + 2) for k in range(1, 26, 3)]
    sizes += [(9, 60, 58), (9, 60, 59), (9, 61, 59), (16, 121, 119)]  # 127, 128, 129 and 256 tokens: tile edges
    for p, c, r in sizes:  # (prompt, chosen response, rejected response) lengths
        batch, _ = collate(lengths_pairs([(p, c, r)]), 0, "shared_prefix")
        for mode in ("train", "eval"):
            with torch.set_grad_enabled(mode == "train"):
                reward_forward(getattr(model, mode)(), **batch)
        lengths.append(batch["input_ids"].shape[1])
        graphs.append(counters["stats"]["unique_graphs"])
    assert len(set(lengths)) == 16 and min(lengths) < BLOCK and max(lengths) > 4 * BLOCK, lengths
    assert {127, 128, 129, 256} <= set(lengths)
    assert graphs[2] == graphs[-1] == 6, dict(zip(lengths, graphs))
