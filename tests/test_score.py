"""minrm.score: rewards equal to Hugging Face's own forward on each full sequence (every batching,
attention and token budget; 1 and 2 processes), best-of-N rows tokenized as their pairs, and the
accuracy, categories and sections against values computed here."""

import json
import os
import subprocess
import types

import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from minrm.config import CHAT_TEMPLATES
from minrm.data import formats, toy
from minrm.data.batching import collate, computed_tokens, micro_batches, row_sizes
from minrm.distributed import Dist
from minrm.model.attention import use_packed_attention
from minrm.model.loss import STATS
from minrm.model.reward import prepare, read_model, reward_forward, shard_model
from minrm.score import check_model, parse_args, score_rows, summarize, train_args
from tests.conftest import ROOT, minrm_command, run_minrm, run_minrm_here, tiny_llama_config

VOCAB = 100
KEYS = {"chosen": "chosen", "rejected": "rejected", "prompt": "prompt"}


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


# ----------------------------------------------------------------------------------------------
# Rows of N responses: tokenization, layouts, rewards


def tulu_tokenizer():
    """The toy tokenizer with <pad>, as the tiny model folder holds it, and the tulu template."""
    tokenizer = toy.toy_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.chat_template = CHAT_TEMPLATES["tulu"]
    return tokenizer


def test_best_of_n_rows_tokenize_as_their_pairs():
    """A row with a list of rejected responses tokenizes as its pairs (chosen, rejected i) do, in
    every format, the chosen response first with the top score."""
    tokenizer = tulu_tokenizer()
    keys = {**KEYS, "responses": "responses", "scores": "scores", "margin": "margin"}
    prompt = [user("copy: red cat")]
    answers = ["red cat", "red dog", "cat red", "red dog"]  # two rejected may be equal
    rows = {
        "conversational": {"chosen": prompt + [bot(answers[0])], "rejected": [prompt + [bot(a)] for a in answers[1:]]},
        "prompt": {"prompt": "copy: red cat", "chosen": [answers[0]], "rejected": answers[1:]},  # RewardBench 2's
        "plain": {"chosen": "copy: red cat red cat", "rejected": [f"copy: red cat {a}" for a in answers[1:]]},
    }
    for fmt, row in rows.items():
        out = formats.tokenize_row(row, fmt, keys, tokenizer)
        assert out["problem"] == "" and len(out["responses"]) == 4 and out["scores"] == [1.0, 0.0, 0.0, 0.0], fmt
        chosen = row["chosen"][0] if fmt == "prompt" else row["chosen"]
        for i, rejected in enumerate(row["rejected"], start=1):
            pair = formats.tokenize_row({**row, "chosen": chosen, "rejected": rejected}, fmt, keys, tokenizer)
            assert out["responses"][0] == pair["responses"][0] and out["responses"][i] == pair["responses"][1], fmt
            if fmt != "plain":  # plain: the prompt is the run of ids all responses share
                assert out["prompt"] == pair["prompt"], fmt
    # A rejected response equal to the chosen one is kept (a tie: collate computes it once).
    row = {"prompt": "copy: red", "chosen": "red", "rejected": ["dog", "red"]}
    tie = formats.tokenize_row(row, "prompt", keys, tokenizer)
    assert tie["problem"] == "" and tie["responses"][0] == tie["responses"][2] != tie["responses"][1]
    two = formats.tokenize_row({"prompt": "a", "chosen": ["b", "c"], "rejected": "d"}, "prompt", keys, tokenizer)
    assert two["scores"] == [1.0, 1.0, 0.0]  # two chosen (RewardBench 2's Ties)


def varied_rows() -> list[dict]:
    """2- and 4-response rows, prompts of several lengths, one without a prompt, one whose prompt
    ids do not start its sequences (laid out as full sequences), responses of very unequal length."""
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    def row(prompt, *lengths):
        return {"prompt": prompt, "responses": [prompt + ids(n) for n in lengths], "scores": [1.0] + [0.0] * (len(lengths) - 1)}

    rows = [row(ids(9), 6, 11), row(ids(17), 3, 30, 5, 8), row([], 8, 13, 2, 4), row(ids(4), 1, 1, 2, 1)]
    rows += [row(ids(25), 12, 2), row(ids(6), 5, 7, 9, 3)]
    rows[-1]["prompt"] = ids(6)  # not a prefix: shared_prefix falls back to full sequences
    return rows


def tiny_model(attention: str | None):
    """The same weights every call; with `attention`, packed rows as minrm.score loads them."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_llama_config(VOCAB)).eval()
    if attention:
        use_packed_attention(model, attention)
    model.forward = types.MethodType(reward_forward, model)
    return model


def hf_forward(model, seqs: list[list[int]]) -> list[float]:
    """Hugging Face's own forward (its pooling included) on each full sequence alone."""
    with torch.no_grad():
        return [model(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs]


@pytest.fixture(scope="module")
def expected_rewards():
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_llama_config(VOCAB)).eval()
    return [hf_forward(model, row["responses"]) for row in varied_rows()]


