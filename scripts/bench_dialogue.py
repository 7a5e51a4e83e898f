"""The `dialogue` profile of scripts/bench.py: the trainer's whole loop, as `python -m minrm.train`
runs it, on pairs with the token lengths of 300 real multi-turn dialogue pairs
(scripts/bench_dialogue_lengths.jsonl, a copy of shared/bench/dialogue_lengths.jsonl: one pair a line,
`prompt` with its generation prompt, `chosen` and `rejected` each the tokens after it), against a bare
Hugging Face loop over the same padded batches.

    python -m scripts.bench --profile dialogue --size 20m --repeats 2 --out docs/bench_dialogue
    python -m scripts.bench --profile dialogue --size 20m --profile_loop shared_prefix bare padded \\
        --steps 12 --out docs/bench_dialogue     # the loop's profile (scripts/bench_loop_profile.py)

Inputs, written to a work folder: a random-init Llama reward model saved with `save_pretrained`, with a
word-level tokenizer (one word = one token, so lengths are exact; no download), and a plain-text pair
file whose rows minrm tokenizes to exactly the lengths of the file (checked against minrm's own dataset
cache before any timing). Each minrm row is one `python -m minrm.train` run (fp32, 2 threads, one epoch
of `--pairs` pairs a step or its first `--steps` steps, no eval, no checkpoint); its loop is timed from its metrics.jsonl:
`time/elapsed_s` at the last step less at step 1, so the rows read from the cache, their cut and
collation, `train_step`, the metrics and the progress line are all in it. The bare row runs in a fresh
process of its own (`--bare`), timed the same way. Systems run in turn, `--repeats` rounds, and each
row reports its fastest round.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

LENGTHS = os.path.join(os.path.dirname(__file__), "bench_dialogue_lengths.jsonl")
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"  # ids 0..3; words "w4", "w5", ... after them
THREADS = 2  # the timed runs'; profiles run at 1 (scripts/bench_loop_profile.py says why)


def read_lengths(path: str = LENGTHS) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts, one per pair."""
    with open(path) as f:
        return [(d["prompt"], d["chosen"], d["rejected"]) for d in map(json.loads, f)]


def pair_texts(lengths: list[tuple[int, int, int]], vocab: int, seed: int = 0) -> list[dict]:
    """Plain-text pairs of words that tokenize to `lengths` (minrm's plain format: each text's ids plus
    eos, the prompt their common prefix). Pair i's prompt starts with word 4 + i, which names its line
    in minrm's cache; the responses differ at their first word, so the prompt is exactly the prefix."""
    g = torch.Generator().manual_seed(seed)
    words = lambda n: [f"w{i}" for i in torch.randint(4, vocab, (n,), generator=g).tolist()]  # noqa: E731
    rows = []
    for i, (p, c, r) in enumerate(lengths):
        prompt = [f"w{4 + i}", *words(p - 1)]
        chosen, rejected = words(c - 1), words(r - 1)  # minrm appends eos
        if chosen[0] == rejected[0]:
            rejected[0] = f"w{4 + (int(chosen[0][1:]) - 3) % (vocab - 4)}"
        rows.append({"chosen": " ".join(prompt + chosen), "rejected": " ".join(prompt + rejected)})
    return rows


