"""Mixer arithmetic, chat templates and tokenization, the length filter, the collator and the stream."""

import json

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from minrm.config import CHAT_TEMPLATES, parse_args
from minrm.data import toy
from minrm.data.batching import collate, stream_indices
from minrm.data.mixer import take_indices
from minrm.data.tokenizer import load_tokenizer
from tests.conftest import build_dataset, write_pairs


@pytest.mark.parametrize(
    ("amount", "expected"), [("1.0", 10), ("0.5", 5), ("3.0", 30), ("2.5", 25), ("4", 4), ("23", 23)]
)
def test_mixer_amounts(amount, expected):
    rows = take_indices(10, amount, seed=3)
    assert len(rows) == expected
    full, rest = divmod(expected, 10)
    if full == 0:  # downsampling keeps the first rows
        assert rows == list(range(expected))
    else:  # upsampling: whole copies, then a remainder without replacement
        assert rows[: 10 * full] == list(range(10)) * full
        assert len(set(rows[10 * full :])) == rest
    assert take_indices(10, amount, seed=3) == rows  # a fixed seed


def test_tokenization_applies_the_chat_template(tmp_path):
    args = parse_args([])
    tok = load_tokenizer(args)
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id  # added: the toy has none
    row = {
        "chosen": [{"role": "user", "content": "copy: red cat"}, {"role": "assistant", "content": "red cat"}],
        "rejected": [{"role": "user", "content": "copy: red cat"}, {"role": "assistant", "content": "red dog"}],
    }
    ds = datasets.Dataset.from_list([row])
    ds.to_json(path := str(tmp_path / "pair.jsonl"))
    args.dataset_mixer_list = [path, "1.0"]
    pair = build_dataset(args.dataset_mixer_list, ["train"], tok, args, "train")[0]
    chosen, rejected = pair["responses"]
    assert tok.decode(pair["prompt"]) == "<|user|>\ncopy: red cat\n<|assistant|>\n"
    assert tok.decode(chosen) == "<|user|>\ncopy: red cat\n<|assistant|>\nred cat</s>"
    assert tok.decode(rejected) == "<|user|>\ncopy: red cat\n<|assistant|>\nred dog</s>"
    assert chosen[: len(pair["prompt"])] == pair["prompt"]
    assert pair["scores"] == [1.0, 0.0] and pair["margin"] == 0.0
    assert "tulu" in CHAT_TEMPLATES


def test_length_filter_counts_what_it_drops(tmp_path, capsys):
    args = parse_args([])
    tok = load_tokenizer(args)
    rows = [
        {
            "chosen": [
                {"role": "user", "content": "copy: " + " ".join(["red"] * n)},
                {"role": "assistant", "content": " ".join(["red"] * r)},
            ],
            "rejected": [
                {"role": "user", "content": "copy: " + " ".join(["red"] * n)},
                {"role": "assistant", "content": "cat"},
            ],
        }
        for n, r in [(1, 1), (30, 1), (1, 40), (2, 2)]
    ]
    datasets.Dataset.from_list(rows).to_json(path := str(tmp_path / "pairs.jsonl"))
    args.max_prompt_token_length, args.max_token_length = 40, 60
    kept = build_dataset([path, "1.0"], ["train"], tok, args, "train")
    # Computed by hand: row 2's prompt has 30 words + 29 spaces > 40 tokens; row 3's chosen > 60.
    expected = [
        i
        for i, r in enumerate(rows)
        if len(tok.apply_chat_template(r["chosen"][:1], add_generation_prompt=True, return_dict=False)) <= 40
        and len(tok.apply_chat_template(r["chosen"], return_dict=False)) <= 60
    ]
    assert expected == [0, 3] and len(kept) == 2
    assert "4 rows, 0 bad, 2 dropped by the length filter" in capsys.readouterr().out


