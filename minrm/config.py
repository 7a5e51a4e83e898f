"""Every flag of minrm, its default and its help text, in one dataclass.

Field names, types and defaults follow the reference (open-instruct's `reward_modeling.py` `Args`,
`TokenizerConfig` and `ModelConfig`), so a reference command line runs unchanged, and so does its
config-file form: a YAML file of `flag: value` lines first, flags after it overriding it. The
docstring under each field is its `--help` text. Derived values (batch sizes, step counts) are
not flags: `train.py` computes them once and prints them.

Where minrm's default differs from the reference, the field's docstring says so.
"""

import argparse
import ast
import dataclasses
import difflib
import inspect
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Literal

import yaml

from minrm.inputs import check_paths
from minrm.toy import SPLIT_SIZES, TOY, TOY_RECIPE

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
BATCHINGS = ("padded", "packed", "shared_prefix")
PACKED_ATTENTIONS = ("auto", "flex_attention", "segments", "mask")
MIXED_PRECISIONS = ("bf16", "no")


@dataclass
class Args:
    # Data
    dataset_mixer_list: list[str] = field(
        default_factory=lambda: ["allenai/tulu-3-wildchat-reused-on-policy-8b", "1.0"]
    )
    """Training datasets and amounts: `NAME AMOUNT NAME AMOUNT ...`. NAME is a Hub dataset id or a local .jsonl/.json/.parquet file; AMOUNT with a decimal point is a fraction ("1.0" all, "0.5" half, "3.0" three times), without one a row count ("400")."""
    dataset_mixer_list_splits: list[str] = field(default_factory=lambda: ["train"])
    """Split of each training dataset: one for all, or one per dataset."""
    dataset_mixer_eval_list: list[str] = field(default_factory=list)
    """Evaluation datasets and amounts, in the same form as --dataset_mixer_list (empty: no eval)."""
    dataset_mixer_eval_list_splits: list[str] = field(default_factory=lambda: ["test"])
    """Split of each evaluation dataset: one for all, or one per dataset."""
    max_token_length: int = 512
    """Pairs whose chosen or rejected sequence has more tokens than this are dropped (and counted)."""
    max_prompt_token_length: int = 256
    """Pairs whose prompt has more tokens than this are dropped (and counted)."""

    # Data formats, cache and validation
    chosen_key: str = "chosen"
    """Column of the chosen response (a conversation, or a string). [minrm]"""
    rejected_key: str = "rejected"
    """Column of the rejected response (a conversation, or a string). [minrm]"""
    prompt_key: str = "prompt"
    """Column of the prompt; a dataset that has it is read in the explicit-prompt format. [minrm]"""
    skip_bad_rows: bool = False
    """Leave out rows that break a rule (missing or mistyped fields, different prompts, identical responses, invalid JSON...) and count them by reason, instead of stopping before training with a list of them. [minrm]"""
    eval_fraction: float = 0.0
    """Hold out this fraction of each training dataset's rows as the eval set (no row on both sides); not with --dataset_mixer_eval_list. [minrm]"""
    dataset_local_cache_dir: str = "local_dataset_cache"
    """Folder of the cache of tokenized datasets, one sub-folder per hash of the inputs that shape them."""
    dataset_skip_cache: bool = False
    """Tokenize in every process without reading or writing the cache."""
    cache_dataset_only: bool = False
    """Build the dataset cache, then exit without training."""
    no_visualize: bool = False
    """Do not print the coloured tokens of one training pair at start. [minrm]"""

    # Model and tokenizer
    model_name_or_path: str = TOY
    """Hub id or local folder of the model to train. The default, `minrm:toy`, is a tiny Llama built offline that trains on minrm's own toy preference data (flags not given take the toy recipe's values)."""
    model_revision: str | None = None
    """Revision (branch, tag or commit) of the model on the Hub."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer to use (default: the model's). `--tokenizer_name` is an alias."""
    tokenizer_revision: str | None = None
    """Revision of the tokenizer on the Hub (default: the model's revision)."""
    use_slow_tokenizer: bool = False
    """Load the slow (Python) tokenizer instead of the fast one."""
    chat_template_name: str | None = None
    """Chat template to apply instead of the tokenizer's own (default: the tokenizer's own, as in the reference): a name minrm knows (tulu, zephyr, simple_chat), or a tokenizer id/path whose template is borrowed."""
    add_bos: bool = False
    """Prepend the bos token to the chat template (for templates that do not begin with it; refused for those that do)."""
    trust_remote_code: bool = False
    """Allow model and tokenizer code from the Hub repository to run."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    init_score_head: bool = True
    """Re-draw the score head from N(0, 1/sqrt(hidden_size + 1)) (p.11 of arXiv:2009.01325). False keeps a loaded head, to continue training an existing reward model. [minrm]"""
    mixed_precision: Literal[MIXED_PRECISIONS] | None = None
    """`bf16`: FSDP2 gathers the parameters in bf16 for the forward and backward passes and reduces gradients in fp32; master weights, AdamW state, the score head, rewards and loss stay fp32. `no`: fp32 throughout. Default: bf16 with CUDA, no otherwise. [minrm]"""
    use_liger_kernel: bool | None = None
    """Swap Liger's fused RMSNorm, SwiGLU and RoPE kernels into the backbone (default: on with CUDA, off otherwise). [minrm]"""
    strict_kernels: bool = False
    """Fail at start, instead of training without them, when the Liger kernels are wanted (--use_liger_kernel True, or auto on CUDA) but cannot be used. [minrm]"""

    # Experiment
    exp_name: str = "reward_modeling"
    """Name of this experiment."""
    seed: int = 1
    """Seed of the experiment: data order, score-head init, RNGs."""
    run_name: str | None = None
    """Unique name of this run (default: EXP_NAME__SEED__UNIXTIME). Outputs go to OUTPUT_DIR/RUN_NAME."""

    # Optimizer and schedule
    eps: float = 1e-5
    """AdamW epsilon."""
    learning_rate: float = 2e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to every parameter (torch's default, as in the reference). [minrm]"""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (as the reference's DeepSpeed production runs do); <= 0 turns clipping off. [minrm]"""
    lr_scheduler_type: Literal[SCHEDULERS] = "linear"
    """Learning-rate schedule."""
    warm_up_steps: int = 0
    """Number of warm-up optimizer steps."""

    loss: Literal["bradley_terry", "plackett_luce"] = "bradley_terry"
    """The ranking loss (loss.py). [minrm]"""
    center_rewards_coefficient: float | None = None
    """Adds this x mean(r^2) over the step's responses to the loss (default: off). [minrm]"""

    # Batch sizes
    num_train_epochs: int = 1
    """Number of passes over the training set."""
    gradient_accumulation_steps: int = 8
    """Micro-batches accumulated per optimizer step."""
    per_device_train_batch_size: int = 1
    """Pairs per process per micro-batch (with --max_tokens_per_batch, the step's pairs per process are
    this x gradient_accumulation_steps, cut by tokens)."""
    per_device_eval_batch_size: int = 1
    """Pairs per process per evaluation batch."""
    total_episodes: int | None = None
    """Training pairs to consume in total (default: num_train_epochs x training-set size)."""
    num_evals: int = 1
    """Evaluations spread evenly through training (the last after the final step), when an eval set is given."""

    # Batching
    batching: Literal[BATCHINGS] = "shared_prefix"
    """How a micro-batch's pairs become model input: `padded` (the reference: right padding to the
    longest sequence), `packed` (sequences end to end with no padding, each attending only to
    itself) or `shared_prefix` (packed, and each pair's prompt computed once for both responses).
    Same rewards and metrics in every mode; see docs/batching.md."""
    packed_attention: Literal[PACKED_ATTENTIONS] = "auto"
    """The attention that runs packed rows: `flex_attention` (a block mask; the `auto` choice on GPU),
    `segments` (SDPA on each sequence's span of the row; `auto` elsewhere) or `mask` (one dense
    L x L mask through the model's own attention). [minrm]"""
    max_tokens_per_batch: int | None = None
    """A token budget per micro-batch: each optimizer step still takes per_device_train_batch_size x
    gradient_accumulation_steps pairs per process, cut into as few micro-batches as keep each within
    this many computed tokens (padding included), instead of micro-batches of
    per_device_train_batch_size pairs; evaluation batches are cut the same way. Same loss and
    metrics. [minrm]"""

    # Checkpointing
    checkpointing_steps: str | None = None
    """Save a resumable checkpoint every N optimizer steps, or `epoch` (every ceil(training pairs / batch_size) steps), to OUTPUT_DIR/RUN_NAME/checkpoints/step_N (default: none). [minrm]"""
    keep_last_n_checkpoints: int = 2
    """Keep the newest K checkpoints, deleting older ones once a new one is complete; <= 0 keeps all. [minrm]"""
    resume_from_checkpoint: str | None = None
    """Resume from this checkpoint folder, or `auto`: the newest complete checkpoint of OUTPUT_DIR/RUN_NAME (needs --run_name; with none found, start fresh). The batch size, data and schedule flags must be those it was written with. [minrm]"""

    # Tracking and output
    with_tracking: bool = False
    """Log to Weights & Biases (set WANDB_MODE=offline to log without a network)."""
    wandb_project_name: str = "open_instruct_internal"
    """W&B project."""
    wandb_entity: str | None = None
    """W&B entity (team or user)."""
    push_to_hub: bool = False
    """Upload the final model to the Hugging Face Hub. minrm's default is False (the reference's is True): a run should not need Hub credentials to finish."""
    hf_entity: str | None = None
    """Hub user or organisation of the model repository (default: the logged-in user)."""
    hf_repo_id: str | None = None
    """Hub repository name (default: open_instruct_dev); the repo is HF_ENTITY/HF_REPO_ID."""
    hf_repo_revision: str | None = None
    """Hub branch to push to (default: the run name)."""
    output_dir: str = "output"
    """The final model, metrics.jsonl and samples go to OUTPUT_DIR/RUN_NAME."""
    no_plot: bool = False
    """Do not draw OUTPUT_DIR/RUN_NAME/metrics.png (the six metric panels against episodes, `python -m minrm.plot`) at the end of training. [minrm]"""
    timeout_minutes: int = 60
    """How long a collective may wait for the slowest process before the run fails (torch's default: 10 minutes with NCCL). The longest waits left are rank 0 writing the final model (a 70B model's fp32 weights are 280 GB) while the others wait at a barrier, and stragglers reading a large model or checkpoint; building the dataset cache and the Hub upload wait outside any collective. [minrm]"""