def write_inputs(folder: str, lengths: list, size: str, seed: int = 0) -> tuple[str, str]:
    """The model folder (random-init Llama reward model, word-level tokenizer) and the pair file."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

    from scripts.bench_inputs import model_config

    config = model_config(size)
    config.bos_token_id, config.eos_token_id = 2, 3
    vocab = {t: i for i, t in enumerate([PAD, UNK, BOS, EOS])} | {f"w{i}": i for i in range(4, config.vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS
    )
    model_dir, data = os.path.join(folder, "model"), os.path.join(folder, "pairs.jsonl")
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    with open(data, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in pair_texts(lengths, config.vocab_size, seed))
    return model_dir, data


def train_command(model: str, data: str, batching: str, folder: str, pairs: int, seed: int, *extra: str) -> list[str]:
    """`python -m minrm.train` on the inputs: one epoch, `pairs` pairs a step, fp32, no eval, no
    checkpoint, no plot; prompts and responses up to 512 tokens (the file's longest: 446 and 497)."""
    return [
        sys.executable, "-m", "minrm.train",
        "--model_name_or_path", model,
        "--dataset_mixer_list", data, "1.0",
        "--dataset_local_cache_dir", os.path.join(folder, f"cache-{seed}"),  # the seed is in the cache's key
        "--output_dir", os.path.join(folder, "output"),
        "--run_name", batching,
        "--per_device_train_batch_size", str(pairs),
        "--gradient_accumulation_steps", "1",
        "--num_train_epochs", "1",
        "--batching", batching,
        "--mixed_precision", "no",
        "--use_liger_kernel", "False",
        "--max_token_length", "512",
        "--max_prompt_token_length", "512",
        "--seed", str(seed),
        "--no_plot", "--no_visualize",
        *extra,
    ]  # fmt: skip


def run(command: list[str], what: str, threads: int = THREADS) -> str:
    """A subprocess at `threads` threads; its stdout, or the run's error."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["TOKENIZERS_PARALLELISM"] = "false"
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"bench: {what} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def cached_rows(folder: str, seed: int) -> list[dict]:
    """minrm's tokenized training rows, read from its dataset cache (the inputs' only one) in the
    cache's order, the order `--seed`'s permutation indexes."""
    import datasets

    cache = os.path.join(folder, f"cache-{seed}")
    (key,) = [k for k in os.listdir(cache) if os.path.isfile(os.path.join(cache, k, "train.arrow"))]
    return datasets.Dataset.from_file(os.path.join(cache, key, "train.arrow")).to_list()


def row_lengths(row: dict) -> tuple[int, int, int]:
    """A tokenized pair's (prompt, chosen, rejected) token counts, each response counted after the prompt."""
    n = len(row["prompt"])
    assert all(s[:n] == row["prompt"] for s in row["responses"]), "bench: a response does not start with the prompt"
    return n, *(len(s) - n for s in row["responses"])


def file_lengths(rows: list[dict]) -> list[tuple[int, int, int]]:
    """The rows' lengths in the pair file's order (a row's prompt starts with id 4 + its line)."""
    by_line = {row["prompt"][0] - 4: row_lengths(row) for row in rows}
    return [by_line[i] for i in sorted(by_line)] if sorted(by_line) == list(range(len(rows))) else []


def training_order(n: int, seed: int) -> list[int]:
    """The rows of minrm's first epoch in the order it trains them: the public behaviour `--seed`
    gives (a torch.randperm of the rows, seeded with seed + epoch; minrm/training/batching.py)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def computed_tokens(batch: list[tuple[int, int, int]], system: str) -> int:
    """Tokens the model runs for one step's (prompt, chosen, rejected) lengths: padded (and bare) pad
    all 2B sequences to the longest; packed runs both whole sequences; shared_prefix the prompt once."""
    if system in ("bare", "padded"):
        return 2 * len(batch) * max(p + max(c, r) for p, c, r in batch)
    if system == "packed":
        return sum(2 * p + c + r for p, c, r in batch)
    return sum(p + c + r for p, c, r in batch)


def loop_seconds(metrics_path: str) -> tuple[float, int]:
    """Seconds from the end of step 1 to the end of the last step, and that last step's number."""
    with open(metrics_path) as f:
        elapsed = [json.loads(line)["time/elapsed_s"] for line in f]
    return elapsed[-1] - elapsed[0], len(elapsed)


