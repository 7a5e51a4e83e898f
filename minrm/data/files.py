"""Local data files (.jsonl, .json, .parquet) read into an on-disk, memory-mapped Arrow dataset.

A file is streamed, a few MB at a time, into an Arrow file in this process's scratch folder and
opened memory-mapped, so reading holds neither the file nor its rows in memory, whatever its size.
JSON rows are stored unparsed (`{"row": number, "json": text}`) and parsed while tokenizing, so
that invalid JSON and rows of mixed types are reported by line instead of failing in Arrow; a bad
file (empty, not UTF-8, not rows of objects) stops the run here with its line.

The scratch folder is `$TMPDIR/minrm-data-*` (Python's `tempfile`: /tmp unless TMPDIR is set), one
per process, deleted when the process exits: a node's own disk, never a shared home directory, and
two processes reading the same file never share or race on a scratch file. The datasets built
from it (`datasets.map` writes its output beside its input) live there too.
"""

import atexit
import codecs
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

ROWS_OF_OBJECTS = "a .json file holds a list of objects, or one object per line"
BATCH_BYTES = 1 << 21  # text held before it is written: bounds the memory reading takes
CHUNK = 1 << 19  # characters of a .json file decoded at a time
JSON_ROWS = pa.schema([("row", pa.int64()), ("json", pa.string())])

_scratch: list[str] = []  # this process's scratch folder, made on first use


def scratch_dir() -> str:
    """This process's scratch folder, deleted at exit (by the process that made it, not a forked worker)."""
    if not _scratch:
        path = tempfile.mkdtemp(prefix="minrm-data-")
        owner = os.getpid()
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
        _scratch.append(path)
    return _scratch[0]


def _empty(path: str):
    raise SystemExit(f"minrm: error: {path} is empty: it has no rows")