@pytest.mark.parametrize(
    ("batching", "attention"),
    [("padded", None)] + [(b, a) for b in ("packed", "shared_prefix") for a in ("segments", "mask")],
)
def test_rewards_equal_hf_forward_for_every_batching_and_budget(batching, attention, expected_rewards):
    """fp32, 1e-5: one row per batch, a few rows per batch, all rows in one; sorted by length and
    put back in order. `mask` checks the mask that the GPU's FlexAttention block mask is built from
    (packed_attention_mask), whose CPU compilation would cost half a minute here."""
    rows, model = varied_rows(), tiny_model(attention)
    for budget in (1, 90, 10**6):
        batches = micro_batches(rows, batching, max_tokens=budget, longest_first=True)
        assert sorted(i for b in batches for i in b) == list(range(len(rows)))
        for b in batches:  # within the budget, or a row alone
            tokens = collate([rows[i] for i in b], 0, batching)[0]["input_ids"].numel()
            assert tokens <= budget or len(b) == 1
            assert len(b) > 1 or tokens == computed_tokens(*row_sizes(rows[b[0]]), batching)
        got, _ = score_rows(model, rows, batching, budget, 0, torch.device("cpu"), tqdm(disable=True))
        for g, e in zip(got, expected_rewards):
            torch.testing.assert_close(torch.tensor(g), torch.tensor(e), rtol=0, atol=1e-5)
    if batching == "shared_prefix":  # each prompt once: the row of 4 responses holds one prompt
        assert computed_tokens(*row_sizes(rows[1]), batching) == 17 + 3 + 30 + 5 + 8


def test_gpu_loading_keeps_the_score_head_in_fp32_as_training(tmp_path, tokenizer):
    """On GPU the scorer reads the model with the backbone in bf16 and the score head in fp32
    (`score.main`), as training computes rewards under --mixed_precision bf16 (FSDP2 gathers
    bf16 blocks and an fp32 head): its rewards are not rounded to bf16, and equal training's
    computation on the same export (shard_model, one process on gloo). Read here on the CPU."""
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(tiny_llama_config(VOCAB, pad_token_id=0)).save_pretrained(tmp_path)
    args = train_args(parse_args([str(tmp_path), "--data", "any/hub_dataset", "--batching", "padded"]))
    model = prepare(read_model(args, tokenizer, torch.bfloat16), args)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.score.weight.dtype == torch.float32

    def rewards(model) -> torch.Tensor:  # row by row, as training's eval runs the model
        with torch.no_grad():
            return torch.cat([model(**collate([row], 0, "padded")[0]) for row in varied_rows()])

    ours = rewards(model)
    assert (ours.bfloat16().float() != ours).sum() > len(ours) / 2  # fp32 numbers, not bf16 ones
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        trained = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32)
        d = Dist(0, 1, 0, torch.device("cpu"), init_device_mesh("cpu", (1,)))
        shard_model(trained, d, "bf16")
        trained.forward = types.MethodType(reward_forward, trained)
        theirs = rewards(trained.eval())
    finally:
        dist.destroy_process_group()
    # The same bf16 operations on the same bf16 weights, then the same fp32 head on the same inputs:
    # equal (bitwise here); 1e-6 is far below bf16's step at these rewards (2^-10 at |r| = 0.2).
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Accuracy, categories, sections


