"""Preference row formats: detect one per dataset, check every row, tokenize to one triple.

Three formats are accepted (column names changeable with --chosen_key/--rejected_key/--prompt_key):

- `conversational`: `{"chosen": [messages], "rejected": [messages]}`; the prompt is the messages
  both share before the last, which must be the assistant's (Tulu).
- `prompt`: `{"prompt": [messages] | str, "chosen": [messages] | str, "rejected": ...}`. A string
  prompt is one user message, a string response one assistant message. A response list may hold
  the whole conversation (it starts with the prompt) or only what follows the prompt.
- `plain`: `{"chosen": str, "rejected": str}`, full texts with no chat template. Each text is
  `tokenizer(text)` (so bos where the tokenizer adds it by default) plus eos when the tokenizer did
  not put one last; the prompt is the longest run of token ids both sequences start with.

Every format ends as `{"prompt", "chosen", "rejected"}` id lists, with `chosen` and `rejected`
the whole sequences, so the rest of the trainer never sees the difference. A row that breaks a
rule is not tokenized: `problem` says what is wrong, in words.

For scoring (`minrm.score`), `rejected` may hold a LIST of responses (best-of-N rows: strings,
message lists, or plain texts) and `chosen` a list of one; such a row tokenizes to
`{"prompt", "responses"}`, the chosen sequence first. Training takes one rejected response per row.
"""

import json

from transformers import PreTrainedTokenizerBase

FORMATS = ("conversational", "prompt", "plain")

