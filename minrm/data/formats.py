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

FORMATS = ("conversational", "prompt", "plain")

def _listed(value) -> bool:
    """A list of responses (strings or message lists), not one response's list of messages."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, (str, list)) for v in value)


def detect_format(row: dict, keys: dict) -> str:
    """The format of a dataset, from its first row (`keys` maps each role to its column)."""
    if keys["prompt"] in row:
        return "prompt"
    first = row.get(keys["responses"]) or row.get(keys["chosen"])
    first = first[0] if _listed(first) else first  # a list of responses: the format is the first one's
    return "plain" if isinstance(first, str) else "conversational"


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{what}` must be a finite number, got {str(value)[:40]!r}")
    return float(value)


def _responses(row: dict, keys: dict) -> tuple[list[str], list[str], list, list[float]]:
    """Each response's name (its column, `rejected[2]`), label (its role, for messages that compare
    two), value and score, in the row's order (chosen first in a pair or best-of-N)."""
    if row.get(keys["responses"]) is not None:
        values, scores = row[keys["responses"]], row.get(keys["scores"])
        if not isinstance(values, list) or not values:
            raise ValueError(f"`{keys['responses']}` must be a non-empty list of responses")
        if scores is None:
            raise ValueError(f"missing `{keys['scores']}`")
        if not isinstance(scores, list):
            raise ValueError(f"`{keys['scores']}` must be a list of numbers, got {type(scores).__name__}")
        if len(scores) != len(values):
            raise ValueError(f"`{keys['scores']}` has {len(scores)} numbers for {len(values)} responses")
        scores = [_number(s, f"{keys['scores']}[{i}]") for i, s in enumerate(scores)]
        names = [f"{keys['responses']}[{i}]" for i in range(len(values))]
        return names, [f"responses[{i}]" for i in range(len(values))], values, scores
    names, labels, values, scores = [], [], [], []
    for side, score in (("chosen", 1.0), ("rejected", 0.0)):
        if (value := row.get(keys[side])) is None:
            raise ValueError(f"missing `{keys[side]}`")
        many = _listed(value)
        for i, v in enumerate(value if many else [value]):
            names.append(f"{keys[side]}[{i}]" if many else keys[side])
            labels.append(f"{side}[{i}]" if many else side)
            values.append(v)
            scores.append(score)
    return names, labels, values, scores


def _messages(value, what: str, default_role: str | None) -> list[dict]:
    """A list of {"role", "content"} messages, or (with a default role) a string as one message."""
    if isinstance(value, str) and default_role:
        value = [{"role": default_role, "content": value}]
    if not isinstance(value, list):
        either = " or a string" if default_role else ""
        raise ValueError(f"`{what}` must be a list of messages{either}, got {type(value).__name__}")
    if not value:
        raise ValueError(f"`{what}` is an empty conversation")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"`{what}` message {i} is not a {{'role', 'content'}} dict: {str(m)[:80]}")
        if not isinstance(m["content"], str):
            raise ValueError(f"`{what}` message {i} has non-text content ({type(m['content']).__name__})")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _conversations(row: dict, fmt: str, keys: dict, names: list, labels: list, values: list) -> tuple[list, list]:
    """(prompt, responses) as messages, each response a whole conversation; raises ValueError."""
    role = "assistant" if fmt == "prompt" else None  # strings are responses only beside a prompt
    if fmt == "prompt" and row.get(keys["prompt"]) is None:
        raise ValueError(f"missing `{keys['prompt']}`")
    responses = [_messages(value, name, role) for name, value in zip(names, values)]
    if fmt == "prompt":
        prompt = _messages(row[keys["prompt"]], keys["prompt"], "user")
        # A response may repeat the prompt (a whole conversation) or continue it.
        responses = [conv if conv[: len(prompt)] == prompt else prompt + conv for conv in responses]
    else:
        prompt = responses[0][:-1]
        for label, conv in zip(labels[1:], responses[1:]):
            if conv[:-1] != prompt:
                raise ValueError(f"{labels[0]} and {label} have different prompts (messages before the last differ)")
    for name, conv in zip(names, responses):
        if len(conv) == len(prompt):
            raise ValueError(f"`{name}` has no response after the prompt")
        if conv[-1]["role"] != "assistant":
            raise ValueError(f"the last message of `{name}` is the {conv[-1]['role']!r}'s, not the assistant's")
    return prompt, responses


def _texts(names: list, values: list) -> list[str]:
    for name, value in zip(names, values):
        if not isinstance(value, str):
            raise ValueError(f"`{name}` must be a string in a plain-text dataset, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"`{name}` is empty")
    return values


def _check_comparisons(scores: list[float]) -> None:
    """A row compares at least two responses. Two identical responses ranked apart (a pair whose chosen and
    rejected are the same text) are kept, as the reference keeps them: a tie (batching.collate)."""
    if len(set(scores)) < 2:
        if len(scores) == 1:
            raise ValueError("no comparison: one response (a row needs two with different scores)")
        raise ValueError(f"no comparison: all {len(scores)} responses have the same score ({scores[0]:g})")


def _plain_ids(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[list[int]]]:
    """Each text as `tokenizer(text)` (bos where the tokenizer adds it) plus eos unless it ends with one."""
    eos = tokenizer.eos_token_id
    responses = [ids if ids and ids[-1] == eos else ids + [eos] for ids in tokenizer(texts)["input_ids"]]
    return os.path.commonprefix(responses), responses  # commonprefix compares lists element by element


def parse_row(row: dict) -> dict:
    """A row as a dict: a JSON file's unparsed line (`{"json", "row"}` from files.py) parsed, any other
    row as it is; ValueError, in words, when the line is not a JSON object."""
    if "json" not in row or len(row) > 2:
        return row
    try:
        parsed = json.loads(row["json"])
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"a line must hold a JSON object, got {type(parsed).__name__}")
    return parsed


def tokenize_row(row: dict, fmt: str, keys: dict, tokenizer: PreTrainedTokenizerBase, extra: dict | None = None) -> dict:
    """One row (`parse_row`'s input) to the prompt's ids, each response's whole sequence, its score (1.0
    chosen, 0.0 rejected), the `margin` (0.0 when none), `problem` (a bad row's, in words; its ids empty)
    and the `extra` columns ({name: column}, as text or None). Training and the scorer read rows through
    this one function."""
    out = {name: None for name in extra or {}}
    try:
        row = parse_row(row)
        out |= {name: None if row.get(column) is None else str(row[column]) for name, column in (extra or {}).items()}
        names, labels, values, scores = _responses(row, keys)
        margin = 0.0 if row.get(keys["margin"]) is None else _number(row[keys["margin"]], keys["margin"])
        if fmt == "plain":
            texts = _texts(names, values)
            _check_comparisons(scores)
            prompt, responses = _plain_ids(texts, tokenizer)
        else:
            prompt_messages, conversations = _conversations(row, fmt, keys, names, labels, values)
            _check_comparisons(scores)
            prompt = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, return_dict=False)
            responses = tokenizer.apply_chat_template(conversations, return_dict=False)  # all in one call
        return out | {"prompt": prompt, "responses": responses, "scores": scores, "margin": margin, "problem": ""}
    except ValueError as e:
        return out | {"prompt": [], "responses": [], "scores": [], "margin": 0.0, "problem": str(e)}
