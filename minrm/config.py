"""Every flag of minrm, its default and its help text, in one dataclass, parsed by transformers' `HfArgumentParser`.
Names, types, defaults and parser follow the reference (open-instruct's `reward_modeling.py`): its command line and
its config file run unchanged. `parse_args` checks every value; `checks.check_paths` what the paths point at.
"""

import argparse
import contextlib
import dataclasses
import difflib
import math
import sys
from typing import Literal, NoReturn

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import HfArg, string_to_bool

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
BATCHINGS = ("padded", "packed", "shared_prefix")
PACKED_ATTENTIONS = ("auto", "flex_attention", "segments", "mask")
MIXED_PRECISIONS = ("bf16", "no")
LOSSES = ("bradley_terry", "plackett_luce")
DATA_FILES = (".jsonl", ".json", ".parquet")

# Named chat templates. `tulu` is the Tulu 3 format: the last assistant turn ends with eos and
# no newline, so the reward is read at the eos token.
CHAT_TEMPLATES = {
    "tulu": (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ '<|system|>\n' + m['content'] + '\n' }}"
        "{% elif m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + '\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ '<|assistant|>\n' + m['content'] + eos_token }}"
        "{% if not loop.last %}{{ '\n' }}{% endif %}{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
        "{% endfor %}"
    ),
    "zephyr": (
        "{% for m in messages %}"
        "{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
        "{% endfor %}"
    ),
    "simple_chat": (
        "{% for m in messages %}"
        "{{ '\n\n' if not loop.first else '' }}{{ m['role'].capitalize() + ': ' + m['content'] }}"
        "{% if loop.last and not add_generation_prompt %}{{ eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}


# --model_name_or_path and a dataset mixer's NAME for minrm's offline toy model and data (`minrm.data.toy`).
TOY = "minrm:toy"
# The toy data's splits and their rows. One epoch of train is 1536 steps at the recipe's batch of 16;
# 1024 steps reached only ~0.975 eval accuracy, 1536 reach 0.990 to 0.992 (seeds 1 to 3: 507 to 508 of 512).
SPLIT_SIZES = {"train": 24576, "test": 512}
# With the toy model, the flags that neither the command line nor a config file gives take these values.
TOY_RECIPE: dict[str, object] = {
    "learning_rate": 1e-3,  # 3e-3 and above learned the copy check worse
    "per_device_train_batch_size": 16, "gradient_accumulation_steps": 1, "num_train_epochs": 1, "warm_up_steps": 10,
    "lr_scheduler_type": "linear", "max_token_length": 128, "max_prompt_token_length": 64,
    "per_device_eval_batch_size": 64, "num_evals": 2,
    "dataset_mixer_list": [TOY, "1.0"], "dataset_mixer_list_splits": ["train"],
    "dataset_mixer_eval_list": [TOY, "1.0"], "dataset_mixer_eval_list_splits": ["test"],
}  # fmt: skip
UNSET = object()  # a toy recipe flag that neither the command line nor a config file gave


@dataclasses.dataclass
class Columns:
    """The column of each part of a row, for data whose columns have other names: minrm.train's and
    minrm.score's flags."""

    chosen_key: str = HfArg(default="chosen", help="Column of the chosen response(s). [minrm]")
    rejected_key: str = HfArg(default="rejected", help="Column of the rejected response(s). [minrm]")
    prompt_key: str = HfArg(default="prompt", help="Column of an explicit prompt. [minrm]")
    responses_key: str = HfArg(default="responses", help="Column of a list of responses with scores. [minrm]")
    scores_key: str = HfArg(default="scores", help="Their scores: higher is preferred. [minrm]")
    margin_key: str = HfArg(default="margin", help="Column of a row's margin (Llama 2's margin loss). [minrm]")


@dataclasses.dataclass
class Args(Columns):
    """Train a reward model. Flags follow open-instruct's reward_modeling.py (`[minrm]`: a flag it lacks). A YAML file
    of `flag: value` lines may come first (python -m minrm.train run.yaml [--flag ...]); flags after it override it."""

    # Data
    dataset_mixer_list: list[str] = HfArg(
        default_factory=lambda: ["allenai/tulu-3-wildchat-reused-on-policy-8b", "1.0"],
        help="Training datasets and amounts, NAME AMOUNT ...: a Hub id or a local .jsonl/.json/.parquet file; an "
        "AMOUNT with a decimal point is a fraction (1.0 all, 0.5 half, 3.0 three times), without one a row count.",
    )
    dataset_mixer_list_splits: list[str] = HfArg(default_factory=lambda: ["train"], help="One split, or one each.")
    dataset_mixer_eval_list: list[str] = HfArg(default_factory=list, help="Eval datasets, as above.")
    dataset_mixer_eval_list_splits: list[str] = HfArg(default_factory=lambda: ["test"], help="Their splits.")
    max_token_length: int = HfArg(default=512, help="Longer responses are dropped from their rows (counted).")
    max_prompt_token_length: int = HfArg(default=256, help="Rows with a longer prompt are dropped (counted).")
    max_responses_per_prompt: int | None = HfArg(default=None, help="Keep at most this many responses per row. [minrm]")
    skip_bad_rows: bool = HfArg(default=False, help="Count bad rows and go on, not stop. [minrm]")
    eval_fraction: float = HfArg(default=0.0, help="Hold out this fraction of each training dataset for eval. [minrm]")
    dataset_local_cache_dir: str = HfArg(default="local_dataset_cache", help="Folder of the tokenized datasets' cache.")
    dataset_skip_cache: bool = HfArg(default=False, help="Tokenize in every process, without the cache.")
    cache_dataset_only: bool = HfArg(default=False, help="Build the dataset cache, then exit.")
    no_visualize: bool = HfArg(default=False, help="Do not print one training row's coloured tokens. [minrm]")

    # Model and tokenizer
    model_name_or_path: str = HfArg(
        default=TOY, help=f"Hub id or folder of the model; {TOY} is a tiny offline model with its own data and recipe."
    )
    model_revision: str | None = HfArg(default=None, help="Branch, tag or commit of the model on the Hub.")
    tokenizer_name_or_path: str | None = HfArg(
        default=None, aliases=["--tokenizer_name"], help="Tokenizer (default: the model's)."
    )
    tokenizer_revision: str | None = HfArg(default=None, help="Its revision (default: the model's).")
    use_slow_tokenizer: bool = HfArg(default=False, help="Load the slow (Python) tokenizer.")
    chat_template_name: str | None = HfArg(
        default=None, help="Template instead of the tokenizer's own: tulu, zephyr, simple_chat or a tokenizer's."
    )
    add_bos: bool = HfArg(default=False, help="Prepend the bos token to the chat template.")
    trust_remote_code: bool = HfArg(default=False, help="Run the model's and tokenizer's code from the Hub.")
    gradient_checkpointing: bool = HfArg(default=False, help="Recompute activations in the backward pass.")
    init_score_head: bool = HfArg(
        default=True, help="Re-draw the score head from N(0, 1/sqrt(hidden + 1)); False keeps a loaded one. [minrm]"
    )
    mixed_precision: Literal[MIXED_PRECISIONS] | None = HfArg(
        default=None, help="bf16 compute with fp32 weights, head and loss, or `no` (default: bf16 with CUDA). [minrm]"
    )
    use_liger_kernel: bool | None = HfArg(default=None, help="Liger's fused kernels (default: on with CUDA). [minrm]")
    strict_kernels: bool = HfArg(default=False, help="Fail at start when wanted kernels cannot run. [minrm]")

    # Experiment
    exp_name: str = HfArg(default="reward_modeling", help="Name of this experiment.")
    seed: int = HfArg(default=1, help="Seed of the data order, the score head and the RNGs.")
    run_name: str | None = HfArg(default=None, help="Outputs go to OUTPUT_DIR/RUN_NAME.")

    # Loss, optimizer and schedule
    loss: Literal[LOSSES] = HfArg(default="bradley_terry", help="All comparisons' mean, or plackett_luce. [minrm]")
    center_rewards_coefficient: float | None = HfArg(default=None, help="Adds C x mean(r^2) to the loss. [minrm]")
    eps: float = HfArg(default=1e-5, help="AdamW epsilon.")
    learning_rate: float = HfArg(default=2e-5, help="Peak learning rate.")
    weight_decay: float = HfArg(default=0.01, help="AdamW weight decay, on every parameter. [minrm]")
    max_grad_norm: float = HfArg(default=1.0, help="Clip the global gradient norm to this; <= 0: no clipping. [minrm]")
    lr_scheduler_type: Literal[SCHEDULERS] = HfArg(default="linear", help="Learning-rate schedule.")
    warm_up_steps: int = HfArg(default=0, help="Warm-up optimizer steps.")

    # Batch sizes
    num_train_epochs: int = HfArg(default=1, help="Passes over the training set.")
    gradient_accumulation_steps: int = HfArg(default=8, help="Micro-batches per optimizer step.")
    per_device_train_batch_size: int = HfArg(default=1, help="Rows per process per micro-batch.")
    per_device_eval_batch_size: int = HfArg(default=1, help="Rows per process per evaluation batch.")
    total_episodes: int | None = HfArg(default=None, help="Training rows in all (default: epochs x training rows).")
    num_evals: int = HfArg(default=1, help="Evaluations spread evenly through training, the last after the end.")
    batching: Literal[BATCHINGS] = HfArg(
        default="shared_prefix", help="padded (the reference's), packed, or shared_prefix (each prompt once)."
    )
    packed_attention: Literal[PACKED_ATTENTIONS] = HfArg(default="auto", help="What runs packed rows. [minrm]")
    context_parallel_size: int = HfArg(default=1, help="Processes that split each row's tokens (Ulysses). [minrm]")
    max_tokens_per_batch: int | None = HfArg(
        default=None, help="Cut each step's rows into micro-batches of at most this many computed tokens. [minrm]"
    )

    # Checkpointing
    checkpointing_steps: str | None = HfArg(default=None, help="Checkpoint every N steps, or `epoch`. [minrm]")
    keep_last_n_checkpoints: int = HfArg(default=2, help="Keep the newest K checkpoints; <= 0 keeps all. [minrm]")
    resume_from_checkpoint: str | None = HfArg(
        default=None, help="A checkpoint folder, or `auto`: the run's newest (needs --run_name). [minrm]"
    )

    # Tracking and output
    with_tracking: bool = HfArg(default=False, help="Log to Weights & Biases.")
    wandb_project_name: str = HfArg(default="open_instruct_internal", help="W&B project.")
    wandb_entity: str | None = HfArg(default=None, help="W&B entity.")
    push_to_hub: bool = HfArg(default=False, help="Upload the final model (the reference's default is True).")
    hf_entity: str | None = HfArg(default=None, help="Hub user or organisation (default: the logged-in user).")
    hf_repo_id: str | None = HfArg(default=None, help="Hub repository name (default: open_instruct_dev).")
    hf_repo_revision: str | None = HfArg(default=None, help="Hub branch (default: the run name).")
    output_dir: str = HfArg(default="output", help="The run's files go to OUTPUT_DIR/RUN_NAME.")
    no_plot: bool = HfArg(default=False, help="Do not draw metrics.png at the end. [minrm]")
    timeout_minutes: int = HfArg(default=60, help="How long a collective waits for the slowest process. [minrm]")


def _bool(text: str) -> bool:
    """HfArgumentParser's own reading of a boolean (true/false, yes/no, t/f, y/n, 1/0), with a one-line message."""
    try:
        return string_to_bool(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}") from None


def _optional(kind: type):
    """`kind`, or None for `None` / `none`: how a YAML null reaches a flag, and the command line gives one."""

    def parse(text: str):
        return None if text in ("None", "none") else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its message: "invalid int value"
    return parse


def build_parser(cls=Args, prog: str = "python -m minrm.train", description: str | None = None) -> HfArgumentParser:
    """The command line of a command whose flags (and, by default, help) are the dataclass `cls`'s."""
    parser = HfArgumentParser(cls, prog=prog, description=description or cls.__doc__, allow_abbrev=False)
    # HfArgumentParser makes each flag from its field; three forms minrm keeps are changed on what it made
    # (`_actions`: argparse's list of the flags, which it has no public accessor for):
    # - a list flag given alone is empty (`--dataset_mixer_eval_list` turns the toy's eval off); it makes nargs="+";
    # - `--use_liger_kernel` alone (a boolean whose default, None, means auto) is True, as the other booleans
    #   are; it makes that one take exactly one value;
    # - an optional flag takes `None`, the form a YAML null arrives in; it keeps "None" as a string, or refuses it
    #   for a number.
    for action in parser._actions:
        if action.nargs == "+":
            action.nargs = "*"
        elif action.type is string_to_bool:
            action.type, action.nargs, action.const = _bool, "?", True
        elif action.default is None and action.type in (str, int, float):
            action.type = _optional(action.type)
    return parser


def label(flag: str) -> str:
    """How a message names an argument: `--flag`, or a positional argument's name as it is (MODEL)."""
    return flag if flag.isupper() else f"--{flag}"


def fail(flag: str, why: str) -> NoReturn:
    raise SystemExit(f"minrm: error: {label(flag)}: {why}")


def _amount_ok(amount: str) -> bool:
    """A mixer AMOUNT: a whole row count (`400`) or a fraction with a decimal point (`0.5`, `3.0`), above 0."""
    if "." not in amount:
        return amount.isdecimal() and int(amount) > 0
    with contextlib.suppress(ValueError):
        return 0 < float(amount) < math.inf
    return False


def validate(args: Args) -> Args:
    """`args`, once bad values and combinations are rejected, from the flags alone (before any model or data)."""

    at_least_1 = ("gradient_accumulation_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                  "max_token_length", "max_prompt_token_length", "num_train_epochs", "timeout_minutes",
                  "max_tokens_per_batch", "total_episodes", "context_parallel_size")  # fmt: skip
    minimums = dict.fromkeys(at_least_1, (1, "at least 1")) | dict.fromkeys(("warm_up_steps", "num_evals"), (0, ">= 0"))
    minimums |= {"max_responses_per_prompt": (2, "at least 2 (a comparison needs two)"),
                 "center_rewards_coefficient": (0, "a number >= 0")}  # fmt: skip
    for name, (low, text) in minimums.items():
        # None: an optional flag not given; a float may be nan or inf, which no bound lets through
        if (value := getattr(args, name)) is not None and not low <= value < math.inf:
            fail(name, f"must be {text}, got {value}")
    if args.learning_rate < 0 or args.eps <= 0 or args.weight_decay < 0:
        fail("learning_rate/eps/weight_decay", "learning_rate and weight_decay must be >= 0 and eps > 0")
    if (steps := args.checkpointing_steps) not in (None, "epoch") and not (steps.isdecimal() and int(steps) > 0):
        fail("checkpointing_steps", f"expected a positive integer or `epoch`, got {steps!r}")
    if args.resume_from_checkpoint == "auto" and not args.run_name:
        fail("resume_from_checkpoint", "auto needs --run_name (it finds the run's folder)")
    if args.cache_dataset_only and args.dataset_skip_cache:
        fail("cache_dataset_only", "builds the dataset cache, which --dataset_skip_cache turns off: give one of them")
    if not 0 <= args.eval_fraction < 1:
        fail("eval_fraction", f"must be in [0, 1), got {args.eval_fraction}")
    if args.eval_fraction > 0 and args.dataset_mixer_eval_list:
        fail("eval_fraction", "carves the eval set from the training mixture: leave --dataset_mixer_eval_list empty")
    for flag in ("dataset_mixer_list", "dataset_mixer_eval_list"):
        mixer, splits = getattr(args, flag), getattr(args, flag + "_splits")
        if flag == "dataset_mixer_list" and not mixer:
            fail(flag, "needs at least one `NAME AMOUNT` pair")
        if len(mixer) % 2:
            fail(flag, f"must alternate NAME AMOUNT, got an odd number of items: {mixer}")
        n = len(mixer) // 2
        if mixer and len(splits) not in (1, n):
            fail(flag + "_splits", f"give one split for all datasets or one per dataset ({n}), got {splits}")
        for name, amount, split in zip(mixer[::2], mixer[1::2], splits * n if len(splits) == 1 else splits):
            if not _amount_ok(amount):
                why = "a row count (400) or a fraction with a decimal point (0.5, 1.0, 3.0)"
                fail(flag, f"amount {amount!r} for {name!r} is not a positive number: {why}")
            if name == TOY and split not in SPLIT_SIZES:
                fail(flag + "_splits", f"{TOY} has the splits {sorted(SPLIT_SIZES)}, not {split!r}")
            if name.endswith(DATA_FILES) and split != "train":
                fail(flag + "_splits", f"{name} is a local file, whose one split is `train`, not {split!r}")
    return args


def read_config_file(path: str) -> dict:
    """The flags a YAML file sets (keys: flag names or aliases), by field name, each value read by its flag's parser
    (HfArgumentParser's `parse_yaml_file` keeps YAML's types: `lr: 3e-6` is a string to YAML)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise SystemExit(f"minrm: error: config file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise SystemExit(f"minrm: error: {path}: bytes that are not UTF-8; save the file as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SystemExit(f"minrm: error: {path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    data = {} if data is None else data  # an empty file sets nothing
    if not isinstance(data, dict):
        raise SystemExit(f"minrm: error: {path}: expected `flag: value` lines, got a YAML {type(data).__name__}")
    fields = {f.name: f.name for f in dataclasses.fields(Args)}
    fields |= {alias[2:]: f.name for f in dataclasses.fields(Args) for alias in f.metadata.get("aliases", [])}
    argv = []
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SystemExit(f"minrm: error: {path}: unknown key {key!r}{hint}")
        if isinstance(value, dict):
            raise SystemExit(f"minrm: error: {path}: {key}: give a list (NAME AMOUNT ...), not a mapping")
        argv += [f"--{key}", *map(str, value)] if isinstance(value, list) else [f"--{key}={value}"]
    parser = build_parser()
    parser.exit_on_error = False  # raise, so that the message can name the file
    try:
        parsed, extra = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        # argparse names a flag by all its spellings (--learning_rate/--learning-rate): the first is the field's.
        where = f"argument {e.argument_name.split('/')[0]}: " if e.argument_name else ""
        raise SystemExit(f"minrm: error: {path}: {where}{e.message}") from None
    if extra:
        raise SystemExit(f"minrm: error: {path}: a list where one value is expected: {' '.join(extra)}")
    return {fields[key]: getattr(parsed, fields[key]) for key in data}


def parse_args(argv: list[str] | None = None) -> Args:
    """An optional YAML config file, then flags overriding it; with the toy model, the toy recipe fills the rest."""
    argv = sys.argv[1:] if argv is None else list(argv)
    from_file = read_config_file(argv.pop(0)) if argv and argv[0].endswith((".yaml", ".yml")) else {}
    parser = build_parser()
    # The file's values are the parser's defaults, so the flags given override them. A recipe flag that neither
    # gives is left UNSET (argparse hands a default back as it is): the model named decides what fills it.
    parser.set_defaults(**{**dict.fromkeys(TOY_RECIPE, UNSET), **from_file})
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not UNSET}
    if given["model_name_or_path"] == TOY:  # an eval set carved by --eval_fraction replaces the toy's own
        recipe = {k: v for k, v in TOY_RECIPE.items() if not (given["eval_fraction"] and "mixer_eval" in k)}
        given = {**recipe, **given}
    return validate(Args(**given))  # the fields not in `given` take the dataclass's defaults


def parse_command(cls, argv: list[str] | None, prog: str, positional: tuple[str, ...] = ()):
    """A command's flags (the dataclass `cls`); the first arguments may be `positional` fields' values (`MODEL`)."""
    argv, given = list(sys.argv[1:] if argv is None else argv), []
    for name in positional:
        if argv and not argv[0].startswith("-"):
            given += [f"--{name}", argv.pop(0)]
    return cls(**vars(build_parser(cls, prog).parse_args(given + argv)))


def load_or_exit(load, flag: str, name: str, what: str = "cannot be loaded", **kwargs):
    """`load(name, **kwargs)` (a `from_pretrained`); failing to find, fetch or read `name`: one line naming the flag."""
    try:
        return load(name, **kwargs)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"minrm: error: {label(flag)} {name}: {what} ({reason})") from None
