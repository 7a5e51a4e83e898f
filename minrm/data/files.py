"""Local data files (.jsonl, .json, .parquet) streamed into an on-disk, memory-mapped Arrow dataset.

A file is read a few MB at a time into an Arrow file, so reading holds neither the file nor its rows in
memory. JSON rows stay unparsed (`{"row": number, "json": text}`) until tokenizing, so that invalid JSON and
rows of mixed types are reported by line instead of failing in Arrow; a bad file (empty, not UTF-8, not rows
of objects) stops the run here with its line. The Arrow files (and what `datasets.map` builds from them) live
in `$TMPDIR/minrm-data-*`, one folder per process, deleted at exit: a node's own disk, never a shared home
directory, and no two processes ever share or race on a scratch file.
"""

import atexit
import codecs
import functools
import itertools
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
CHUNK = 1 << 19  # characters of a .json file read at a time
JSON_ROWS = pa.schema([("row", pa.int64()), ("json", pa.string())])
DECODER = json.JSONDecoder()


@functools.cache
def scratch_dir() -> str:
    """This process's scratch folder, deleted at exit (by the process that made it, not a forked worker)."""
    path, owner = tempfile.mkdtemp(prefix="minrm-data-"), os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    return path


def _empty(path: str):
    raise SystemExit(f"minrm: error: {path} is empty: it has no rows")


def read_local_file(path: str) -> tuple[datasets.Dataset, str]:
    """A local data file's rows and the word for its row numbers ("line", from 1, or "row", from 0)."""
    if path.endswith(".parquet"):
        return _parquet(path), "row"
    _check_utf8(path)
    if path.endswith(".json") and (rows := _json_array(path)) is not None:
        return rows, "row"
    with open(path, encoding="utf-8-sig", newline="\n") as f:  # lines end at "\n" only, as _check_utf8 counts them
        lines = ((i, line) for i, line in enumerate(f, start=1) if line.strip())  # numbered from 1
        return _to_dataset(path, JSON_ROWS, _batches(lines)), "line"


def _check_utf8(path: str) -> None:
    """Decode the whole file a line (CHUNK bytes at most) at a time: bad bytes stop the run, with their line."""
    decoder, line, column = codecs.getincrementaldecoder("utf-8-sig")(), 1, 0  # column: this line's bytes read
    with open(path, "rb") as f:
        for data in itertools.chain(iter(lambda: f.readline(CHUNK), b""), [b""]):  # a last b"" ends the decoding
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:  # e.object: the bytes held from the last read, then data
                byte = column - (len(e.object) - len(data)) + e.start + 1
                raise SystemExit(f"minrm: error: {path} line {line}: bytes that are not UTF-8 ({e.object[e.start : e.start + 4]!r} "
                                 f"at byte {byte} of the line); save the file as UTF-8") from None  # fmt: skip
            line, column = (line + 1, 0) if data.endswith(b"\n") else (line, column + len(data))


def _batches(rows: Iterator[tuple[int, str]]) -> Iterator[pa.RecordBatch]:
    """(row number, JSON text) pairs as record batches of about BATCH_BYTES of text each."""
    batch, size = [], 0
    for row in rows:
        batch.append(row)
        size += len(row[1])
        if size >= BATCH_BYTES:
            yield pa.RecordBatch.from_arrays(list(zip(*batch)), schema=JSON_ROWS)
            batch, size = [], 0
    if batch:
        yield pa.RecordBatch.from_arrays(list(zip(*batch)), schema=JSON_ROWS)


