"""From tokenized rows to model input: which rows a rank takes at each step, how they are cut into
micro-batches, and the collator that lays a micro-batch out for the model.

A row is a prompt with K >= 2 responses and the comparisons among them (data/mixer.py): `{"prompt": ids,
"responses": [ids, ...], "scores": [...], "margin": float}`, each response a whole sequence that begins
with the prompt's ids, response i preferred to j when scores[i] > scores[j]. A pair is K = 2 with
scores [1, 0]. docs/batching.md says what each layout computes and why the rewards are the same.
"""

import functools
from typing import NamedTuple

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from torch.nn.utils.rnn import pad_sequence

# ----------------------------------------------------------------------------------------------
# Which rows: the training stream, and each rank's share of a step


def stream_indices(start: int, count: int, n: int, seed: int) -> list[int]:
    """Positions [start, start + count) of the training stream: epoch after epoch of the n rows,
    each epoch in its own seeded order (independent of the number of processes). A batch that runs
    past an epoch's end takes the rest from the next epoch, so every optimizer step is a full batch
    (the reference instead steps on a partial last batch without logging it or stepping the scheduler)."""
    return [_epoch_order(epoch, n, seed)[i] for epoch, i in (divmod(pos, n) for pos in range(start, start + count))]


@functools.lru_cache(maxsize=2)
def _epoch_order(epoch: int, n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def step_indices(step: int, rank: int, world_size: int, per_device: int, accumulation: int, n: int, seed: int):
    """The stream positions rank `rank` trains on at optimizer step `step`: each of the step's
    `accumulation` micro-batches holds per_device x world_size rows of the stream, and each rank
    takes its slice of every one (so 1 and N processes see the same global batches)."""
    micro = per_device * world_size
    starts = (step * micro * accumulation + m * micro + rank * per_device for m in range(accumulation))
    return [i for start in starts for i in stream_indices(start, per_device, n, seed)]


def rows_at(ds: datasets.Dataset, indices: list[int]) -> list[dict]:
    """Rows `indices` of a tokenized dataset, as dicts."""
    columns = ds[indices]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


# ----------------------------------------------------------------------------------------------
# Cutting into micro-batches, by rows or by a token budget


def row_sizes(row: dict) -> np.ndarray:
    """What a row's cost is made of: its K sequences, the longest's length, their tokens in all, and
    the tokens of the K - 1 copies of its prompt that shared_prefix lays out once."""
    lengths = [len(s) for s in row["responses"]]
    return np.array([len(lengths), max(lengths), sum(lengths), (len(lengths) - 1) * len(row["prompt"])])


def computed_tokens(seqs, longest, total, repeats, batching: str):
    """Tokens the model computes for rows of these sizes (summed over the rows, the longest their
    longest; numbers, or numpy arrays of one value per row): every sequence padded to the longest
    (padded), all their tokens (packed), less the repeated prompts (shared_prefix)."""
    if batching == "padded":
        return seqs * longest
    return total - repeats if batching == "shared_prefix" else total


def micro_batches(
    rows: list[dict], batching: str, max_rows: int | None = None, max_tokens: int | None = None, longest_first=False
) -> list[list[int]]:
    """The rows' indices cut into micro-batches of at most `max_rows` rows and `max_tokens` computed
    tokens, in order or `longest_first` (the scorer: little padding, and the largest batch first, so
    a budget too large for the memory fails at once). A row over the budget goes alone. The loss and
    metrics are means over rows, whatever the cut."""
    sizes = [row_sizes(row) for row in rows]
    order = range(len(rows))
    if longest_first:
        order = sorted(order, key=lambda i: computed_tokens(*sizes[i], batching), reverse=True)
    out, total = [], None
    for i in order:
        if out:
            grown = np.r_[total[0] + sizes[i][0], max(total[1], sizes[i][1]), total[2:] + sizes[i][2:]]
            if len(out[-1]) != max_rows and not (max_tokens and computed_tokens(*grown, batching) > max_tokens):
                out[-1].append(i)
                total = grown
                continue
        out.append([i])
        total = sizes[i]
    return out


def split_to(chunks: list[list], k: int) -> list[list]:
    """`k` micro-batches from `chunks` (k >= len(chunks)), halving the largest until there are k,
    then adding empty ones when too few rows are left to halve: under FSDP every rank must run the
    same number of forward passes (an empty one runs weightless, training/evaluate.py)."""
    chunks = list(chunks)
    while len(chunks) < k:
        i = max(range(len(chunks)), key=lambda j: len(chunks[j]))
        half = len(chunks[i]) // 2
        chunks[i : i + 1] = [chunks[i][:half], chunks[i][half:]] if half else [chunks[i], []]
    return chunks


def check_token_budget(ds: datasets.Dataset | None, max_tokens: int | None, batching: str, what: str) -> None:
    """Refuse, before training, a --max_tokens_per_batch that the costliest row alone exceeds."""
    if not max_tokens or ds is None:
        return
    table = ds.with_format("arrow")[:]
    responses = table["responses"].combine_chunks()
    lengths = pc.list_value_length(responses.flatten()).to_numpy()
    row_of = pc.list_parent_indices(responses).to_numpy()
    k = np.bincount(row_of, minlength=len(table))
    longest = np.maximum.reduceat(lengths, np.r_[0, np.cumsum(k)[:-1]])
    total = np.bincount(row_of, weights=lengths, minlength=len(table)).astype(np.int64)
    need = computed_tokens(k, longest, total, (k - 1) * pc.list_value_length(table["prompt"]).to_numpy(), batching)
    i = int(need.argmax())
    if need[i] > max_tokens:
        raise SystemExit(
            f"minrm: error: --max_tokens_per_batch {max_tokens} is below the {need[i]} tokens that {what} row "
            f"{i} needs with --batching {batching}; raise the budget or lower --max_token_length."
        )


# ----------------------------------------------------------------------------------------------
# The collator


class Segment(NamedTuple):
    """The queries [start, end) of a packed row. They see the keys [start, q] (causal) and all of
    [shared_start, shared_end): the prompt they share with an earlier segment, which begins with it
    (empty when the segment holds its own prompt). Positions run on from the prompt's end."""

    start: int
    end: int
    shared_start: int = 0
    shared_end: int = 0


class PackedLayout:
    """The segments of one packed row, in order; they tile the row. A plain object rather than a
    list: FSDP2's hooks walk every list, tuple and dataclass in every block's arguments, at every
    call, and this one is a single leaf to them."""

    def __init__(self, segments: list[Segment]):
        self.segments, self.length = segments, segments[-1].end
        self.sizes = [s.end - s.start for s in segments]
        self.at = {s.start: j for j, s in enumerate(segments)}  # the segment that starts at a position
        for s in segments:
            if s.shared_end > s.shared_start and (s.shared_start not in self.at or s.shared_end > s.start):
                raise ValueError(f"{s}: a shared prompt must begin an earlier segment of the row")

    def key_ranges(self) -> torch.Tensor:
        """(3, L) int64 on the host, per query: its segment's start, shared_start, shared_end (the
        per-token form the FlexAttention and dense masks read)."""
        ranges = torch.tensor([(s.start, s.shared_start, s.shared_end) for s in self.segments])
        return ranges.repeat_interleave(torch.tensor(self.sizes), 0).T.contiguous()


class Preferences(NamedTuple):
    """A batch's rows as a (N, K) grid over its flat rewards (R,), K the batch's most responses."""

    index: torch.Tensor  # (N, K) long: each response's reward in the flat rewards; -1 pads a shorter row
    scores: torch.Tensor  # (N, K): higher is preferred; -inf on padding
    margin: torch.Tensor  # (N,): subtracted from every reward difference of the row (Llama 2's margin loss)


def collate(rows: list[dict], pad_id: int, batching: str) -> tuple[dict, Preferences]:
    """One micro-batch: the model's keyword arguments, whose rewards (R,) come out row by row, and
    the rows' `Preferences` over those rewards.

    - `padded`: every response right-padded to the longest (R, T), as the reference does.
    - `packed`: the sequences end to end in one row (1, L), each attending only to itself.
    - `shared_prefix`: each row laid out once, prompt + response 1 + response 2 + ...: response 1
      continues the prompt, each later one attends to the prompt and itself, positions running on
      from the prompt's end, so each reward equals the one of its full sequence alone.
    `last_index` holds the flat position of each sequence's last token, where its reward is read.
    A row's identical responses (a pair whose chosen and rejected are the same text) are one sequence,
    computed once: `Preferences.index` points each at the same reward, an exact tie in every layout.
    """
    distinct, index = [], []  # each row's distinct sequences; each response's reward among all of them
    for row in rows:
        first = {}  # sequence -> its reward's position
        total = sum(map(len, distinct))
        index.append(torch.tensor([first.setdefault(tuple(s), total + len(first)) for s in row["responses"]]))
        distinct.append([list(s) for s in first])
    seqs = [s for d in distinct for s in d]
    if batching == "padded":
        inputs = pad_right(seqs, pad_id)
        width = inputs["input_ids"].shape[1]
        inputs["last_index"] = torch.tensor([i * width + len(s) - 1 for i, s in enumerate(seqs)])
    else:
        ids, positions, segments = [], [], []
        for row, row_seqs in zip(rows, distinct):
            n = len(row["prompt"]) if batching == "shared_prefix" else 0  # the ids every response begins with
            first = len(ids)
            for k, seq in enumerate(row_seqs):
                tail = seq[n:] if k else seq  # the first response carries the prompt; the others see it there
                start = len(ids)
                ids += tail
                positions += range(len(seq) - len(tail), len(seq))
                segments.append(Segment(start, len(ids), first, first + n if k else first))
        inputs = {
            "input_ids": torch.tensor(ids)[None],
            "position_ids": torch.tensor(positions)[None],
            "last_index": torch.tensor([s.end - 1 for s in segments]),
            "packed_layout": PackedLayout(segments),
        }
    index = pad_sequence(index, True, -1)
    scores = pad_sequence([torch.tensor(r["scores"], dtype=torch.float32) for r in rows], True, -torch.inf)
    margin = torch.tensor([row.get("margin", 0.0) for row in rows], dtype=torch.float32)
    return inputs, Preferences(index, scores, margin)


def pad_right(seqs: list[list[int]], pad_id: int) -> dict:
    """Sequences right-padded to the longest: input_ids and attention_mask (N, T)."""
    input_ids = pad_sequence([torch.tensor(s, dtype=torch.long) for s in seqs], True, pad_id)
    attention_mask = pad_sequence([torch.ones(len(s), dtype=torch.long) for s in seqs], True, 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def to_device(batch: tuple[dict, Preferences], device: torch.device) -> tuple[dict, Preferences]:
    """A collated batch's tensors on `device`; to a GPU from pinned memory without blocking, so the
    host goes on while it copies (the copy is queued before the kernels that read it)."""
    inputs, prefs = batch

    def move(t):
        if not torch.is_tensor(t):
            return t
        return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)

    return {k: move(v) for k, v in inputs.items()}, Preferences(*map(move, prefs))
