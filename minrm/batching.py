"""From tokenized pairs to model input: the collator (padded, packed and shared_prefix layouts),
the cut of a step's pairs into micro-batches (by count or by a token budget), and the move to the
device.

A pair is `{"prompt", "chosen", "rejected"}` id lists (`data.py`), `chosen` and `rejected` whole
sequences. docs/batching.md says what each layout computes and why the rewards are the same.
"""

import datasets
import numpy as np
import pyarrow.compute as pc
import torch

from minrm.config import BATCHINGS


def collate(pairs: list[dict], pad_id: int, batching: str = "padded") -> dict:
    """One micro-batch for the model; its rewards come out chosen (B,) then rejected (B,).

    - `padded`: chosen then rejected sequences right-padded to the longest: input_ids and
      attention_mask (2B, T), as the reference does.
    - `packed`: the 2B sequences end to end in one row (1, L) without padding, positions restarting
      per sequence; a token attends only within its sequence.
    - `shared_prefix`: each pair laid out once as prompt + chosen response + rejected response; both
      responses attend to the prompt, the rejected one not to the chosen one, and its positions
      continue from the prompt's end, so each reward equals the one of the full sequence alone.
    Packed modes carry `segments`, who attends to whom: (q_start, q_end, key spans) for each span of
    queries (`segment_keys`), `key_ranges` (3, L), the same per query (`query_key_ranges`), and
    `last_index` (2B,): the flat positions to read rewards at.
    """
    if batching == "padded":
        return pad_right([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)
    if batching not in BATCHINGS:
        raise ValueError(f"unknown batching {batching!r}; choose one of {BATCHINGS}")
    ids, pos, segments = [], [], []
    ends = {"chosen": [], "rejected": []}

    def add(tokens: list[int], first_pos: int) -> tuple[int, int]:
        """Append tokens, positions from first_pos; their span of the row."""
        ids.extend(tokens)
        pos.extend(range(first_pos, first_pos + len(tokens)))
        return len(ids) - len(tokens), len(ids)

    if batching == "packed":
        for side in ("chosen", "rejected"):
            for p in pairs:
                s, e = add(p[side], 0)
                segments.append((s, e, ((s, e),)))
                ends[side].append(e - 1)
    else:
        for p in pairs:
            n = shared_prefix_length(p)
            s, _ = add(p["chosen"][:n], 0)  # seen by both responses
            _, a = add(p["chosen"][n:], n)
            _, e = add(p["rejected"][n:], n)
            segments.append((s, a, ((s, a),)))  # prompt + chosen response: causal
            segments.append((a, e, ((s, s + n), (a, e)) if n else ((a, e),)))  # rejected: prompt and itself
            ends["chosen"].append(a - 1)
            ends["rejected"].append(e - 1)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long)[None],
        "position_ids": torch.tensor(pos, dtype=torch.long)[None],
        "last_index": torch.tensor(ends["chosen"] + ends["rejected"], dtype=torch.long),
        "segments": segments,
        "key_ranges": query_key_ranges(segments),
    }