# Named chat templates. `tulu` is the Tulu 3 format: the last assistant turn ends with eos and
# no newline, so the reward is read at the eos token.
CHAT_TEMPLATES = {
    "tulu": (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ '<|system|>\n' + m['content'] + '\n' }}"
        "{% elif m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + '\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ '<|assistant|>\n' + m['content'] + eos_token }}"
        "{% if not loop.last %}{{ '\n' }}{% endif %}{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
        "{% endfor %}"
    ),
    "zephyr": (
        "{% for m in messages %}"
        "{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
        "{% endfor %}"
    ),
    "simple_chat": (
        "{% for m in messages %}"
        "{{ '\n\n' if not loop.first else '' }}{{ m['role'].capitalize() + ': ' + m['content'] }}"
        "{% if loop.last and not add_generation_prompt %}{{ eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}


def detect_format(row: dict, keys: dict) -> str:
    """The format of a dataset, from its first row (`keys` maps chosen/rejected/prompt to columns)."""
    if keys["prompt"] in row:
        return "prompt"
    return "plain" if isinstance(row.get(keys["chosen"]), str) else "conversational"


def _messages(value, what: str, default_role: str | None) -> list[dict]:
    """A list of {"role", "content"} messages, or (with a default role) a string as one message."""
    if isinstance(value, str) and default_role:
        value = [{"role": default_role, "content": value}]
    if not isinstance(value, list):
        raise ValueError(
            f"`{what}` must be a list of messages{' or a string' if default_role else ''}, got {type(value).__name__}"
        )
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


def _response_values(row: dict, keys: dict, many: bool) -> list[tuple[str, object]]:
    """(name, value) of each response, chosen first. With `many`, `rejected` may hold a list of
    responses (strings or message lists) and `chosen` a list of one (RewardBench 2's form)."""

    def listed(value) -> bool:  # a list of responses, not one response's list of messages
        return many and isinstance(value, list) and bool(value) and all(isinstance(v, (str, list)) for v in value)

    chosen, rejected = row[keys["chosen"]], row[keys["rejected"]]
    if listed(chosen):
        if len(chosen) != 1:
            raise ValueError(f"`{keys['chosen']}` holds {len(chosen)} responses; a row has one chosen response")
        chosen = chosen[0]
    out = [(keys["chosen"], chosen)]
    if listed(rejected):
        return out + [(f"{keys['rejected']}[{i}]", value) for i, value in enumerate(rejected)]
    return out + [(keys["rejected"], rejected)]


def _conversations(row: dict, fmt: str, keys: dict, many: bool = False) -> tuple[list, list[list]]:
    """(prompt, [chosen, *rejected]) messages, each response a whole conversation; raises ValueError."""
    for k in ("chosen", "rejected") + (("prompt",) if fmt == "prompt" else ()):
        if row.get(keys[k]) is None:
            raise ValueError(f"missing `{keys[k]}`")
    role = "assistant" if fmt == "prompt" else None  # strings are responses only beside a prompt
    names, values = zip(*_response_values(row, keys, many))
    responses = [_messages(value, name, role) for name, value in zip(names, values)]
    if fmt == "prompt":
        prompt = _messages(row[keys["prompt"]], keys["prompt"], "user")
        # A response may repeat the prompt (a whole conversation) or continue it.
        responses = [conv if conv[: len(prompt)] == prompt else prompt + conv for conv in responses]
    else:
        prompt = responses[0][:-1]
        for name, conv in zip(names[1:], responses[1:]):
            if conv[:-1] != prompt:
                raise ValueError(
                    f"chosen and {_label(name, keys)} have different prompts (messages before the last differ)"
                )
    for name, conv in zip(names, responses):
        if len(conv) == len(prompt):
            raise ValueError(f"`{name}` has no response after the prompt")
        if conv[-1]["role"] != "assistant":
            raise ValueError(f"the last message of `{name}` is the {conv[-1]['role']!r}'s, not the assistant's")
    _check_distinct(responses, names, keys)
    return prompt, responses


def _label(name: str, keys: dict) -> str:
    """`rejected`, or `rejected[i]` in a list: what the messages call a rejected response."""
    return "rejected" + name[len(keys["rejected"]) :]


def _check_distinct(responses: list, names: tuple, keys: dict) -> None:
    for name, response in zip(names[1:], responses[1:]):
        if response == responses[0]:
            raise ValueError(f"chosen and {_label(name, keys)} are identical")


def _plain_ids(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = tokenizer(text)["input_ids"]
    return ids if ids and ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id]


def _plain(row: dict, keys: dict, tokenizer: PreTrainedTokenizerBase, many: bool = False) -> dict:
    for k in ("chosen", "rejected"):
        if row.get(keys[k]) is None:
            raise ValueError(f"missing `{keys[k]}`")
    names, texts = zip(*_response_values(row, keys, many))
    for name, value in zip(names, texts):
        if not isinstance(value, str):
            raise ValueError(f"`{name}` must be a string in a plain-text dataset, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"`{name}` is empty")
    _check_distinct(texts, names, keys)
    responses = [_plain_ids(text, tokenizer) for text in texts]
    shared = 0
    while shared < min(map(len, responses)) and len({r[shared] for r in responses}) == 1:
        shared += 1
    return {"prompt": responses[0][:shared], "responses": responses}


def tokenize_responses(row: dict, fmt: str, keys: dict, tokenizer: PreTrainedTokenizerBase, many: bool = True) -> dict:
    """One row to `{"prompt", "responses", "problem"}`: `responses` the chosen sequence, then each
    rejected one (a list of them where `rejected` holds a list and `many` allows it: best-of-N rows
    for minrm.score), all whole sequences. A bad row gets empty ids and a problem.

    A row read from a .jsonl file arrives unparsed as `{"json": line}`, so that rows of mixed types
    (which Arrow cannot hold in one column) and invalid JSON are reported rather than fatal.
    """
    try:
        if "json" in row and len(row) <= 2:  # {"json", "row"} from read_jsonl
            try:
                row = json.loads(row["json"])
            except json.JSONDecodeError as e:
                raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"a line must hold a JSON object, got {type(row).__name__}")
        if fmt == "plain":
            out = _plain(row, keys, tokenizer, many)
            return {**out, "scores": [1.0] + [0.0] * (len(out["responses"]) - 1), "problem": ""}
        prompt, responses = _conversations(row, fmt, keys, many)

        def ids(messages, generation_prompt=False):
            return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, return_dict=False)

        responses = [ids(r) for r in responses]
        scores = [1.0] + [0.0] * (len(responses) - 1)
        return {"prompt": ids(prompt, generation_prompt=True), "responses": responses, "scores": scores, "problem": ""}
    except ValueError as e:
        return {"prompt": [], "responses": [], "scores": [], "problem": str(e)}


def tokenize_row(row: dict, fmt: str, keys: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
    """One row to a training pair `{"prompt", "responses", "scores", "margin", "problem"}`: one rejected response."""
    return {**tokenize_responses(row, fmt, keys, tokenizer, many=False), "margin": 0.0}