def test_summary_and_sections_on_hand_made_rows():
    """Per-row metrics (as loss.row_statistics gives them) summarised overall, per category and per
    section, against means written out here; sections weigh best-of-N accuracy."""
    rows = {  # category: [(best-of-N accuracy, accuracy, chosen, rejected)]
        "a": [(1, 1, 1.0, 0.5), (0, 0, 0.2, 0.2), (0, 0, 0.0, 1.0)],
        "b": [(1, 2 / 3, 2.0, 0.8), (0, 1 / 3, 1.0, 0.5), (1, 1, 3.0, 1.1), (0, 0, 0.5, 0.3)],
        "c": [(1, 1, 0.3, 0.1)],
    }
    stats, subsets = [], []
    for c, rs in rows.items():
        for best, acc, chosen, rejected in rs:
            values = {"best_of_n_accuracy": best, "accuracy": acc, "chosen_rewards": chosen, "rejected_rewards": rejected}
            stats.append({**values, "reward_margin": chosen - rejected, "loss": 0.5})
            subsets.append(c)
    sections = {"S": ["a", "b"], "W": {"b": 3, "c": 1, "absent": 5}, "none": ["absent"]}
    s = summarize(stats, subsets, sections)
    assert s["rows"] == 8 and set(STATS) <= set(s)
    assert s["best_of_n_accuracy"] == pytest.approx(4 / 8)
    assert s["accuracy"] == pytest.approx((2 + 2) / 8)
    for c, rs in rows.items():
        assert s["categories"][c]["rows"] == len(rs)
        assert s["categories"][c]["best_of_n_accuracy"] == pytest.approx(sum(r[0] for r in rs) / len(rs))
    chosen, rejected = [r[2] for rs in rows.values() for r in rs], [r[3] for rs in rows.values() for r in rs]
    assert s["chosen_rewards"] == pytest.approx(sum(chosen) / 8)
    assert s["reward_margin"] == pytest.approx((sum(chosen) - sum(rejected)) / 8)
    assert s["sections"]["S"] == pytest.approx(3 / 7)  # the best-of-N accuracy over the section's 7 rows
    assert s["sections"]["W"] == pytest.approx((3 * 0.5 + 1 * 1.0) / 4)  # "absent" is left out
    assert s["sections"]["none"] is None and s["missing_categories"] == ["absent", "absent"]
    assert s["score"] == pytest.approx((3 / 7 + 2.5 / 4) / 2)


def test_only_reward_models_are_scored(tmp_path):
    small = {"vocab_size": VOCAB, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}
    for name, model in {
        "lm": LlamaForCausalLM(LlamaConfig(**small)),
        "two": AutoModelForSequenceClassification.from_config(LlamaConfig(**small, num_labels=2)),
    }.items():
        model.save_pretrained(tmp_path / name)
        args = parse_args([str(tmp_path / name), "--data", "any/hub_dataset", "--batching", "padded"])
        with pytest.raises(SystemExit, match="LlamaForCausalLM, not a|has 2 labels"):
            check_model(args)
    for model, message in [("no/such/dir", "MODEL: the folder no/such/dir does not exist"), ("a b", "'a b' is neither")]:
        with pytest.raises(SystemExit, match=message):  # the trainer's checks, naming the argument
            check_model(parse_args([model, "--data", "any/hub_dataset"]))


# ----------------------------------------------------------------------------------------------
# The command, as users run it: one process and two


SYSTEM = {"role": "system", "content": "be exact"}
WORDS = ["red cat", "red dog", "cat red", "blue owl sun", "red", "one two three"]


def score_file(path) -> str:
    """Explicit-prompt rows with message lists: 2 and 4 responses, three categories, multi-turn
    prompts, a pair whose chosen and rejected are the same (line 4), and one bad row (line 6)."""
    rows = []
    for i in range(12):
        prompt = [SYSTEM, user("copy: red cat")] if i % 3 else [user("echo: sun"), bot("sun"), user("copy: red cat")]
        n = 2 if i % 2 else 4
        answers = [WORDS[(i + k) % len(WORDS)] for k in range(n)]
        rows.append({"prompt": prompt, "chosen": [bot(answers[0])], "rejected": [[bot(a)] for a in answers[1:]]})
        rows[-1]["subset"] = ["two", "four"][n == 4] if i < 9 else "mixed"
    rows[3]["rejected"][0] = rows[3]["chosen"]  # identical to chosen: a tie, scored
    rows[5]["rejected"][0] = [user("red")]  # a conversation that ends with the user's message: bad
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("score")
    data = score_file(tmp / "rows.jsonl")
    (tmp / "sections.json").write_text(json.dumps({"Pairs": ["two"], "Best of 4": ["four", "mixed"]}))
    flags = [tiny_model_dir, "--data", data, "--chat_template_name", "tulu", "--sections", str(tmp / "sections.json")]
    flags += ["--skip_bad_rows", "--max_tokens_per_batch", "64"]  # a few rows per batch
    one = run_minrm_here(flags + ["--out", str(tmp / "one.jsonl")], module="minrm.score")  # main, in this process
    run_minrm(flags + ["--out", str(tmp / "two.parquet")], nproc=2, module="minrm.score")
    failed = subprocess.run(minrm_command(flags[:5], module="minrm.score"), cwd=ROOT, capture_output=True, text=True)
    return {
        "data": data,
        "stdout": one.stdout,
        "one": [json.loads(line) for line in open(tmp / "one.jsonl")],
        "summary": json.load(open(tmp / "one.summary.json")),
        "two": pq.read_table(tmp / "two.parquet").to_pylist(),
        "failed": failed,
    }


