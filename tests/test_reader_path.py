"""The readability budget of issue 26, held by a test: one optimizer step of the default run in at most 450
lines in at most 6 files, a JSONL line to tokens in at most 150, the package in at most 3,000 code lines with
no file over 300 (counted as `grep -cvE '^\\s*(#|$)'` counts them). scripts/reader_path.py lists the paths;
each function it names must exist, so the lists cannot silently drift from the code."""

import re

from scripts import reader_path
from tests.conftest import ROOT


def test_the_step_and_a_jsonl_line_read_within_their_budgets():
    for path, lines, files in ((reader_path.STEP, 450, 6), (reader_path.JSONL, 150, 3)):
        rows = reader_path.count(path)
        assert not [missing for _, _, missing in rows if missing], rows  # every listed function exists
        assert sum(n for _, n, _ in rows) <= lines and len(rows) <= files, rows


def test_the_package_is_at_most_3000_code_lines_and_no_file_over_300():
    sizes = {}
    for path in (ROOT / "minrm").rglob("*.py"):
        sizes[str(path.relative_to(ROOT))] = sum(1 for line in path.read_text().splitlines() if not re.match(r"^\s*(#|$)", line))
    assert sum(sizes.values()) <= 3000 and max(sizes.values()) <= 300, sizes
