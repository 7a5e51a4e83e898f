"""Row formats, bad-row reports, the mixer with checks, and the tokenized-dataset cache."""

import json
import os
import re
from pathlib import Path

import pytest

from minrm.config import parse_args
from minrm.data.cache import build_datasets, cache_key
from minrm.data.mixer import show_pair, take_indices
from minrm.data.tokenizer import load_tokenizer
from tests.conftest import build_dataset, run_minrm, run_minrm_here


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows: list) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def build(path: str, *flags: str):
    args = parse_args(["--dataset_mixer_list", path, "1.0", *flags])
    return build_dataset(args.dataset_mixer_list, ["train"], load_tokenizer(args), args, "train")


CONVERSATION = {"chosen": [user("copy: red cat"), bot("red cat")], "rejected": [user("copy: red cat"), bot("red dog")]}


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": [user("copy: red cat")], "chosen": [bot("red cat")], "rejected": [bot("red dog")]},
        {"prompt": "copy: red cat", "chosen": "red cat", "rejected": "red dog"},
        {"prompt": [user("copy: red cat")], **CONVERSATION},  # responses that repeat the prompt
        {"question": "copy: red cat", "good": "red cat", "bad": "red dog"},
    ],
)
def test_explicit_prompt_rows_tokenize_like_the_conversation(tmp_path, row):
    flags = ["--prompt_key", "question", "--chosen_key", "good", "--rejected_key", "bad"] if "good" in row else []
    expected = build(write_jsonl(tmp_path / "conv.jsonl", [CONVERSATION]))[0]
    assert build(write_jsonl(tmp_path / "row.jsonl", [row]), *flags)[0] == expected


def test_plain_text_rows_tokenize_as_the_tokenizer_does(tmp_path, capsys):
    path = write_jsonl(
        tmp_path / "plain.jsonl", [{"chosen": "copy: red cat red cat", "rejected": "copy: red cat red dog"}]
    )
    pair = build(path)[0]
    tok = load_tokenizer(parse_args([]))
    chosen = tok("copy: red cat red cat")["input_ids"]
    assert pair["responses"][0] == chosen + [tok.eos_token_id]  # the toy tokenizer adds no eos itself
    assert pair["responses"][1] == tok("copy: red cat red dog")["input_ids"] + [tok.eos_token_id]
    assert pair["prompt"] == chosen[:-1]  # the longest shared run of ids
    assert "format 'plain'" in capsys.readouterr().out


BAD = [
    ({"rejected": [user("a"), bot("b")]}, "missing `chosen`"),
    ({"chosen": [user("a"), bot("b")], "rejected": "b"}, "must be a list of messages"),
    ({"chosen": [], "rejected": [user("a"), bot("b")]}, "empty conversation"),
    ({"chosen": [user("a"), user("b")], "rejected": [user("a"), bot("b")]}, "not the assistant's"),
    ({"chosen": [user("a"), bot("b")], "rejected": [user("c"), bot("b")]}, "different prompts"),
    (
        {
            "chosen": [user("a"), {"role": "assistant", "content": [{"type": "image"}]}],
            "rejected": [user("a"), bot("b")],
        },
        "non-text content",
    ),
    ('{"chosen": [', "invalid JSON"),
]


def test_every_bad_row_kind_is_named_with_file_and_line(tmp_path):
    rows = [CONVERSATION] + [row for row, _ in BAD] + [CONVERSATION]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SystemExit) as e:
        build(path)
    message = str(e.value)
    assert f"{len(BAD)} bad rows" in message
    for line, (_, why) in enumerate(BAD, start=2):
        assert f"{path} line {line}: " in message and why in message, why
    # --skip_bad_rows keeps the good rows and counts the others by reason.
    assert len(build(path, "--skip_bad_rows")) == 2


def test_skip_bad_rows_counts_per_reason(tmp_path, capsys):
    other = {"chosen": [user("a"), bot("b")], "rejected": [user("c"), bot("b")]}
    path = write_jsonl(tmp_path / "bad.jsonl", [CONVERSATION, other, other, "{oops"])
    build(path, "--skip_bad_rows")
    out = capsys.readouterr().out
    assert "skipped 2 bad rows: chosen and rejected have different prompts" in out
    assert "skipped 1 bad rows: invalid JSON" in out
    assert "4 rows, 3 bad, 0 dropped by the length filter" in out and "1 kept" in out


# ----------------------------------------------------------------------------------------------
# Rows of K responses: best-of-N lists, scored lists, margins, and what makes a comparison

SYSTEM = {"role": "system", "content": "be exact"}
ANSWERS = ["red cat", "red dog", "cat red", "dog"]