def pad_right(seqs: list[list[int]], pad_id: int) -> dict:
    """Sequences right-padded to the longest: input_ids and attention_mask (N, T)."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def segment_keys(segment: tuple) -> tuple[int, int, int]:
    """(own, shared_start, shared_end) of a segment (q_start, q_end, key_spans): its queries see
    the keys [own, q] of their own span, which ends with them, and all of [shared_start,
    shared_end), an earlier span (a rejected response's prompt; empty when there is none), as if
    the two spans were laid end to end (positions, and so sliding windows, run on across them)."""
    q0, q1, spans = segment
    if len(spans) == 2 and spans[0][1] == spans[1][0]:  # two adjacent spans are one
        spans = ((spans[0][0], spans[1][1]),)
    *shared, (own, end) = spans
    if end != q1 or own > q0 or len(shared) > 1 or (shared and not shared[0][0] < shared[0][1] < own):
        raise ValueError(
            f"segment {segment}: packed attention takes a key span that ends with the queries, "
            "after at most one earlier span"
        )
    return own, *(shared[0] if shared else (0, 0))


def query_key_ranges(segments: list[tuple]) -> torch.Tensor:
    """`segment_keys` for each query of a packed row, (3, L) int64 on the host: rows own,
    shared_start, shared_end. The FlexAttention and dense masks read these per query; built here,
    with the batch, rather than on the device per forward."""
    lengths = [q1 - q0 for q0, q1, _ in segments]
    ranges = np.array([segment_keys(s) for s in segments], dtype=np.int64).reshape(-1, 3)
    return torch.from_numpy(np.repeat(ranges, lengths, axis=0).T.copy())


def shared_prefix_length(pair: dict) -> int:
    """How many leading tokens a pair's two sequences can share: the prompt's ids when they are a
    prefix of both conversations (and leave each a non-empty response), else 0 (the pair falls back
    to two full sequences, as when a chat template renders the prompt differently)."""
    return prefix_length(pair["prompt"], (pair["chosen"], pair["rejected"]))


def prefix_length(prompt: list[int], seqs) -> int:
    """len(prompt) when the prompt's ids start every sequence and leave each a non-empty response, else 0."""
    n = len(prompt)
    return n if all(len(s) > n and s[:n] == prompt for s in seqs) else 0


def micro_batches(pairs: list[dict], size: int, max_tokens: int | None, batching: str) -> list[list[dict]]:
    """Cut one step's pairs (in order) into micro-batches: `size` pairs each, or, given a token
    budget, as few as keep each within `max_tokens` computed tokens (padding included: 2 x pairs x
    longest when padded). A pair over the budget by itself goes alone (`check_token_budget` refuses
    such data up front). The loss and gradient are means over the step's pairs, whatever the cut."""
    if not max_tokens:
        return [pairs[i : i + size] for i in range(0, len(pairs), size)]
    out, chunk, packed, longest = [], [], 0, 0  # packed: the chunk's tokens laid end to end
    for p in pairs:
        c, r = len(p["chosen"]), len(p["rejected"])
        own = c + r - (shared_prefix_length(p) if batching == "shared_prefix" else 0)
        grown = 2 * (len(chunk) + 1) * max(longest, c, r) if batching == "padded" else packed + own
        if chunk and grown > max_tokens:
            out.append(chunk)
            chunk, packed, longest = [], 0, 0
        chunk.append(p)
        packed, longest = packed + own, max(longest, c, r)
    return out + [chunk] if chunk else out


def split_to(chunks: list[list[dict]], k: int) -> list[list[dict]]:
    """`k` micro-batches from `chunks` (k >= len(chunks)), halving the largest until there are k,
    then adding empty ones when too few pairs are left to halve: under FSDP every rank must run the
    same number of forward passes (an empty one runs weightless, see evaluate.py)."""
    chunks = list(chunks)
    while len(chunks) < k:
        i = max(range(len(chunks)), key=lambda j: len(chunks[j]))
        half = len(chunks[i]) // 2
        chunks[i : i + 1] = [chunks[i][:half], chunks[i][half:]] if half else [chunks[i], []]
    return chunks


def check_token_budget(ds: datasets.Dataset | None, max_tokens: int | None, batching: str, what: str) -> None:
    """Refuse, before training, a --max_tokens_per_batch that the longest pair alone exceeds."""
    if not max_tokens or ds is None:
        return
    table = ds.with_format("arrow")[:]
    c, r, p = (pc.list_value_length(table[k]).to_numpy() for k in ("chosen", "rejected", "prompt"))
    need = {"padded": 2 * np.maximum(c, r), "packed": c + r, "shared_prefix": c + r - p}[batching]
    i = int(need.argmax())
    if need[i] > max_tokens:
        raise SystemExit(
            f"minrm: error: --max_tokens_per_batch {max_tokens} is below the {need[i]} tokens that {what} pair "
            f"{i} needs with --batching {batching}; raise the budget or lower --max_token_length."
        )


def device_batch(pairs: list[dict], pad_id: int, batching: str, device: torch.device) -> dict:
    """`collate`, moved to the device: what train.py and evaluate.py feed the model."""
    return batch_to_device(collate(pairs, pad_id, batching), device)


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch's tensors on `device` (`to_device`), its other entries as they are."""
    return {k: to_device(v, device) if torch.is_tensor(v) else v for k, v in batch.items()}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU from pinned memory without blocking, so the host goes on
    while it copies (the copy is queued before the kernels that read it)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------
# Rows of N responses (minrm.score): {"prompt", "responses"}, each response a whole sequence


def collate_responses(rows: list[dict], pad_id: int, batching: str) -> dict:
    """One batch of rows with any number of responses; its rewards come out row by row, each row's
    responses in order. The layouts are collate's: `padded` (every sequence right-padded), `packed`
    (sequences end to end), `shared_prefix` (one row per prompt: prompt + response 1 + ... +
    response N; response 1 continues the prompt causally, each later one attends to the prompt and
    itself with positions continuing from the prompt's end). With two responses, shared_prefix lays
    a row out as collate lays out a pair.
    """
    if batching == "padded":
        return pad_right([s for row in rows for s in row["responses"]], pad_id)
    ids, pos, segments, ends = [], [], [], []
    for row in rows:
        n = prefix_length(row["prompt"], row["responses"]) if batching == "shared_prefix" else 0
        s = len(ids)
        for i, seq in enumerate(row["responses"]):
            tail = seq if n == 0 or i == 0 else seq[n:]  # the first response carries the prompt
            a = len(ids)
            ids.extend(tail)
            pos.extend(range(len(seq) - len(tail), len(seq)))
            e = len(ids)
            segments.append((a, e, ((s, s + n), (a, e)) if n and i else ((a, e),)))
            ends.append(e - 1)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long)[None],
        "position_ids": torch.tensor(pos, dtype=torch.long)[None],
        "last_index": torch.tensor(ends, dtype=torch.long),
        "segments": segments,
        "key_ranges": query_key_ranges(segments),
    }


def row_tokens(row: dict, batching: str) -> int:
    """Tokens a row of N responses costs alone: N x longest padded, the sum packed, the sum less
    N - 1 prompts in shared_prefix."""
    lengths = [len(s) for s in row["responses"]]
    if batching == "padded":
        return len(lengths) * max(lengths)
    shared = prefix_length(row["prompt"], row["responses"]) if batching == "shared_prefix" else 0
    return sum(lengths) - (len(lengths) - 1) * shared


def token_batches(rows: list[dict], max_tokens: int, batching: str) -> list[list[int]]:
    """The rows' indices sorted longest first and cut into batches of at most `max_tokens` computed
    tokens (padded: sequences x the batch's longest). Similar lengths side by side waste little
    padding; the longest batch first fails fast when the budget is too large for the memory. A row
    over the budget by itself goes alone."""
    cost = [row_tokens(row, batching) for row in rows]
    out, chunk, total, seqs, longest = [], [], 0, 0, 0
    for i in sorted(range(len(rows)), key=cost.__getitem__, reverse=True):
        n, width = len(rows[i]["responses"]), max(map(len, rows[i]["responses"]))
        grown = (seqs + n) * max(longest, width) if batching == "padded" else total + cost[i]
        if chunk and grown > max_tokens:
            out.append(chunk)
            chunk, total, seqs, longest = [], 0, 0, 0
        chunk.append(i)
        total, seqs, longest = total + cost[i], seqs + n, max(longest, width)
    return out + [chunk] if chunk else out
