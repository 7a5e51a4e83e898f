"""scripts/bench.py's accounting, on a preference file read as minrm reads it: the computed-token
counts and the wasted fraction against counts written out here from the pairs themselves."""

import pytest

from scripts import bench


@pytest.fixture(scope="module")
def file_pairs(pairs_file):
    return bench.file_pairs(pairs_file, None, 4)


def test_file_pairs_are_the_trainers_tokens(file_pairs):
    assert len(file_pairs) == 4
    for p in file_pairs:
        n = len(p["prompt"])
        assert n > 0 and p["chosen"][:n] == p["rejected"][:n] == p["prompt"]


def test_one_step_per_mode_counts_tokens(file_pairs):
    # Step 0 warms up on the first 4 pairs; step 1 is the same 4 again, run twice per mode.
    rows = {r["mode"]: r for r in bench.time_modes(list(bench.BATCHINGS), file_pairs * 2, 4, 1, "9m", repeats=2)}
    batch = file_pairs
    lengths = [(len(p["prompt"]), len(p["chosen"]), len(p["rejected"])) for p in batch]
    unique = sum(c + r - n for n, c, r in lengths)
    padded = 2 * len(batch) * max(max(c, r) for _, c, r in lengths)
    assert rows["padded"]["wasted_fraction"] == pytest.approx(1 - unique / padded)
    assert rows["packed"]["wasted_fraction"] == pytest.approx(1 - unique / sum(c + r for _, c, r in lengths))
    assert rows["shared_prefix"]["wasted_fraction"] == 0
    computed = {"padded": padded, "packed": sum(c + r for _, c, r in lengths), "shared_prefix": unique}
    for mode, row in rows.items():
        assert row["computed_tokens_per_s"] == pytest.approx(computed[mode] / row["seconds"])
        assert row["forward_backward_tokens_per_s"] > row["computed_tokens_per_s"]  # the step less its optimizer
        real = sum(c + r for _, c, r in lengths)
        assert row["real_tokens_per_s"] == pytest.approx(real / row["seconds"])
        assert row["pairs_per_s"] == pytest.approx(len(batch) / row["seconds"])