def build_rows(path: str, **settings):
    """`build` with attributes set on the parsed flags (flags another part of minrm declares)."""
    args = parse_args(["--dataset_mixer_list", path, "1.0"])
    for name, value in settings.items():
        setattr(args, name, value)
    return build_dataset(args.dataset_mixer_list, ["train"], load_tokenizer(args), args, "train")


def expected_row(tok, prompt: list, answers: list[str], scores: list[float], margin: float = 0.0) -> dict:
    """The ids of each full conversation and of the prompt, by the chat template itself."""
    conversations = [prompt + [bot(a)] for a in answers]
    return {
        "prompt": tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False),
        "responses": [tok.apply_chat_template(c, return_dict=False) for c in conversations],
        "scores": scores,
        "margin": margin,
    }


@pytest.mark.parametrize("system", [False, True])
def test_every_spelling_of_k_responses_tokenizes_as_each_conversation(tmp_path, system):
    prompt = ([SYSTEM] if system else []) + [user("copy: red cat")]
    whole = [prompt + [bot(a)] for a in ANSWERS]
    text = prompt if system else "copy: red cat"  # a string prompt is one user message
    rows = [
        # conversational best-of-N: one chosen conversation, a list of rejected ones
        ({"chosen": whole[0], "rejected": whole[1:]}, ANSWERS, [1.0, 0.0, 0.0, 0.0]),
        # conversational, scored (equal scores make no comparison between those two)
        ({"responses": whole, "scores": [2, 5, 2, -1.5], "margin": 0.5}, ANSWERS, [2.0, 5.0, 2.0, -1.5], 0.5),
        # explicit prompt, strings: two chosen (RewardBench 2's Ties layout), two rejected
        ({"prompt": text, "chosen": ANSWERS[:2], "rejected": ANSWERS[2:]}, ANSWERS, [1.0, 1.0, 0.0, 0.0]),
        # explicit prompt, assistant message lists, scored; a list of one chosen
        ({"prompt": text, "responses": [[bot(a)] for a in ANSWERS[:3]], "scores": [0.1, 0.3, 0.2]}, ANSWERS[:3],
         [0.1, 0.3, 0.2]),
        ({"prompt": text, "chosen": [ANSWERS[3]], "rejected": [whole[0], whole[2]]}, [ANSWERS[i] for i in (3, 0, 2)],
         [1.0, 0.0, 0.0]),
    ]  # fmt: skip
    tok = load_tokenizer(parse_args([]))
    for i, (row, answers, scores, *margin) in enumerate(rows):
        got = build(write_jsonl(tmp_path / f"row{i}.jsonl", [row]))[0]
        assert got == expected_row(tok, prompt, answers, scores, *margin), row


def test_plain_best_of_n_and_scored_rows(tmp_path):
    texts = [f"copy: red cat {a}" for a in ANSWERS]
    tok = load_tokenizer(parse_args([]))
    ids = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    prompt = os.path.commonprefix(ids)  # the run of ids every sequence starts with
    for i, (row, scores) in enumerate(
        [
            ({"chosen": texts[0], "rejected": texts[1:]}, [1.0, 0.0, 0.0, 0.0]),
            ({"responses": texts, "scores": [4, 3, 2, 1]}, [4.0, 3.0, 2.0, 1.0]),
        ]
    ):
        got = build(write_jsonl(tmp_path / f"plain{i}.jsonl", [row]))[0]
        assert got == {"prompt": prompt, "responses": ids, "scores": scores, "margin": 0.0}


