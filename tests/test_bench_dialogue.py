"""scripts/bench_dialogue.py (`python -m scripts.bench --profile dialogue`): the rows minrm trains on have
exactly the lengths of the length file, as minrm tokenizes them (read back from minrm's own dataset
cache), and the computed tokens the bench counts for each system are the ones written out here from
those rows' ids; scripts/bench_loop_profile.py's grouping of a profile. No timing is asserted."""

import pytest

from scripts import bench_dialogue, bench_loop_profile


@pytest.fixture(scope="module")
def dialogue(tmp_path_factory):
    lengths = bench_dialogue.read_lengths()[:8]
    folder = str(tmp_path_factory.mktemp("dialogue"))
    model, data, rows = bench_dialogue.prepare(folder, "9m", 4, 1, lengths)
    return lengths, rows


def test_rows_have_the_files_lengths_as_minrm_tokenizes_them(dialogue):
    lengths, rows = dialogue
    assert len(bench_dialogue.read_lengths()) == 300
    assert len(rows) == 8
    for row in rows:
        line = row["prompt"][0] - 4  # the pair's line, as the bench writes it
        prompt, chosen, rejected = lengths[line]
        assert len(row["prompt"]) == prompt
        assert [len(s) for s in row["responses"]] == [prompt + chosen, prompt + rejected]
        assert row["responses"][0][:prompt] == row["responses"][1][:prompt] == row["prompt"]
        assert row["responses"][0][prompt] != row["responses"][1][prompt]  # the prompt is the whole shared prefix
        assert [s[-1] for s in row["responses"]] == [3, 3]  # each ends with the eos minrm appends
        assert row["scores"] == [1.0, 0.0]


def test_computed_tokens_per_system(dialogue):
    _, rows = dialogue
    steps = bench_dialogue.step_lengths(rows, 4, 1)
    assert len(steps) == 2
    order = bench_dialogue.training_order(8, 1)
    assert sorted(order) == list(range(8))
    for k, batch in enumerate(steps):
        mine = [rows[i] for i in order[4 * k : 4 * k + 4]]
        sequences = [s for r in mine for s in r["responses"]]
        assert len(sequences) == 8
        expected = {
            "bare": 8 * max(len(s) for s in sequences),  # every sequence padded to the longest
            "padded": 8 * max(len(s) for s in sequences),
            "packed": sum(len(s) for s in sequences),  # each whole sequence, the prompt twice
            # the prompt once, then each response's tokens after it
            "shared_prefix": sum(
                len(r["prompt"]) + sum(len(s) - len(r["prompt"]) for s in r["responses"]) for r in mine
            ),
        }
        for system, tokens in expected.items():
            assert bench_dialogue.computed_tokens(batch, system) == tokens, system


def test_profile_groups_count_builtins_to_their_caller():
    collate = ("/x/minrm/training/batching.py", 10, "collate")
    hook = ("/x/torch/distributed/fsdp/_fully_shard/_fsdp_state.py", 5, "_pre_forward")
    tensor = ("~", 0, "<built-in method torch.tensor>")
    linear = ("~", 0, "<built-in method torch._C._nn.linear>")
    stats = {
        collate: (1, 1, 0.5, 2.0, {}),
        hook: (3, 3, 0.25, 1.0, {}),
        tensor: (5, 5, 1.5, 1.5, {collate: (4, 4, 1.0, 1.0), hook: (1, 1, 0.5, 0.5)}),
        linear: (2, 2, 4.0, 4.0, {collate: (2, 2, 4.0, 4.0)}),
    }
    groups = bench_loop_profile.grouped(stats)
    assert groups == {
        "minrm rows, cut, collate": 0.5 + 1.0,
        "FSDP2 hooks and copies": 0.25 + 0.5,
        "forward matmuls (linear, matmul)": 4.0,
    }
    start = {collate: (1, 1, 0.125, 0.5, {}), tensor: (1, 1, 0.25, 0.25, {collate: (1, 1, 0.25, 0.25)})}
    left = bench_loop_profile.minus(stats, start)
    assert left[collate][2] == 0.375 and left[tensor][2] == 1.25 and left[tensor][4][collate][2] == 0.75
    assert left[hook] == stats[hook]
