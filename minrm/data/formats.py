"""Preference row formats: detect one per dataset, check every row, tokenize it to one row shape
(examples of each in docs/data.md, "Row formats"; column names set by the --*_key flags).

Formats: `conversational` (each response a whole conversation; the prompt is the messages they share
before the last, which must be the assistant's), `prompt` (an explicit prompt, messages or a string; a
response's messages may repeat it or only follow it) and `plain` (texts without a chat template; the prompt
is the longest run of ids all the sequences start with). Layouts: a pair (`chosen`, `rejected`), best-of-N
(`chosen` and/or `rejected` a LIST: every chosen is preferred to every rejected) and scored (`responses`
and `scores`: i is preferred to j when its score is higher; equal scores make no comparison).
"""

import json
import math
import os

from transformers import PreTrainedTokenizerBase


def _listed(value) -> bool:
    """A list of responses (strings or message lists), not one response's list of messages."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, (str, list)) for v in value)


def detect_format(row: dict, keys: dict) -> str:
    """The format of a dataset, from its first row (`keys` maps each role to its column)."""
    first = row.get(keys["responses"]) or row.get(keys["chosen"])
    first = first[0] if _listed(first) else first  # a list of responses: the format is the first one's
    return "prompt" if keys["prompt"] in row else "plain" if isinstance(first, str) else "conversational"


def parse_row(row: dict) -> dict:
    """A JSON file's unparsed row (`{"row", "json"}` from files.py) parsed, any other row as it is."""
    if "json" not in row or len(row) > 2:
        return row
    try:
        parsed = json.loads(row["json"])
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"a line must hold a JSON object, got {type(parsed).__name__}")
    return parsed


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{what}` must be a finite number, got {str(value)[:40]!r}")
    return float(value)


def _chosen_rejected(row: dict, keys: dict) -> list[tuple[str, object, float]]:
    """A pair's or best-of-N's responses: (name, value, score), each chosen (1.0) before each rejected (0.0)."""
    # A chosen equal to a rejected is kept, as the reference keeps it: a tie (batching.collate).
    out = []
    for side, score in (("chosen", 1.0), ("rejected", 0.0)):
        if (value := row.get(keys[side])) is None:
            raise ValueError(f"missing `{keys[side]}`")
        many = _listed(value)  # its name is then its column and index: `rejected[2]`
        out += [(f"{keys[side]}[{i}]" if many else keys[side], v, score) for i, v in enumerate(value if many else [value])]
    return out


def _scored(row: dict, keys: dict) -> list[tuple[str, object, float]]:
    """A scored row's responses, (name, value, score) in its order, when they make at least one comparison."""
    values, scores, what = row[keys["responses"]], row.get(keys["scores"]), keys["scores"]
    if not isinstance(values, list) or not values:
        raise ValueError(f"`{keys['responses']}` must be a non-empty list of responses")
    if not isinstance(scores, list):
        raise ValueError(f"missing `{what}`" if scores is None else f"`{what}` must be a list of numbers, got {type(scores).__name__}")
    if len(scores) != len(values):
        raise ValueError(f"`{what}` has {len(scores)} numbers for {len(values)} responses")
    scores = [_number(s, f"{what}[{i}]") for i, s in enumerate(scores)]
    if len(scores) == 1:
        raise ValueError("no comparison: one response (a row needs two with different scores)")
    if len(set(scores)) == 1:
        raise ValueError(f"no comparison: all {len(scores)} responses have the same score ({scores[0]:g})")
    return [(f"{keys['responses']}[{i}]", value, score) for i, (value, score) in enumerate(zip(values, scores))]


def _messages(value, what: str, role: str | None) -> list[dict]:
    """A list of {"role", "content"} messages, or (given a role) a string as one message of that role."""
    if isinstance(value, str) and role:
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise ValueError(f"`{what}` must be a list of messages{' or a string' if role else ''}, got {type(value).__name__}")
    if not value:
        raise ValueError(f"`{what}` is an empty conversation")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"`{what}` message {i} is not a {{'role', 'content'}} dict: {str(m)[:80]}")
        if not isinstance(m["content"], str):
            raise ValueError(f"`{what}` message {i} has non-text content ({type(m['content']).__name__})")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _chat_ids(row: dict, fmt: str, keys: dict, responses: list, tokenizer) -> tuple[list[int], list[list[int]]]:
    """The prompt's ids (with the generation prompt) and each response's, a whole conversation, by the chat template."""
    if fmt == "prompt" and row.get(keys["prompt"]) is None:
        raise ValueError(f"missing `{keys['prompt']}`")
    role = "assistant" if fmt == "prompt" else None  # strings are responses only beside a prompt
    names, conversations = [n for n, _, _ in responses], [_messages(v, n, role) for n, v, _ in responses]
    if fmt == "prompt":
        prompt = _messages(row[keys["prompt"]], keys["prompt"], "user")
        # A response may repeat the prompt (a whole conversation) or continue it.
        conversations = [c if c[: len(prompt)] == prompt else prompt + c for c in conversations]
    else:
        prompt = conversations[0][:-1]
        if other := next((n for n, c in zip(names, conversations) if c[:-1] != prompt), None):
            raise ValueError(f"{names[0]} and {other} have different prompts (messages before the last differ)")
    for name, c in zip(names, conversations):
        if len(c) == len(prompt):
            raise ValueError(f"`{name}` has no response after the prompt")
        if c[-1]["role"] != "assistant":
            raise ValueError(f"the last message of `{name}` is the {c[-1]['role']!r}'s, not the assistant's")
    ids = tokenizer.apply_chat_template(conversations, return_dict=False)  # all in one call
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False), ids


def _plain_ids(responses: list, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[list[int]]]:
    """Each text as `tokenizer(text)` (bos where the tokenizer adds it) plus eos unless it ends with one; the
    prompt is the longest run of ids they all start with."""
    for name, text, _ in responses:
        if not isinstance(text, str):
            raise ValueError(f"`{name}` must be a string in a plain-text dataset, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"`{name}` is empty")
    eos, texts = tokenizer.eos_token_id, [text for _, text, _ in responses]
    ids = [s if s and s[-1] == eos else s + [eos] for s in tokenizer(texts)["input_ids"]]
    return os.path.commonprefix(ids), ids  # commonprefix compares lists element by element


def tokenize_row(row: dict, fmt: str, keys: dict, tokenizer: PreTrainedTokenizerBase, extra: dict | None = None) -> dict:
    """One row (`parse_row`'s input) to the prompt's ids, each response's whole sequence and score, the `margin`,
    `problem` (a bad row's, in words; its ids empty) and the `extra` columns ({name: column}, as text or None)."""
    parsed = {}
    try:
        parsed = parse_row(row)
        responses = _scored(parsed, keys) if parsed.get(keys["responses"]) is not None else _chosen_rejected(parsed, keys)
        margin = 0.0 if parsed.get(keys["margin"]) is None else _number(parsed[keys["margin"]], keys["margin"])
        prompt, ids = _plain_ids(responses, tokenizer) if fmt == "plain" else _chat_ids(parsed, fmt, keys, responses, tokenizer)
        out = {"prompt": prompt, "responses": ids, "scores": [s for _, _, s in responses], "margin": margin, "problem": ""}
    except ValueError as e:
        out = {"prompt": [], "responses": [], "scores": [], "margin": 0.0, "problem": str(e)}
    return out | {name: None if parsed.get(col) is None else str(parsed[col]) for name, col in (extra or {}).items()}