def test_rows_without_a_comparison_are_bad_rows(tmp_path):
    rows = [
        {"prompt": "q", "responses": ["a", "b"], "scores": [1, 1]},
        {"prompt": "q", "responses": [[bot("a")]], "scores": [3]},
        {"prompt": "q", "responses": ["a", "b"], "scores": [1]},
        {"prompt": "q", "responses": ["a", "b"], "scores": [1, "high"]},
        {"prompt": "q", "responses": ["a", "b"], "scores": [1, 0], "margin": "big"},
        {"prompt": "q", "responses": ["a", "a", "b"], "scores": [2, 2, 0]},  # good: equal twins, no comparison
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(SystemExit) as e:
        build(path)
    assert str(e.value).splitlines()[1:6] == [
        f"  {path} line 1: no comparison: all 2 responses have the same score (1)",
        f"  {path} line 2: no comparison: one response (a row needs two with different scores)",
        f"  {path} line 3: `scores` has 1 numbers for 2 responses",
        f"  {path} line 4: `scores[1]` must be a finite number, got 'high'",
        f"  {path} line 5: `margin` must be a finite number, got 'big'",
    ]
    (kept,) = build(path, "--skip_bad_rows")
    assert kept["scores"] == [2.0, 2.0, 0.0] and len(kept["responses"]) == 3


def test_max_responses_per_prompt_keeps_evenly_spaced_ranks(tmp_path, capsys):
    """Scores 3 1 4 1 5 ranked best first: rows 4, 2, 0, 1, 3 (ties in row order). Three kept: ranks
    0, 2 and 4 (the best, the middle, the worst) = responses 4, 0, 3, returned in row order."""
    answers = ["red", "dog", "cat", "sun", "one"]
    row = {"prompt": "copy: red", "responses": answers, "scores": [3, 1, 4, 1, 5]}
    pair = {"prompt": "copy: red", "chosen": "red", "rejected": "dog"}
    path = write_jsonl(tmp_path / "ranked.jsonl", [row, pair])
    (got, kept_pair) = build_rows(path, max_responses_per_prompt=3)
    tok = load_tokenizer(parse_args([]))
    assert got == expected_row(tok, [user("copy: red")], [answers[i] for i in (0, 3, 4)], [3.0, 1.0, 5.0])
    assert kept_pair["scores"] == [1.0, 0.0]
    out = capsys.readouterr().out
    assert "5 responses in the kept rows; 0 responses >" in out and "2 cut by --max_responses_per_prompt 3" in out
    assert build_rows(path, max_responses_per_prompt=None)[0]["scores"] == [3.0, 1.0, 4.0, 1.0, 5.0]


def test_length_filter_drops_responses_then_rows_left_without_a_comparison(tmp_path, capsys):
    tok = load_tokenizer(parse_args([]))
    long, longer = " ".join(["red"] * 40), " ".join(["dog"] * 41)  # 79 and 81 tokens
    rows = [
        {"prompt": "copy: red", "responses": ["red", long, "dog", longer], "scores": [2, 3, 1, 0]},  # keeps 2
        {"prompt": "copy: red", "chosen": long, "rejected": "dog"},  # a pair with one side too long: dropped
        {"prompt": "copy: red", "responses": ["red", "dog", long], "scores": [1, 1, 0]},  # only a tie left
        {"prompt": "copy: " + long, "chosen": "red", "rejected": "dog"},  # the prompt is too long
        {"prompt": "copy: red", "chosen": "red", "rejected": "dog"},
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    lengths = [len(r) for r in expected_row(tok, [user("copy: red")], ["red", long], [1.0, 0.0])["responses"]]
    assert lengths[0] <= 60 < lengths[1]
    kept = build(path, "--max_token_length", "60", "--max_prompt_token_length", "40")
    assert [r["scores"] for r in kept] == [[2.0, 1.0], [1.0, 0.0]]
    assert kept[0] == expected_row(tok, [user("copy: red")], ["red", "dog"], [2.0, 1.0])
    out = capsys.readouterr().out
    assert (
        "5 rows, 0 bad, 3 dropped by the length filter (1 with a prompt > 40 tokens, 2 left without a comparison)"
        in out
    )
    assert "4 responses in the kept rows; 4 responses > 60 tokens dropped" in out


def test_show_pair_prints_the_prompt_once_and_each_response(tmp_path):
    tok = load_tokenizer(parse_args([]))
    row = expected_row(tok, [user("copy: red cat")], ANSWERS[:3], [0.5, 2.0, 1.0])
    shown = re.sub(r"\033\[\d+m", "", show_pair(row, tok))
    tails = [tok.decode(ids[len(row["prompt"]) :]) for ids in row["responses"]]
    assert shown == f"prompt: {tok.decode(row['prompt'])}\n0.5: {tails[0]}\n2: {tails[1]}\n1: {tails[2]}"
    assert "\n2: \033[32m" in show_pair(row, tok)  # the best in green


def test_mixer_amounts_after_checks(tmp_path, capsys):
    good = [
        {"chosen": [user(f"copy: {w}"), bot(w)], "rejected": [user(f"copy: {w}"), bot("cat")]}
        for w in ["red", "dog", "sun"]
    ]
    path = write_jsonl(tmp_path / "mix.jsonl", good + ["not json"])
    args = parse_args(["--dataset_mixer_list", path, "2.5", path, "1", "--skip_bad_rows"])
    pairs = build_dataset(args.dataset_mixer_list, ["train"], load_tokenizer(args), args, "train")
    assert len(pairs) == int(2.5 * 3) + 1  # amounts apply to the 3 good rows
    assert "is a row COUNT (1 rows)" in capsys.readouterr().out
    assert take_indices(3, "2.5", 1)[:6] == [0, 1, 2, 0, 1, 2] and len(set(take_indices(3, "2.5", 1)[6:])) == 1
    with pytest.raises(SystemExit, match="odd number"):
        parse_args(["--dataset_mixer_list", path, "1.0", path])
    with pytest.raises(SystemExit, match="one split for all"):
        parse_args(["--dataset_mixer_list", path, "1.0", path, "1.0", "--dataset_mixer_list_splits", "a", "b", "c"])


def test_eval_fraction_holds_out_rows_without_overlap(tmp_path, pairs_file):
    args = parse_args(["--dataset_mixer_list", pairs_file, "2.0", "--eval_fraction", "0.25"])
    dd, _ = build_datasets(args, load_tokenizer(args))
    assert len(dd["eval"]) == 12 and len(dd["train"]) == 2 * 36
    assert not {tuple(r[0]) for r in dd["eval"]["responses"]} & {tuple(r[0]) for r in dd["train"]["responses"]}


def test_cache_key_changes_with_each_ingredient(tmp_path, pairs_file):
    base = ["--dataset_mixer_list", pairs_file, "1.0"]
    args = parse_args(base)
    tok = load_tokenizer(args)
    key = cache_key(args, tok)
    assert cache_key(parse_args(base), load_tokenizer(args)) == key  # same inputs, same key
    changed = [
        ["--max_token_length", "100"],
        ["--max_prompt_token_length", "30"],
        ["--chosen_key", "c"],
        ["--seed", "2"],
        ["--eval_fraction", "0.1"],
        ["--chat_template_name", "zephyr"],
    ]
    for flags in changed:
        other = parse_args(base + flags)
        assert cache_key(other, load_tokenizer(other)) != key, flags
    assert cache_key(parse_args(["--dataset_mixer_list", pairs_file, "0.5"]), tok) != key
    # A local file has one split; the toy has two.
    assert cache_key(parse_args(["--dataset_mixer_list_splits", "test"]), tok) != cache_key(parse_args([]), tok)
    tok2 = load_tokenizer(args)
    tok2.add_tokens(["zebra"])
    assert cache_key(args, tok2) != key
    copy = write_jsonl(tmp_path / "copy.jsonl", [json.loads(line) for line in open(pairs_file)][:-1])
    assert cache_key(parse_args(["--dataset_mixer_list", copy, "1.0"]), tok) != key  # content, not name


def test_two_processes_build_the_cache_once_and_a_rerun_loads_it(tmp_path, pairs_file):
    cache = tmp_path / "cache"
    flags = ["--dataset_mixer_list", pairs_file, "1.0", "--dataset_local_cache_dir", str(cache)]
    flags += ["--cache_dataset_only", "--output_dir", str(tmp_path / "out")]
    first = run_minrm(flags, nproc=2)
    assert first.stdout.count("data: built the cache") == 1 and len(os.listdir(cache)) == 1
    second = run_minrm_here(flags)  # the trainer's main, in this process
    assert "data: loading the tokenized datasets from the cache" in second.stdout
    assert "built the cache" not in second.stdout


def test_identical_responses_ranked_apart_are_kept_and_counted_once(tmp_path, capsys):
    """A pair whose chosen and rejected are the same text, and ranked rows with a response repeated
    under another score, are trained as the reference trains them (a tie, batching.collate): kept
    whole, and counted in one line per dataset. Equal twins of one score are no tie and not counted."""
    same = {"chosen": [user("a"), bot("b")], "rejected": [user("a"), bot("b")]}
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [CONVERSATION, same, CONVERSATION, same, same])
    ranked = [
        {"prompt": "copy: red", "responses": ["red", "dog", "red"], "scores": [1, 0, 0]},
        {"prompt": "copy: red", "chosen": ["red", "dog"], "rejected": ["cat", "dog"]},
        {"prompt": "copy: red", "responses": ["red", "red", "dog"], "scores": [2, 2, 0]},  # equal twins: no tie
    ]
    ranked = write_jsonl(tmp_path / "ranked.jsonl", ranked)
    args = parse_args(["--dataset_mixer_list", pairs, "1.0", ranked, "1.0"])
    kept = build_dataset(args.dataset_mixer_list, ["train"], load_tokenizer(args), args, "train")
    assert len(kept) == 8
    assert kept[1]["responses"][0] == kept[1]["responses"][1] and kept[1]["scores"] == [1.0, 0.0]
    assert kept[5]["responses"][0] == kept[5]["responses"][2] and len(kept[5]["responses"]) == 3
    assert kept[6]["responses"][1] == kept[6]["responses"][3] and kept[6]["scores"] == [1.0, 1.0, 0.0, 0.0]
    out = capsys.readouterr().out
    assert "5 rows, 0 bad, 0 dropped by the length filter" in out and "3 rows, 0 bad, 0 dropped" in out
    assert out.count("identical responses apart") == 2  # once per dataset
    assert f"data: train: {pairs}: 3 kept rows rank identical responses apart" in out
    assert f"data: train: {ranked}: 2 kept rows rank identical responses apart" in out
    # A dataset without any says nothing.
    build(write_jsonl(tmp_path / "plain.jsonl", [CONVERSATION]))
    assert "identical responses apart" not in capsys.readouterr().out