def _to_dataset(path: str, schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> datasets.Dataset:
    """Write `batches` to an Arrow file in the scratch folder and open it memory-mapped; refuse no rows."""
    fd, arrow = tempfile.mkstemp(suffix=".arrow", prefix=os.path.basename(path) + "-", dir=scratch_dir())
    os.close(fd)
    rows = 0
    with pa.OSFile(arrow, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
            rows += batch.num_rows
    if rows == 0:
        _empty(path)
    return datasets.Dataset.from_file(arrow)


def _json_rows(rows: list[int], texts: list[str]) -> pa.RecordBatch:
    return pa.record_batch([pa.array(rows, pa.int64()), pa.array(texts, pa.string())], schema=JSON_ROWS)


# ----------------------------------------------------------------------------------------------
# JSON lines


def _jsonl_batches(path: str) -> Iterator[pa.RecordBatch]:
    """Non-blank lines as `{"row": line number, "json": text}`, a few MB at a time."""
    rows, texts, size = [], [], 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise SystemExit(
                    f"minrm: error: {path} line {i}: bytes that are not UTF-8 ({raw[e.start : e.start + 4]!r} at "
                    f"byte {e.start + 1} of the line); save the file as UTF-8"
                ) from None
            if line.strip():
                rows.append(i)
                texts.append(line)
                size += len(raw)
                if size >= BATCH_BYTES:
                    yield _json_rows(rows, texts)
                    rows, texts, size = [], [], 0
    if rows:
        yield _json_rows(rows, texts)


def _jsonl(path: str) -> datasets.Dataset:
    return _to_dataset(path, JSON_ROWS, _jsonl_batches(path))


# ----------------------------------------------------------------------------------------------
# .json: a list of objects, or JSON lines


class _Text:
    """A .json file's text, decoded CHUNK characters at a time: `buf` holds the part not yet consumed,
    and `line`, `column` where it starts in the file, so that an error's line and column are the file's."""

    def __init__(self, path: str):
        self.file = open(path, "rb")
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.eof = "", False
        self.line, self.column = 1, 0  # of buf[0] in the file (column counted from 0)

    def more(self, at_least: int | None = None) -> bool:
        """Append at least `at_least` (CHUNK) more characters (fewer at the end); False at the end of the file."""
        if self.eof:
            return False
        at_least = at_least or CHUNK
        while at_least > 0 and not self.eof:
            data = self.file.read(at_least)
            self.eof = not data
            text = self.decoder.decode(data, final=self.eof)  # valid: checked by _check_utf8 first
            self.buf += text
            at_least -= len(text)
        return True

    def drop(self, n: int) -> None:
        """Forget the first n characters of buf (consumed), keeping count of lines and columns."""
        newlines = self.buf.count("\n", 0, n)
        self.line += newlines
        self.column = n - self.buf.rfind("\n", 0, n) - 1 if newlines else self.column + n
        self.buf = self.buf[n:]

    def skip_space(self, i: int) -> int:
        """The first position at or after i that is not JSON whitespace, reading on as needed (len(buf) at the end)."""
        while True:
            while i < len(self.buf) and self.buf[i] in " \t\n\r":
                i += 1
            if i < len(self.buf) or not self.more():
                return i
            self.drop(i)
            i = 0

    def value(self, i: int, decoder: json.JSONDecoder) -> tuple[object, int]:
        """The JSON value at buf[i:] and where it ends, reading on while the value may be cut off; a
        JSONDecodeError at a position of buf when it is wrong whatever follows."""
        while True:
            try:
                obj, end = decoder.raw_decode(self.buf, i)
            except json.JSONDecodeError as e:
                # A string may run on to any length; any other token is short, so an error well
                # before the end of what was read stays an error however the text goes on.
                cut = e.msg.startswith("Unterminated string") or len(self.buf) - e.pos < 4096
                if cut and self.more(max(CHUNK, len(self.buf))):
                    continue
                raise
            # A number may go on past what was read ("12." then "5"): the regex looks 3 characters ahead.
            if end < len(self.buf) - 3 or not self.more():
                return obj, end

    def fail(self, path: str, e: json.JSONDecodeError):
        before = self.buf[: e.pos]
        newlines = before.count("\n")
        column = e.pos - before.rfind("\n") if newlines else self.column + e.pos + 1
        raise SystemExit(
            f"minrm: error: {path} line {self.line + newlines} column {column}: invalid JSON ({e.msg})"
        ) from None


def _check_utf8(path: str) -> str:
    """Decode the whole file once, streaming, before anything is parsed (so that bad bytes are
    reported first, with their line); the first character that is not whitespace ("" if none)."""
    decoder, newlines, first = codecs.getincrementaldecoder("utf-8-sig")(), 0, ""
    with open(path, "rb") as f:
        while True:
            data = f.read(CHUNK)
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:  # e.object: the bytes held from the last read, then data
                line = newlines + e.object[: e.start].count(b"\n") + 1
                raise SystemExit(
                    f"minrm: error: {path} line {line}: bytes that are not UTF-8; save the file as UTF-8"
                ) from None
            newlines += data.count(b"\n")
            first = first or text.lstrip()[:1]
            if not data:
                return first


def _array_batches(path: str, text: _Text) -> Iterator[pa.RecordBatch]:
    """The objects of a JSON array as `{"row": index from 0, "json": its text}`, with json.loads'
    own errors (message, line, column); rows that are not objects are refused after the whole file
    parsed, as json.loads would have read it all first."""
    decoder, rows, texts, size, index, not_object = json.JSONDecoder(), [], [], 0, 0, None
    try:
        i = text.skip_space(text.skip_space(0) + 1)  # after the "[" that opens the file
        closed = i < len(text.buf) and text.buf[i] == "]"
        while not closed:
            obj, end = text.value(i, decoder)
            if isinstance(obj, dict):
                rows.append(index)
                texts.append(text.buf[i:end])
                size += end - i
            elif not_object is None:
                not_object = (index, type(obj).__name__)
            index += 1
            if size >= BATCH_BYTES:
                yield _json_rows(rows, texts)
                rows, texts, size = [], [], 0
            if end >= CHUNK:  # forget what is parsed, now and then (each drop copies the rest)
                text.drop(end)
                end = 0
            i = text.skip_space(end)
            if i == len(text.buf) or text.buf[i] not in ",]":
                raise json.JSONDecodeError("Expecting ',' delimiter", text.buf, i)
            closed = text.buf[i] == "]"
            i = text.skip_space(i + 1) if not closed else i
        end = text.skip_space(i + 1)
        if end < len(text.buf):
            raise json.JSONDecodeError("Extra data", text.buf, end)
    except json.JSONDecodeError as e:
        text.fail(path, e)
    if not_object is not None:
        raise SystemExit(
            f"minrm: error: {path} row {not_object[0]} is a JSON {not_object[1]}, not an object: {ROWS_OF_OBJECTS}"
        )
    if rows:
        yield _json_rows(rows, texts)


def _refuse_one_value(path: str, text: _Text) -> None:
    """A .json file that is not an array reads as JSON lines, where json.loads fails on it ("Extra
    data" after the first line) or finds one object on one line; one other value is refused."""
    start = text.skip_space(0)
    try:
        whole, end = text.value(start, json.JSONDecoder())
    except json.JSONDecodeError:
        return
    one_line = "\n" not in text.buf[start:end]
    if text.skip_space(end) < len(text.buf) or (isinstance(whole, dict) and one_line):
        return
    kind = "object" if isinstance(whole, dict) else type(whole).__name__
    raise SystemExit(f"minrm: error: {path} holds one JSON {kind}, not rows: {ROWS_OF_OBJECTS}")


def _json(path: str) -> tuple[datasets.Dataset, str]:
    """A .json file: a list of objects (rows numbered from 0), or JSON lines (numbered from 1)."""
    first = _check_utf8(path)
    if not first:
        _empty(path)
    text = _Text(path)
    with text.file:
        if first == "[":
            return _to_dataset(path, JSON_ROWS, _array_batches(path, text)), "row"
        _refuse_one_value(path, text)
    return _jsonl(path), "line"


# ----------------------------------------------------------------------------------------------
# Parquet


def _parquet(path: str) -> datasets.Dataset:
    size = os.path.getsize(path)
    if size == 0:
        _empty(path)
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(0, size - 4))
        tail = f.read(4)
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        raise SystemExit(f"minrm: error: {path} is not a Parquet file (it lacks the PAR1 marks at its start and end)")
    parquet = pq.ParquetFile(path)
    return _to_dataset(path, parquet.schema_arrow, parquet.iter_batches(batch_size=1000))


def read_local_file(path: str) -> tuple[datasets.Dataset, str]:
    """A local data file's rows and the word for its row numbers ("line", from 1, or "row", from 0)."""
    if path.endswith(".parquet"):
        return _parquet(path), "row"
    if path.endswith(".json"):
        return _json(path)
    return _jsonl(path), "line"