def bare_loop(model_dir: str, rows: list[dict], order: list[int], pairs: int, steps: int, profile: str | None) -> dict:
    """The reference's step with nothing of minrm's, over minrm's batches in minrm's order: chosen
    then rejected right-padded together, Hugging Face's own forward (which pools at the last token
    that is not the pad id), -logsigmoid loss, backward, torch's AdamW as the reference builds it; a
    loss read back every step, as a logging loop does; minrm's default learning rate. Timed from the
    end of step 1 to the end of the last; with `profile`, steps 2 to the last run under cProfile (on
    this thread's CPU clock, as scripts/bench_loop_profile.py profiles minrm), its stats saved there."""
    import cProfile

    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", THREADS)))  # the caller's (`run`)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, eps=1e-5)
    pad = model.config.pad_token_id
    profiler, times = cProfile.Profile(time.thread_time), []
    model.train()
    for step in range(steps):
        if step == 1 and profile:
            profiler.enable()
        batch = [rows[i] for i in order[step * pairs : (step + 1) * pairs]]
        seqs = [b["responses"][0] for b in batch] + [b["responses"][1] for b in batch]
        width = max(map(len, seqs))
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])  # (2B, T)
        attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        chosen, rejected = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].chunk(2)
        loss = -F.logsigmoid(chosen - rejected).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.monotonic())
    if profile:
        profiler.disable()
        profiler.dump_stats(profile)
    return {"seconds": times[-1] - times[0], "steps": len(times)}


def prepare(folder: str, size: str, pairs: int, seed: int, lengths: list | None = None) -> tuple[str, str, list[dict]]:
    """Write the inputs (of `lengths`, default the file's), let minrm build its dataset cache, and check
    that its rows have exactly those lengths; returns the model folder, the pair file and minrm's rows
    (in the cache's order)."""
    lengths = lengths or read_lengths()
    model, data = write_inputs(folder, lengths, size, seed)
    run(train_command(model, data, "padded", folder, pairs, seed, "--cache_dataset_only"), "building the cache")
    rows = cached_rows(folder, seed)
    if file_lengths(rows) != lengths:
        raise SystemExit(f"bench: minrm's rows in {folder}/cache-{seed} do not have the lengths of the length file")
    return model, data, rows