def assert_rewards_are_hf(records: list[dict], data: str, model_dir: str) -> None:
    """Each response of `data` tokenized here (the tulu template on prompt + response) and scored alone by
    Hugging Face's own forward of the saved model: the records' rewards, to 1e-5. Line 6 is bad."""
    tokenizer = tulu_tokenizer()
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    rows = [json.loads(line) for line in open(data)]
    assert [r["row"] for r in records] == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12]
    for record in records:
        row = rows[record["row"] - 1]
        convs = [row["prompt"] + row["chosen"]] + [row["prompt"] + r for r in row["rejected"]]
        seqs = [tokenizer.apply_chat_template(c, return_dict=False) for c in convs]
        rewards = [*record["chosen_rewards"], *record["rejected_rewards"]]
        torch.testing.assert_close(torch.tensor(rewards), torch.tensor(hf_forward(model, seqs)), rtol=0, atol=1e-5)
        assert record["subset"] == row["subset"] and len(rewards) == len(convs)


def test_command_rewards_equal_hf_forward(scored, tiny_model_dir):
    assert_rewards_are_hf(scored["one"], scored["data"], tiny_model_dir)


def test_command_summary_and_table(scored):
    out, s = scored["one"], scored["summary"]
    right = [r["chosen_rewards"][0] > max(r["rejected_rewards"]) for r in out]
    assert [r["correct"] for r in out] == right
    assert s["rows"] == len(out) and s["best_of_n_accuracy"] == pytest.approx(sum(right) / len(out))
    each = [sum(r["chosen_rewards"][0] > x for x in r["rejected_rewards"]) / len(r["rejected_rewards"]) for r in out]
    assert s["accuracy"] == pytest.approx(sum(each) / len(out))  # the mean over each row's comparisons
    for cat in ("two", "four", "mixed"):
        mine = [ok for r, ok in zip(out, right) if r["subset"] == cat]
        assert s["categories"][cat]["rows"] == len(mine)
        assert s["categories"][cat]["best_of_n_accuracy"] == pytest.approx(sum(mine) / len(mine))
        assert f"| {cat} | {len(mine)} | {s['categories'][cat]['accuracy']:.4f} | {sum(mine) / len(mine):.4f} |" in scored["stdout"]
    four = [ok for r, ok in zip(out, right) if r["subset"] in ("four", "mixed")]
    assert s["sections"]["Best of 4"] == pytest.approx(sum(four) / len(four))
    assert s["score"] == pytest.approx((s["sections"]["Pairs"] + s["sections"]["Best of 4"]) / 2)
    assert "skipped 1 bad rows: the last message of `rejected[N]` is the 'user''s" in scored["stdout"]  # by reason
    # The identical pair (line 4): one reward for both, so a tie, wrong as the reference counts it.
    tie = next(r for r in out if r["row"] == 4)
    assert tie["chosen_rewards"] == tie["rejected_rewards"] and tie["correct"] is False


def test_two_processes_give_the_one_process_output(scored):
    one, two = scored["one"], scored["two"]
    assert [(r["row"], r["subset"], r["correct"]) for r in two] == [(r["row"], r["subset"], r["correct"]) for r in one]
    for a, b in zip(one, two):
        torch.testing.assert_close(
            torch.tensor([*b["chosen_rewards"], *b["rejected_rewards"]]),
            torch.tensor([*a["chosen_rewards"], *a["rejected_rewards"]]),
            rtol=0,
            atol=1e-5,
        )


def test_bad_rows_stop_the_command_naming_file_and_line(scored):
    failed = scored["failed"]
    assert failed.returncode != 0
    assert f"{scored['data']} line 6: the last message of `rejected[0]` is the 'user''s" in failed.stderr
    assert "--skip_bad_rows" in failed.stderr and os.path.exists(scored["data"])


def test_score_bench_counts_tokens_and_agrees_with_hf():
    """scripts/bench_score's accounting: computed tokens of both paths written out here from the
    rows, and the same rewards from both (fp32)."""
    from scripts import bench_score

    rows = bench_score.synthetic_rows("multiturn", 3, 4, seed=0)
    assert all(len(r["responses"]) == 4 and all(s[: len(r["prompt"])] == r["prompt"] for s in r["responses"]) for r in rows)
    result = bench_score.time_scoring(rows, "9m", max_tokens=300)  # about one row per batch
    timed = [[rows[i] for i in b] for b in micro_batches(rows, "shared_prefix", max_tokens=300, longest_first=True)[1:]]
    padded = sum(4 * len(b) * max(len(s) for r in b for s in r["responses"]) for b in timed)
    shared = sum(len(r["prompt"]) + sum(len(s) - len(r["prompt"]) for s in r["responses"]) for b in timed for r in b)
    assert result["hf_padded"]["computed_tokens"] == padded
    assert result["minrm.score"]["computed_tokens"] == shared
    assert result["batches"] == len(timed) > 0 and result["max_reward_difference"] < 1e-4