ALIASES = {"tokenizer_name": "tokenizer_name_or_path"}


def _field_docs() -> dict[str, str]:
    """The docstring under each field of `Args`, read from this file's source."""
    body = ast.parse(inspect.getsource(Args)).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = nxt.value.value
    return docs


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _optional(kind):
    def parse(text: str):
        return None if text in ("None", "none") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    # Defaults are SUPPRESSed so that `parse_args` can tell which flags the user gave.
    parser = argparse.ArgumentParser(
        prog="python -m minrm.train",
        description="Train a pairwise (Bradley-Terry) reward model. Flags follow open-instruct's reward_modeling.py. "
        "A YAML file of `flag: value` lines may come first (python -m minrm.train config.yaml [--flag value ...]); "
        "flags after it override it.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    docs = _field_docs()
    hints = typing.get_type_hints(Args)
    for f in dataclasses.fields(Args):
        kind = hints[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        names = [f"--{f.name}"] + [f"--{a}" for a, target in ALIASES.items() if target == f.name]
        help_text = f"{docs[f.name]} (default: {default})"
        args = typing.get_args(kind)
        optional = type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else kind
        if base is bool:
            parser.add_argument(*names, dest=f.name, nargs="?", const=True, type=_bool, help=help_text)
        elif typing.get_origin(base) is list:
            parser.add_argument(*names, dest=f.name, nargs="*", metavar="STR", help=help_text)
        elif typing.get_origin(base) is Literal:
            parser.add_argument(*names, dest=f.name, choices=typing.get_args(base), help=help_text)
        else:
            parser.add_argument(*names, dest=f.name, type=_optional(base) if optional else base, help=help_text)
    return parser


def validate(args: Args) -> None:
    """Reject bad values before any model or data is loaded."""

    def fail(flag: str, why: str) -> None:
        raise SystemExit(f"minrm: error: --{flag}: {why}")

    for name in ("gradient_accumulation_steps", "per_device_train_batch_size", "per_device_eval_batch_size"):
        if getattr(args, name) < 1:
            fail(name, f"must be at least 1, got {getattr(args, name)}")
    for name in ("max_token_length", "max_prompt_token_length", "num_train_epochs"):
        if getattr(args, name) < 1:
            fail(name, f"must be at least 1, got {getattr(args, name)}")
    for name in ("warm_up_steps", "num_evals"):
        if getattr(args, name) < 0:
            fail(name, f"must be >= 0, got {getattr(args, name)}")
    if args.timeout_minutes < 1:
        fail("timeout_minutes", f"must be at least 1, got {args.timeout_minutes}")
    if args.max_tokens_per_batch is not None and args.max_tokens_per_batch < 1:
        fail("max_tokens_per_batch", f"must be at least 1, got {args.max_tokens_per_batch}")
    if args.total_episodes is not None and args.total_episodes < 1:
        fail("total_episodes", f"must be at least 1, got {args.total_episodes}")
    if args.learning_rate < 0 or args.eps <= 0 or args.weight_decay < 0:
        fail("learning_rate/eps/weight_decay", "learning_rate and weight_decay must be >= 0 and eps > 0")
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
        for name, amount in zip(mixer[::2], mixer[1::2]):
            try:
                ok = float(amount) > 0
            except ValueError:
                ok = False
            if not ok:
                fail(flag, f"amount {amount!r} for {name!r} is not a positive number")
            if name.endswith((".jsonl", ".json", ".parquet")) and not os.path.isfile(name):
                fail(flag, f"local dataset file {name!r} does not exist")
        for name, split in zip(mixer[::2], splits * n if len(splits) == 1 else splits):
            if name == TOY and split not in SPLIT_SIZES:
                fail(flag + "_splits", f"{TOY} has the splits {sorted(SPLIT_SIZES)}, not {split!r}")
            if name.endswith((".jsonl", ".json", ".parquet")) and split != "train":
                fail(flag + "_splits", f"{name} is a local file, whose one split is `train`, not {split!r}")
    check_paths(args)


def read_config_file(path: str) -> dict:
    """The flags a YAML config file sets: keys are flag names, values YAML scalars or lists (for the
    list flags). They go through the command line's own parser, so each value gets the type and
    the checks its flag gets there (`lr: 3e-6`, a string to YAML, is a float here as on the command line)."""
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
    if data is None:  # an empty file sets nothing
        return {}
    if not isinstance(data, dict):
        raise SystemExit(f"minrm: error: {path}: expected `flag: value` lines, got a YAML {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(Args)] + list(ALIASES)
    argv = []
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            raise SystemExit(
                f"minrm: error: {path}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            )
        if isinstance(value, dict):
            raise SystemExit(f"minrm: error: {path}: {key}: give a list (NAME AMOUNT ...), not a mapping")
        argv += [f"--{key}", *map(str, value)] if isinstance(value, list) else [f"--{key}={value}"]
    parser = build_parser()
    parser.exit_on_error = False  # raise, so that the message can name the file
    try:
        given, extra = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise SystemExit(f"minrm: error: {path}: {e}") from None
    if extra:
        raise SystemExit(f"minrm: error: {path}: a list where one value is expected: {' '.join(extra)}")
    return vars(given)


def parse_args(argv: list[str] | None = None) -> Args:
    """Parse the command line: an optional YAML config file first, then flags, which override it.
    With the toy model, flags given in neither take the toy recipe's values."""
    argv = sys.argv[1:] if argv is None else list(argv)
    given = {}
    if argv and argv[0].endswith((".yaml", ".yml")):
        given = read_config_file(argv[0])
        argv = argv[1:]
    given.update(vars(build_parser().parse_args(argv)))
    args = Args(**given)
    if args.model_name_or_path == TOY:
        for key, value in TOY_RECIPE.items():
            # --eval_fraction carves the eval set from the training data: the toy's own stays out.
            if key not in given and not (key.startswith("dataset_mixer_eval") and "eval_fraction" in given):
                setattr(args, key, value)
    validate(args)
    return args
