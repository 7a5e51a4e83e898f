"""Local files are streamed into memory-mapped Arrow files: the rows of a plain reading, never the
file in memory, json.loads' own errors at any chunk boundary, and a scratch folder gone at exit."""

import ast
import json
import os
import random
import subprocess
import sys
import tracemalloc

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minrm.data import cache
from minrm.data import files as local_files
from scripts.make_jsonl import conversation_pair
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    rng = random.Random(0)
    return [conversation_pair(rng) for _ in range(5000)]  # about 24 MB of JSON


def traced_read(path: str) -> tuple:
    """The rows read, the peak of Python's allocations while reading, and Arrow's allocations left."""
    arrow_before = pa.total_allocated_bytes()
    tracemalloc.start()
    try:
        ds, unit = local_files.read_local_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return ds, unit, peak, pa.total_allocated_bytes() - arrow_before


def test_reading_holds_a_few_mb_not_the_file(tmp_path, rows):
    """A .jsonl (with blank lines) and a .json list of the same rows, each about 24 MB: reading
    allocates under a quarter of that (a list of the lines would take more than the file), and the
    rows are a memory-mapped file's, line numbers and text as a plain reading of the file gives."""
    jsonl, array = tmp_path / "rows.jsonl", tmp_path / "rows.json"
    jsonl.write_text("".join(json.dumps(r) + "\n" + "\n" * (i % 3 == 0) for i, r in enumerate(rows)))
    array.write_text(json.dumps(rows))
    for path, unit in ((jsonl, "line"), (array, "row")):
        size = os.path.getsize(path)
        assert size > 20e6
        ds, got_unit, peak, arrow = traced_read(str(path))
        assert got_unit == unit and peak < size / 4 and arrow < 1e6, (path, peak, arrow)
        assert ds.cache_files and ds.cache_files[0]["filename"].startswith(local_files.scratch_dir())
        if unit == "line":
            lines = [(i, line) for i, line in enumerate(open(path, encoding="utf-8"), start=1) if line.strip()]
            assert ds["row"] == [i for i, _ in lines] and ds["json"] == [line for _, line in lines]
        else:
            assert ds["row"] == list(range(len(rows))) and [json.loads(t) for t in ds["json"]] == rows


def test_parquet_rows_are_memory_mapped(tmp_path, rows):
    path = str(tmp_path / "rows.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:3000]), path, row_group_size=700)
    ds, unit, _, arrow = traced_read(path)
    assert unit == "row" and arrow < 1e6 and ds.to_list() == rows[:3000]


def json_outcome(text: str) -> tuple:
    """What json.loads makes of a whole .json array file: its rows, or the error minrm must report."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        return ("error", f"line {e.lineno} column {e.colno}: invalid JSON ({e.msg})")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            return ("error", f"row {i} is a JSON {type(row).__name__}, not an object: {local_files.ROWS_OF_OBJECTS}")
    return ("rows", rows)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_json_arrays_read_in_chunks_as_json_loads_reads_them_whole(tmp_path, monkeypatch, chunk):
    """Chunks of a few characters: values, strings, escapes and numbers are cut at every place."""
    monkeypatch.setattr(local_files, "CHUNK", chunk)
    objects = [{"a": "x\\u00e9y", "b": [1, -2.5e3, None, True]}, {"c": {"d": "\u2028é"}}, {}]
    texts = [json.dumps(objects), json.dumps(objects, indent=2, ensure_ascii=False), "[{} ]  \n"]
    texts += [t[:cut] for t in texts[:2] for cut in range(1, len(t), 5)]  # cut anywhere: invalid
    texts += ['[{}, {"a": 1},]', "[{}]\n[{}]", '[{"a": tru}]', '[{"a": 1} {"b": 2}]', "[\n{},\n\n{", "[ "]
    texts += ["[{}, 12.5e-3]", "[-1e+10, {}, 3]", "[{}, 1.]"]  # numbers cut where a chunk ends
    path = tmp_path / "rows.json"
    for text in texts:
        path.write_text(text, encoding="utf-8")
        kind, expected = json_outcome(text)
        if kind == "rows":
            ds, unit = local_files.read_local_file(str(path))
            assert [json.loads(t) for t in ds["json"]] == expected and ds["row"] == list(range(len(expected)))
        else:
            with pytest.raises(SystemExit) as e:
                local_files.read_local_file(str(path))
            assert str(e.value) == f"minrm: error: {path} {expected}", text


def test_the_scratch_folder_is_gone_when_the_process_exits(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"chosen": "a b", "rejected": "a c"}) + "\n")
    code = f"from minrm.data.files import read_local_file; print(read_local_file({str(path)!r})[0].cache_files)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    arrow = ast.literal_eval(out)[0]["filename"]
    assert os.path.basename(os.path.dirname(arrow)).startswith("minrm-data-") and not os.path.exists(arrow)
    assert not os.path.exists(os.path.dirname(arrow))


def resident_bytes(path: str) -> int:
    """The bytes of `path`'s memory maps resident in this process (/proc/self/smaps)."""
    total, mine = 0, False
    for line in open("/proc/self/smaps"):
        if "-" in line.split(" ", 1)[0]:  # a mapping's first line: "start-end perms offset dev inode path"
            mine = line.rstrip().endswith(path)
        elif mine and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_the_cache_copy_holds_a_chunk_of_the_rows_not_all(tmp_path, monkeypatch):
    """The cache's copy of memory-mapped tokenized rows (40 MB), 4000 of 5000 selected in order as the
    mixer selects the rows it keeps, 100 rows (0.8 MB) a chunk: the pages of the rows' file resident in
    this process stay a few chunks' (5.5 MB at most here), where one map read through the whole copy
    holds them all (40 MB) by its end."""
    source = str(tmp_path / "rows.arrow")
    features = datasets.Features({"responses": datasets.List(datasets.List(datasets.Value("int32")))})
    with cache.ArrowWriter(features=features, path=source) as writer:
        for i in range(0, 5000, 500):
            writer.write_batch({"responses": [[[k] * 1000] * 2 for k in range(i, i + 500)]})
        writer.finalize()
    rows = datasets.Dataset.from_file(source).select(sorted(random.Random(0).sample(range(5000), 4000)))
    peak = []
    write_table = cache.ArrowWriter.write_table

    def measured(self, table, *args, **kwargs):
        write_table(self, table, *args, **kwargs)
        peak.append(resident_bytes(source))

    monkeypatch.setattr(cache.ArrowWriter, "write_table", measured)
    cache._save_rows(rows, str(tmp_path / "copy.arrow"), chunk=100)
    assert len(peak) == 40 and max(peak) < 10e6, max(peak)  # a quarter of the rows: one map ends at all
    copy = datasets.Dataset.from_file(str(tmp_path / "copy.arrow"))
    assert copy.data.table.equals(rows.with_format("arrow")[:]) and copy.features == features
