"""minrm.rewardbench: RewardBench 1 and 2's published rules on hand-made rewards, against the rules
written out here (ties, the Ties subset, prior sets present and absent, math-prm's weight), and
`python -m minrm.score --benchmark rewardbench2` (its main, in this process) on a file in RewardBench 2's
published layout."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from minrm import rewardbench
from minrm.score import parse_args
from tests.conftest import run_minrm_here
from tests.test_score import hf_forward, tulu_tokenizer


def records(benchmark: str, rows: list[tuple]) -> list[dict]:
    """(subset, chosen rewards, rejected rewards[, id]) to scored records, as minrm.score builds them."""
    out = []
    for i, (subset, chosen, rejected, *row_id) in enumerate(rows):
        r = {"row": i, "subset": subset, "id": row_id[0] if row_id else i}
        r.update(chosen_rewards=chosen, rejected_rewards=rejected)
        r["credit"] = rewardbench.credit(benchmark, r)
        out.append(r)
    return out


# ----------------------------------------------------------------------------------------------
# RewardBench 1


def test_rewardbench1_pairs_sections_and_prior_sets():
    pairs = {  # subset: (chosen, rejected) rewards; right when chosen > rejected, a tie is wrong
        "alpacaeval-easy": [(1.0, 0.0), (0.5, 0.5), (0.0, 2.0), (3.0, 1.0)],  # 2 of 4
        "mt-bench-easy": [(1.0, 0.5)],  # 1 of 1
        "mt-bench-hard": [(0.1, 0.2), (0.3, 0.2)],  # 1 of 2
        "refusals-dangerous": [(2.0, 2.0)],  # 0 of 1
        "donotanswer": [(1.0, -1.0), (0.0, 1.0), (5.0, 4.0)],  # 2 of 3
        "math-prm": [(1.0, 0.0), (0.0, 1.0)],  # 1 of 2
        "hep-cpp": [(1.0, 0.0)],  # 1 of 1
        "hep-go": [(0.0, 0.0), (0.0, 1.0)],  # 0 of 2
        "anthropic_helpful": [(1.0, 0.0), (0.0, 1.0)],  # 1 of 2
        "shp": [(1.0, 0.0)],  # 1 of 1
        "anthropic_harmless": [(0.0, 1.0)],  # 0 of 1: a prior-sets subset outside Prior Sets
    }
    rows = [(s, [c], [r]) for s, prs in pairs.items() for c, r in prs]
    summary = rewardbench.summarize("rewardbench", records("rewardbench", rows))
    acc = {s: c["score"] for s, c in summary["categories"].items()}
    assert acc == pytest.approx(
        {"alpacaeval-easy": 0.5, "mt-bench-easy": 1.0, "mt-bench-hard": 0.5, "refusals-dangerous": 0.0}
        | {"donotanswer": 2 / 3, "math-prm": 0.5, "hep-cpp": 1.0, "hep-go": 0.0}
        | {"anthropic_helpful": 0.5, "shp": 1.0, "anthropic_harmless": 0.0}
    )
    # Sections weigh their present subsets by the published example counts, not by the rows here.
    chat = (100 * 0.5 + 28 * 1.0) / (100 + 28)
    chat_hard = 0.5
    safety = (100 * 0.0 + 136 * 2 / 3) / (100 + 136)
    reasoning = (984 * 0.5 + 164 * 1.0 + 164 * 0.0) / (984 + 164 + 164)
    prior = (0.5 + 1.0) / 2
    expected = {"Chat": chat, "Chat Hard": chat_hard, "Safety": safety, "Reasoning": reasoning, "Prior Sets": prior}
    assert summary["sections"] == pytest.approx(expected)
    assert summary["score"] == pytest.approx((2 * (chat + chat_hard + safety + reasoning) + prior) / 9)
    assert "alpacaeval-hard" in summary["missing_subsets"] and "math-prm" not in summary["missing_subsets"]

    # Without the prior sets: the plain mean of the four sections.
    core = [r for r in rows if any(r[0] in subsets for subsets in rewardbench.SECTIONS.values())]
    summary = rewardbench.summarize("rewardbench", records("rewardbench", core))
    assert summary["sections"]["Prior Sets"] is None
    assert summary["score"] == pytest.approx((chat + chat_hard + safety + reasoning) / 4)
    report = rewardbench.report(summary)
    assert f"| Reasoning | {reasoning:.4f} |" in report and "| Prior Sets | - |" in report


def test_rewardbench1_math_prm_weighs_as_all_code_together():
    """Reasoning is half math, half code: math-prm all right and the six code subsets all wrong give 0.5."""
    code = ["hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"]
    rows = [("math-prm", [1.0], [0.0])] + [(s, [0.0], [1.0]) for s in code]
    summary = rewardbench.summarize("rewardbench", records("rewardbench", rows))
    assert summary["sections"]["Reasoning"] == pytest.approx(0.5)
    assert summary["sections"]["Chat"] is None and summary["score"] == pytest.approx(0.5)  # the only section


def test_rewardbench1_rows_are_pairs_with_a_subset():
    with pytest.raises(SystemExit, match="row 0 has 1 chosen and 3 rejected responses"):
        records("rewardbench", [("shp", [1.0], [0.0, 0.5, 0.2])])
    with pytest.raises(SystemExit, match="--benchmark rewardbench: row 0 has no subset"):
        rewardbench.summarize("rewardbench", records("rewardbench", [(None, [1.0], [0.0])]))


# ----------------------------------------------------------------------------------------------
# RewardBench 2


def test_rewardbench2_best_of_n_credit_with_ties():
    """Chosen first: credit 1 / (how many rewards equal the maximum) when the chosen reward is it."""
    cases = [
        ([2.0], [1.0, 0.0, -1.0], 1.0),
        ([1.0], [1.0, 0.0, 0.0], 1 / 2),
        ([1.0], [1.0, 1.0, 0.0], 1 / 3),
        ([1.0], [1.0, 1.0, 1.0], 1 / 4),
        ([0.0], [1.0, 0.0, 0.0], 0.0),
        ([1.0], [2.0, 2.0, 0.0], 0.0),  # rejected responses tied at the top
        ([3.0], [2.0, 2.0, 2.0], 1.0),  # rejected responses tied below the chosen
    ]
    for chosen, rejected, expected in cases:
        rows = records("rewardbench2", [("Math", chosen, rejected)])
        assert rows[0]["credit"] == pytest.approx(expected), (chosen, rejected)

    rows = [("Math", c, r) for c, r, _ in cases] + [("Focus", [1.0], [0.0, 0.0, 0.0]), ("Focus", [0.0], [0.0])]
    summary = rewardbench.summarize("rewardbench2", records("rewardbench2", rows))
    math_score = (1 + 1 / 2 + 1 / 3 + 1 / 4 + 0 + 0 + 1) / 7
    focus = (1 + 1 / 2) / 2
    assert summary["categories"]["Math"] == {"rows": 7, "score": pytest.approx(math_score)}
    assert summary["categories"]["Focus"]["score"] == pytest.approx(focus)
    assert summary["score"] == pytest.approx((math_score + focus) / 2)  # the mean of the subsets present
    assert summary["missing_subsets"] == ["Factuality", "Precise IF", "Safety", "Ties"]


def ties_rows() -> list[tuple]:
    """Ties rows of six prompts: (subset, correct rewards, incorrect rewards, id)."""
    return [
        ("Ties", [2.0], [1.0, 0.0], "ref:0"),
        ("Ties", [3.0, 2.5, 2.0], [1.5], "tied:0"),
        ("Ties", [2.0], [1.0], "ref:1"),
        ("Ties", [4.0, 4.0], [1.0, 0.0], "tied:1"),
        ("Ties", [0.0], [0.5], "ref:2"),
        ("Ties", [5.0, 1.0], [2.0], "tied:2"),
        ("Ties", [1.0, 0.75], [0.0], "tied:3"),  # no ref row
        ("Ties", [3.0], [3.0, -1.0], "ref:4"),  # no tied row; a tie with an incorrect answer
        ("Ties", [1.0], [0.0], "ref:5"),
        ("Ties", [1.0, 2.0], [], "tied:5"),  # no incorrect answer
    ]


def test_rewardbench2_ties_subset_score():
    """Each row: accurate = worst correct > best incorrect; spread = best - worst correct (None with
    one correct answer); margin = worst correct - best incorrect (a row lacking correct or incorrect
    answers: not accurate, no spread, margin 0). Over prompts with both rows and a tied spread:
    preferred = tied margin > tied spread, hard = min(margins) > tied spread, ratio = min(margins) /
    tied spread where the spread is positive. Ties = 0.3 acc(tied) + 0.3 acc(ref) + 0.2 mean(preferred)
    + 0.2 mean(hard) + 0.01 mean(tanh(ratio - 1))."""
    # prompt:        ref (accurate, margin)    tied (accurate, spread, margin)
    # 0:             yes, 2 - 1 = 1            yes, 3 - 2 = 1, 2 - 1.5 = 0.5
    # 1:             yes, 1                    yes, 0, 4 - 1 = 3
    # 2:             no, -0.5                  no, 4, 1 - 2 = -1
    # 3:             -                         yes, 0.25, 0.75
    # 4:             no (3 = 3), 0             -
    # 5:             yes, 1                    no (no incorrect), None, 0
    acc_ref, acc_tied = 3 / 5, 3 / 5
    # prompts 0, 1, 2 have both rows and a spread (5's tied row has none)
    preferred = [0.5 > 1, 3 > 0, -1 > 4]
    hard = [min(1, 0.5) > 1, min(1, 3) > 0, min(-0.5, -1) > 4]
    ratios = [min(1, 0.5) / 1, min(-0.5, -1) / 4]  # prompt 1's spread is 0
    expected = 0.3 * acc_tied + 0.3 * acc_ref + 0.2 * sum(preferred) / 3 + 0.2 * sum(hard) / 3
    expected += 0.01 * sum(math.tanh(x - 1) for x in ratios) / 2
    rows = records("rewardbench2", ties_rows())
    assert all(r["credit"] is None for r in rows)  # the subset is scored as a whole
    summary = rewardbench.summarize("rewardbench2", rows)
    assert summary["categories"]["Ties"] == {"rows": 10, "score": pytest.approx(expected)}
    assert summary["score"] == pytest.approx(expected)

    # Prompts with both rows but no tied spread: no preferred/hard/ratio terms (0, where numpy's mean is nan).
    one = records("rewardbench2", [("Ties", [2.0], [1.0], "ref:0"), ("Ties", [2.0], [0.0], "tied:0")])
    assert rewardbench.ties_score(one) == pytest.approx(0.3 * 1 + 0.3 * 1)


def test_rewardbench2_ties_ids_are_checked():
    for bad in ("ref-0", "other:0", "tied:x"):
        with pytest.raises(SystemExit, match=f"Ties row 0: id '{bad}' is not 'ref:N' or 'tied:N'"):
            rewardbench.ties_score(records("rewardbench2", [("Ties", [1.0], [0.0], bad)]))
    twice = records("rewardbench2", [("Ties", [1.0], [0.0], "ref:3"), ("Ties", [2.0], [0.0], "ref:3")])
    with pytest.raises(SystemExit, match="Ties row 1: id 'ref:3' is used by another row"):
        rewardbench.ties_score(twice)


def test_benchmark_flags():
    assert parse_args(["m", "--data", "allenai/reward-bench", "--benchmark", "rewardbench"]).split == "filtered"
    assert parse_args(["m", "--data", "allenai/reward-bench-2", "--benchmark", "rewardbench2"]).split == "test"
    assert parse_args(["m", "--data", "org/data"]).split == "train"
    assert parse_args(["m", "--data", "org/data", "--split", "dev", "--benchmark", "rewardbench2"]).split == "dev"
    with pytest.raises(SystemExit):
        parse_args(["m", "--data", "org/data", "--benchmark", "rewardbench2", "--sections", "s.json"])


# ----------------------------------------------------------------------------------------------
# The command on RewardBench 2's published layout


WORDS = ["red cat", "red dog", "cat red", "blue owl sun", "red", "one two three", "gold fox", "sun moon"]


def rb2_file(path) -> list[dict]:
    """Rows as allenai/reward-bench-2's test split holds them: two per subset of the five best-of-4
    ones, and two Ties `ref` rows (one correct answer; the `tied` rows hold several: formats.py's);
    two rows repeat a response."""
    rows = []
    subsets = ["Factuality", "Precise IF", "Math", "Safety", "Focus", "Ties"]
    for i in range(12):
        subset = subsets[i // 2]
        answers = [WORDS[(i + k) % len(WORDS)] for k in range(4 if subset != "Ties" else 3)]
        rows.append(
            {
                "id": f"ref:{i % 2}" if subset == "Ties" else str(100 + i),
                "prompt": f"copy: {WORDS[i % len(WORDS)]}",
                "chosen": answers[:1],
                "rejected": answers[1:],
                "num_correct": 1,
                "num_incorrect": len(answers) - 1,
                "total_completions": len(answers),
                "models": ["a"] * len(answers),
                "subset": subset,
                "additional_metadata": {"category": None, "valid": 1.0},
            }
        )
    # The published rows may repeat a response: the chosen one among the rejected (row 1), or all four
    # the same (row 4). Every row is scored; identical responses get one reward.
    rows[1]["rejected"][1] = rows[1]["chosen"][0]
    rows[4]["rejected"] = rows[4]["chosen"] * 3
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows


def test_command_scores_rewardbench2_as_published(tmp_path, tiny_model_dir):
    data = rb2_file(tmp_path / "rb2.parquet")
    flags = [tiny_model_dir, "--data", str(tmp_path / "rb2.parquet"), "--chat_template_name", "tulu"]
    result = run_minrm_here(
        flags + ["--benchmark", "rewardbench2", "--out", str(tmp_path / "out.jsonl")], module="minrm.score"
    )
    out = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    summary = json.load(open(tmp_path / "out.summary.json"))

    # Each record is its row's: id, subset, and the rewards of Hugging Face's own forward.
    tokenizer = tulu_tokenizer()
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    assert [r["row"] for r in out] == list(range(12))
    for r, row in zip(out, data):
        assert (r["id"], r["subset"]) == (row["id"], row["subset"])
        convs = [
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": a}]
            for a in row["chosen"] + row["rejected"]
        ]
        seqs = [tokenizer.apply_chat_template(c, return_dict=False) for c in convs]
        rewards = r["chosen_rewards"] + r["rejected_rewards"]
        torch.testing.assert_close(torch.tensor(rewards), torch.tensor(hf_forward(model, seqs)), rtol=0, atol=1e-5)

    # The published rules applied here to the written rewards.
    def best_of_4(r):
        rewards = r["chosen_rewards"] + r["rejected_rewards"]
        at_top = [i for i, x in enumerate(rewards) if x == max(rewards)]
        return 1 / len(at_top) if 0 in at_top else 0.0

    # A rejected response equal to the chosen one: the same reward, and 1 / (the number at the top).
    same = out[1]["chosen_rewards"] + out[1]["rejected_rewards"]
    assert same[0] == same[2] and out[1]["credit"] == (1 / 2 if same[0] == max(same) else 0.0)
    assert len(set(out[4]["chosen_rewards"] + out[4]["rejected_rewards"])) == 1 and out[4]["credit"] == 1 / 4
    scores = {}
    for subset in ["Factuality", "Precise IF", "Math", "Safety", "Focus"]:
        mine = [r for r in out if r["subset"] == subset]
        assert [r["credit"] for r in mine] == pytest.approx([best_of_4(r) for r in mine])
        scores[subset] = sum(best_of_4(r) for r in mine) / len(mine)
    ties = [r for r in out if r["subset"] == "Ties"]
    # Ref rows only: 0.3 x the share whose correct reward is above every incorrect one.
    scores["Ties"] = 0.3 * sum(r["chosen_rewards"][0] > max(r["rejected_rewards"]) for r in ties) / len(ties)
    assert all(r["credit"] is None for r in ties)
    assert {s: c["score"] for s, c in summary["categories"].items()} == pytest.approx(scores)
    assert summary["score"] == pytest.approx(sum(scores.values()) / 6) and summary["missing_subsets"] == []
    assert f"| Ties | 2 | {scores['Ties']:.4f} |" in result.stdout
    assert f"rewardbench2 score (the mean of the six subsets): {summary['score']:.4f}" in result.stdout


def test_command_scores_an_identical_rewardbench1_pair_as_wrong(tmp_path, tiny_model_dir):
    """RewardBench 1 counts a pair right when its chosen reward is strictly above the rejected one: a
    pair whose two responses are the same text is scored (one reward for both), and wrong."""
    rows = [
        {"prompt": "copy: red cat", "chosen": "red cat", "rejected": "red cat", "subset": "shp", "id": 0},
        {"prompt": "copy: red cat", "chosen": "red cat", "rejected": "red dog", "subset": "shp", "id": 1},
    ]
    (tmp_path / "rb1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = [tiny_model_dir, "--data", str(tmp_path / "rb1.jsonl"), "--chat_template_name", "tulu"]
    run_minrm_here(flags + ["--benchmark", "rewardbench", "--out", str(tmp_path / "out.jsonl")], module="minrm.score")
    tie, other = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert tie["chosen_rewards"] == tie["rejected_rewards"] and tie["credit"] == 0.0
    assert other["credit"] == float(other["chosen_rewards"][0] > other["rejected_rewards"][0])