def _to_dataset(path: str, schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> datasets.Dataset:
    """Write `batches` to an Arrow file in the scratch folder and open it memory-mapped; refuse no rows."""
    fd, arrow = tempfile.mkstemp(suffix=".arrow", prefix=os.path.basename(path) + "-", dir=scratch_dir())
    with open(fd, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    ds = datasets.Dataset.from_file(arrow)
    return ds if len(ds) else _empty(path)


# ----------------------------------------------------------------------------------------------
# .json: a list of objects, or JSON lines


class _Text:
    """A .json file's text, read CHUNK characters at a time: `buf` holds the part not yet consumed, which
    starts at `line`, `column` (from 0) of the file, so that an error's line and column are the file's."""

    def __init__(self, path: str):
        self.file = open(path, encoding="utf-8-sig", newline="")  # valid: _check_utf8 ran first
        self.buf, self.eof, self.line, self.column = "", False, 1, 0

    def more(self, n: int) -> None:
        """Forget buf[:n] (consumed), counting its lines and columns; then read max(CHUNK, what buf still holds)."""
        text = self.file.read(max(CHUNK, len(self.buf) - n))
        newlines = self.buf.count("\n", 0, n)
        self.line += newlines
        self.column = n - self.buf.rfind("\n", 0, n) - 1 if newlines else self.column + n
        self.buf, self.eof = self.buf[n:] + text, not text

    def skip_space(self, i: int) -> int:
        """The first position at or after i that is not JSON whitespace, reading on (len(buf) at the end)."""
        while (i := json.decoder.WHITESPACE.match(self.buf, i).end()) == len(self.buf) and not self.eof:
            self.more(i)
            i = 0
        return i

    def value(self, i: int) -> tuple[object, int, int]:
        """The JSON value at buf[i:], and where it starts and ends, reading on while what follows may change
        it; a JSONDecodeError at a position of buf when it is wrong whatever follows."""
        while True:
            try:
                obj, end = DECODER.raw_decode(self.buf, i)
                # A number may go on past what was read ("12." then "5"): its regex looks 3 characters ahead.
                if end < len(self.buf) - 3 or self.eof:
                    return obj, i, end
            except json.JSONDecodeError as e:
                # A string may run on to any length; any other token is short, so an error well
                # before the end of what was read stays an error however the text goes on.
                if self.eof or (len(self.buf) - e.pos >= 4096 and not e.msg.startswith("Unterminated string")):
                    raise
            self.more(i)  # a long value: double what is held
            i = 0


def _array_rows(path: str, text: _Text, i: int) -> Iterator[tuple[int, str]]:
    """The objects of the array that opens at buf[i], and their index, with json.loads' own errors (message,
    line, column); a row that is not an object is refused once the whole file parsed, as json.loads would."""
    not_object = None
    try:
        for index in itertools.count():
            i = text.skip_space(i + 1)  # after the "[" or the ","
            if index == 0 and text.buf[i : i + 1] == "]":
                break
            obj, i, end = text.value(i)
            if isinstance(obj, dict):
                yield index, text.buf[i:end]
            else:
                not_object = not_object or (index, type(obj).__name__)
            i = text.skip_space(end)
            if (sep := text.buf[i : i + 1]) == "]":
                break
            if sep != ",":
                raise json.JSONDecodeError("Expecting ',' delimiter", text.buf, i)
        if (end := text.skip_space(i + 1)) < len(text.buf):
            raise json.JSONDecodeError("Extra data", text.buf, end)
    except json.JSONDecodeError as e:  # its line and column are buf's, which starts at text.line, text.column
        line, column = text.line + e.lineno - 1, e.colno + (text.column if e.lineno == 1 else 0)
        raise SystemExit(f"minrm: error: {path} line {line} column {column}: invalid JSON ({e.msg})") from None
    if not_object:
        raise SystemExit(f"minrm: error: {path} row {not_object[0]} is a JSON {not_object[1]}, not an object: {ROWS_OF_OBJECTS}")


def _json_array(path: str) -> datasets.Dataset | None:
    """A .json file's rows when it is a list of objects; None when it reads as JSON lines. One other value
    is refused: JSON lines fail on it ("Extra data" after its first line) unless it is an object on one line."""
    text = _Text(path)
    with text.file:
        if (start := text.skip_space(0)) == len(text.buf):
            _empty(path)
        if text.buf[start] == "[":
            return _to_dataset(path, JSON_ROWS, _batches(_array_rows(path, text, start)))
        try:
            whole, start, end = text.value(start)
        except json.JSONDecodeError:
            return None  # JSON lines report it with its line
        one_line_object = isinstance(whole, dict) and "\n" not in text.buf[start:end]
        if not one_line_object and text.skip_space(end) == len(text.buf):
            kind = "object" if isinstance(whole, dict) else type(whole).__name__
            raise SystemExit(f"minrm: error: {path} holds one JSON {kind}, not rows: {ROWS_OF_OBJECTS}")
    return None


def _parquet(path: str) -> datasets.Dataset:
    if os.path.getsize(path) == 0:
        _empty(path)
    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowInvalid as e:
        raise SystemExit(f"minrm: error: {path} is not a Parquet file ({e})") from None
    return _to_dataset(path, parquet.schema_arrow, parquet.iter_batches(batch_size=1000))