def step_lengths(rows: list[dict], pairs: int, seed: int) -> list[list[tuple[int, int, int]]]:
    """Each step's (prompt, chosen, rejected) lengths, in minrm's order; one epoch."""
    order = training_order(len(rows), seed)
    return [[row_lengths(rows[i]) for i in order[s * pairs : (s + 1) * pairs]] for s in range(len(rows) // pairs)]


def bare_command(folder: str, pairs: int, seed: int, steps: int) -> list[str]:
    """The bare loop's command line: a fresh process, like each minrm run."""
    return [sys.executable, "-m", "scripts.bench", "--profile", "dialogue", "--bare", folder, "--pairs", str(pairs)] + [
        "--seed", str(seed), "--steps", str(steps)
    ]  # fmt: skip


def time_system(
    system: str, folder: str, model: str, data: str, pairs: int, seed: int, steps: int
) -> tuple[float, int]:
    """One run of one system: its loop's seconds (end of step 1 to end of the last step), its steps."""
    if system == "bare":
        result = json.loads(run(bare_command(folder, pairs, seed, steps), "bare").splitlines()[-1])
        return result["seconds"], result["steps"]
    shutil.rmtree(os.path.join(folder, "output", system), ignore_errors=True)  # metrics.jsonl is appended to
    command = train_command(model, data, system, folder, pairs, seed, "--total_episodes", str(steps * pairs))
    run(command, f"minrm --batching {system}")
    return loop_seconds(os.path.join(folder, "output", system, "metrics.jsonl"))


def bench_dialogue(
    modes: list[str], folder: str, size: str, pairs: int, seed: int, repeats: int, steps: int | None
) -> list[dict]:
    """The first `steps` steps (default: the epoch) of every system, `repeats` times, in turn (the
    order rotating each round, so that load from other processes falls on all alike); each row from
    its fastest run. Computed tokens are counted over
    the timed steps (2 to the last) in minrm's order, the bare loop's being the same batches."""
    model, data, rows = prepare(folder, size, pairs, seed)
    steps = step_lengths(rows, pairs, seed)[:steps]
    seconds = {m: [] for m in modes}
    for k in range(repeats):
        for system in modes[k % len(modes) :] + modes[: k % len(modes)]:
            loop, last = time_system(system, folder, model, data, pairs, seed, len(steps))
            assert last == len(steps), f"bench: {system} ran {last} steps, not {len(steps)}"
            seconds[system].append(loop)
            print(f"bench: {system}: {loop:.2f}s for steps 2-{last}", file=sys.stderr, flush=True)
    out = []
    for system in modes:
        best, timed = min(seconds[system]), steps[1:]
        computed = sum(computed_tokens(batch, system) for batch in timed)
        out.append(
            {
                "system": system,
                "pairs_per_s": pairs * len(timed) / best,
                "computed_tokens_per_s": computed / best,
                "computed_tokens": computed,
                "seconds": best,
                "steps": len(steps),
                "runs_s": seconds[system],
            }
        )
    bare = next((r for r in out if r["system"] == "bare"), None)
    for r in out:
        r["x_bare"] = r["computed_tokens_per_s"] / bare["computed_tokens_per_s"] if bare else None
    return out


def bare_main(folder: str, pairs: int, seed: int, steps: int, profile: str | None = None) -> None:
    """`--bare FOLDER`: the bare loop's first `steps` steps over the inputs in FOLDER, in a process of
    its own; prints JSON."""
    rows = cached_rows(folder, seed)
    result = bare_loop(os.path.join(folder, "model"), rows, training_order(len(rows), seed), pairs, steps, profile)
    print(json.dumps(result), flush=True)


NAMES = {
    "bare": "bare Hugging Face loop (padded, torch AdamW)",
    "padded": "minrm padded",
    "packed": "minrm packed",
    "shared_prefix": "minrm shared_prefix (default)",
}


def markdown(rows: list[dict], command: str, repeats: int, threads: int) -> str:
    lines = [
        f"`{command}`  ",
        f"CPU, {threads} threads, fp32; steps 1 to {rows[0]['steps']} of one epoch of the {len(read_lengths())} pairs, "
        f"timed from the end of step 1 to the end of step {rows[0]['steps']}; each system run {repeats} times in turn, "
        "the fastest run reported (every run's seconds in the .json).",
        "",
        "| system | pairs/s | computed tokens/s | x bare per computed token |",
        "|---|---|---|---|",
    ]
    for r in rows:
        x = f"{r['x_bare']:.2f}" if r["x_bare"] is not None else "-"
        name = NAMES[r["system"]]
        lines.append(f"| {name} | {r['pairs_per_s']:.2f} | {r['computed_tokens_per_s']:.0f} | {x} |")
    return "\n".join(lines) + "\n"


PROFILE_SECTION = "\n## Where the loop's time goes"


def run_dialogue(args, command: str) -> None:
    """scripts.bench --profile dialogue: the table, or with --profile_loop the profiles of those
    systems' first --steps steps; each writes its own part of OUT.md and OUT.json, keeping the other's."""
    from scripts import bench_loop_profile

    if args.bare:
        bare_main(args.bare, args.pairs, args.seed, args.steps, args.bare_profile)  # steps: given by the caller
        return
    folder = args.workdir or tempfile.mkdtemp(prefix="bench_dialogue_")
    os.makedirs(folder, exist_ok=True)
    result, table, section = {}, "", ""
    if os.path.isfile(args.out + ".json"):
        with open(args.out + ".json") as f:
            result = json.load(f)
        with open(args.out + ".md") as f:
            table, _, section = f.read().partition(PROFILE_SECTION)
            section = PROFILE_SECTION + section if section else ""
    if args.profile_loop:
        model, data, rows = prepare(folder, args.size, args.pairs, args.seed)
        steps = args.steps or len(rows) // args.pairs
        profiles = {
            system: bench_loop_profile.profile_system(system, folder, model, data, args.pairs, args.seed, steps)
            for system in args.profile_loop
        }
        result |= {"profile_command": command, "profiles": profiles}
        section = PROFILE_SECTION + "\n\n" + bench_loop_profile.markdown(profiles, steps, command)
    else:
        rows = bench_dialogue(args.modes, folder, args.size, args.pairs, args.seed, args.repeats, args.steps)
        result |= {"command": command, "rows": rows}
        table = markdown(rows, command, args.repeats, THREADS)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(table + section)
    print(table + section)
