"""The lines a newcomer reads to follow one optimizer step of the default run (`python -m minrm.train`:
the toy, shared_prefix, one CPU process) and one JSONL line to tokens, per file: the code lines
(non-blank, non-comment, docstrings included) of each function and class on the path, as the
issue tracker counts them. The lists below are the path; keep them in step with the code.

    python -m scripts.reader_path
"""

import ast
import importlib
import inspect
import re

# (module, names on the path), each a class or a function; train.main counts up to its export, after the loop.
STEP = {
    "minrm.train": ["lr_multiplier", "forward_backward", "train_step", "main"],
    "minrm.data.batching": ["stream_indices", "_epoch_order", "step_indices", "rows_at", "row_sizes", "micro_batches",
                            "Segment", "PackedLayout", "Preferences", "collate", "to_device"],
    "minrm.model.reward": ["reward_forward", "prepare", "shard_model"],
    "minrm.model.attention": ["segment_attention", "sdpa", "use_packed_attention"],
    "minrm.model.loss": ["row_statistics"],
    "minrm.checks": ["packed_attentions"],
}  # fmt: skip
# What a line's own text passes through, from the file to its tokenized row (a conversational pair, as
# mixer.build_side runs it); then what runs once per file or dataset before any line: the UTF-8 pass over the
# file, the format read from the first row, the columns checked on the first 100.
JSONL = {
    "minrm.data.files": ["read_local_file", "_batches", "_to_dataset"],
    "minrm.data.mixer": ["read_raw", "tokenize_dataset", "fit_row"],
    "minrm.data.formats": ["parse_row", "_listed", "tokenize_row", "_chosen_rejected", "_number", "_chat_ids",
                           "_messages"],
}  # fmt: skip
JSONL_SETUP = {
    "minrm.data.files": ["_check_utf8"],
    "minrm.data.mixer": ["check_columns"],
    "minrm.data.formats": ["detect_format"],
}


def code_lines(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.strip() and not re.match(r"\s*#", line))


def count(path: dict) -> list[tuple[str, int, list[str]]]:
    rows = []
    for name, functions in path.items():
        module = importlib.import_module(name)
        tree = ast.parse(inspect.getsource(module))
        defined = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        source = inspect.getsource(module).splitlines()
        found = [f for f in functions if f in defined]
        texts = ["\n".join(source[defined[f].lineno - 1 : defined[f].end_lineno]) for f in found]
        if name == "minrm.train":
            texts = [t.split("    # Export")[0] for t in texts]
        lines = sum(map(code_lines, texts))
        rows.append((module.__file__.split("minrm/", 1)[-1], lines, [f for f in functions if f not in defined]))
    return rows


def table(title: str, path: dict) -> str:
    rows = count(path)
    out = [f"{title}", "| file | lines |", "|---|---|"]
    out += [f"| {f} | {n}{' (missing: ' + ', '.join(m) + ')' if m else ''} |" for f, n, m in rows]
    out.append(f"| {len(rows)} files | {sum(n for _, n, _ in rows)} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table("One optimizer step of the default run", STEP))
    print()
    print(table("A JSONL line to tokens", JSONL))
    print()
    print(table("... and what runs once per file or dataset before its lines", JSONL_SETUP))