def test_collator_right_pads_row_by_row():
    rows = [
        {"prompt": [1], "responses": [[1, 2, 3], [1, 4]], "scores": [1.0, 0.0]},
        {"prompt": [1], "responses": [[5], [6, 7, 8, 9], [6]], "scores": [0.0, 2.0, 1.0], "margin": 0.5},
    ]
    inputs, prefs = collate(rows, 0, "padded")
    assert inputs["input_ids"].tolist() == [[1, 2, 3, 0], [1, 4, 0, 0], [5, 0, 0, 0], [6, 7, 8, 9], [6, 0, 0, 0]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert inputs["last_index"].tolist() == [2, 5, 8, 15, 16]
    assert prefs.index.tolist() == [[0, 1, -1], [2, 3, 4]]
    assert prefs.scores.tolist() == [[1.0, 0.0, float("-inf")], [0.0, 2.0, 1.0]]
    assert prefs.margin.tolist() == [0.0, 0.5]


def test_stream_spans_epochs_without_partial_batches():
    n, seed = 10, 5
    first = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    second = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    assert stream_indices(0, n, n, seed) == first
    assert stream_indices(8, 4, n, seed) == first[8:] + second[:2]  # a batch across the epoch boundary


# ----------------------------------------------------------------------------------------------
# Chat templates: the tokenizer's own by default, a named one when given

# Differs from tulu: a space after each role marker, eos after every message, no newlines.
OWN_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def tokenizer_dir(path, template: str | None) -> str:
    tok = toy.toy_tokenizer()
    tok.chat_template = template
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def eight_pairs(tmp_path_factory):
    path = write_pairs(tmp_path_factory.mktemp("data") / "eight.jsonl", 8)
    return path, [json.loads(line) for line in open(path)]


def template_ids(tok, row, template=None):
    def ids(messages, gen=False):
        return tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=gen, return_dict=False)

    responses = [ids(row["chosen"]), ids(row["rejected"])]
    return {"prompt": ids(row["chosen"][:-1], True), "responses": responses, "scores": [1.0, 0.0], "margin": 0.0}


def build_with(tiny_model_dir, path, *flags):
    args = parse_args(["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", path, "1.0", *flags])
    return build_dataset(args.dataset_mixer_list, ["train"], load_tokenizer(args), args, "train")


def test_the_tokenizers_own_template_is_the_default(tmp_path, tiny_model_dir, eight_pairs):
    path, rows = eight_pairs
    own = tokenizer_dir(tmp_path / "own", OWN_TEMPLATE)
    reference = AutoTokenizer.from_pretrained(own)
    pairs = build_with(tiny_model_dir, path, "--tokenizer_name_or_path", own)
    for pair, row in zip(pairs, rows, strict=True):
        assert pair == template_ids(reference, row)
        assert pair["responses"] != template_ids(reference, row, CHAT_TEMPLATES["tulu"])["responses"]
    # Borrowed by name: the model's tokenizer (tulu) with the template of the tokenizer at `own`.
    assert build_with(tiny_model_dir, path, "--chat_template_name", own)[:] == pairs[:]


def test_a_named_template_replaces_the_tokenizers_own(tmp_path, tiny_model_dir, eight_pairs):
    path, rows = eight_pairs
    own = tokenizer_dir(tmp_path / "own", OWN_TEMPLATE)
    pairs = build_with(tiny_model_dir, path, "--tokenizer_name_or_path", own, "--chat_template_name", "zephyr")
    tok = AutoTokenizer.from_pretrained(own)
    for pair, row in zip(pairs, rows, strict=True):
        # The zephyr format written out by hand: every message `<|role|>\ncontent</s>\n`.
        chosen = pair["responses"][0]
        assert tok.decode(chosen) == "".join(f"<|{m['role']}|>\n{m['content']}</s>\n" for m in row["chosen"])
        assert pair == template_ids(tok, row, CHAT_TEMPLATES["zephyr"])


def test_a_tokenizer_without_template_needs_a_name(tmp_path, tiny_model_dir, eight_pairs):
    path, rows = eight_pairs
    bare = tokenizer_dir(tmp_path / "bare", None)
    with pytest.raises(SystemExit) as e:
        build_with(tiny_model_dir, path, "--tokenizer_name_or_path", bare)
    assert str(e.value) == (
        f"minrm: error: the tokenizer {bare} has no chat template, and {path} holds conversations: "
        "name one with --chat_template_name (e.g. --chat_template_name tulu)"
    )
    # Plain-text rows use no template: the same tokenizer reads them.
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"chosen": "copy: red cat red cat", "rejected": "copy: red cat red dog"}) + "\n")
    assert len(build_with(tiny_model_dir, str(plain), "--tokenizer_name_or_path", bare)) == 1


def test_add_bos(tmp_path, tiny_model_dir, eight_pairs):
    path, rows = eight_pairs
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = build_with(tiny_model_dir, path, "--add_bos")
    assert pairs[0]["responses"][0] == [tok.bos_token_id] + template_ids(tok, rows[0])["responses"][0]
    with_bos = tokenizer_dir(tmp_path / "bos", "{{ bos_token }}" + OWN_TEMPLATE)
    with pytest.raises(SystemExit, match="--add_bos: the chat template already begins with the bos token"):
        build_with(tiny_model_dir, path, "--tokenizer_name_or_path", with_bos, "--add_bos")
