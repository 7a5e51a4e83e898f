"""The command line: reference spellings parse, booleans take both forms, bad input fails early."""

import dataclasses
import subprocess
import sys

import pytest

from minrm import train
from minrm.checks import check_paths
from minrm.config import TOY_RECIPE, Args, build_parser, parse_args
from tests.conftest import ROOT

# The Tulu 3 8B RM command line of the reference (minus the launcher), with --push_to_hub False.
REFERENCE_LINE = """
--exp_name tulu3_8b_rm --model_name_or_path allenai/Llama-3.1-Tulu-3-8B-SFT --model_revision main
--tokenizer_name allenai/Llama-3.1-Tulu-3-8B-SFT --tokenizer_revision main --use_slow_tokenizer
--dataset_mixer_list allenai/llama-3.1-tulu-3-8b-preference-mixture 1.0 --max_token_length 4096
--max_prompt_token_length 2048 --per_device_train_batch_size 4 --gradient_accumulation_steps 4
--learning_rate 3e-6 --lr_scheduler_type linear --num_train_epochs 1 --gradient_checkpointing
--with_tracking --seed 8 --push_to_hub False
""".split()


def test_reference_command_line_parses():
    args = parse_args(REFERENCE_LINE)
    assert args.tokenizer_name_or_path == "allenai/Llama-3.1-Tulu-3-8B-SFT"  # --tokenizer_name alias
    assert args.dataset_mixer_list == ["allenai/llama-3.1-tulu-3-8b-preference-mixture", "1.0"]
    assert (args.max_token_length, args.max_prompt_token_length) == (4096, 2048)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 4)
    assert args.learning_rate == 3e-6 and args.seed == 8
    assert args.use_slow_tokenizer and args.gradient_checkpointing and args.with_tracking
    assert args.push_to_hub is False
    # A real model is named, so the toy recipe does not apply: the reference defaults stand.
    assert args.eps == 1e-5 and args.warm_up_steps == 0 and args.dataset_mixer_eval_list == []


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], False),
        (["--with_tracking"], True),
        (["--with_tracking", "True"], True),
        (["--with_tracking", "False"], False),
    ],
)
def test_boolean_forms(flags, expected):
    assert parse_args(["--model_name_or_path", "x/y", *flags]).with_tracking is expected


def test_toy_recipe_fills_only_flags_not_given():
    args = parse_args(["--learning_rate", "0.5"])
    assert args.learning_rate == 0.5
    assert args.per_device_train_batch_size == TOY_RECIPE["per_device_train_batch_size"]
    assert args.dataset_mixer_list == TOY_RECIPE["dataset_mixer_list"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--no_such_flag", "1"], "unrecognized arguments"),
        (["--learning_rate", "fast"], "invalid float value"),
        (["--lr_scheduler_type", "step"], "invalid choice"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size: must be at least 1"),
        (["--timeout_minutes", "0"], "--timeout_minutes: must be at least 1"),
        (["--dataset_mixer_list", "a.jsonl"], "odd number"),
        (["--dataset_mixer_list", "missing.jsonl", "1.0"], "does not exist"),
        (["--dataset_mixer_list", "a/b", "1.0", "c/d", "2", "--dataset_mixer_list_splits", "x", "y", "z"], "one split"),
        (["--dataset_mixer_list", "a/b", "lots"], "not a positive number"),
        (["--with_tracking", "maybe"], "expected True or False"),
    ],
)
def test_bad_input_fails_with_a_clear_message(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        check_paths(parse_args(["--model_name_or_path", "x/y", *flags]))  # as train.py starts
    assert message in str(exc.value) + capsys.readouterr().err


def test_help_lists_every_flag_with_its_help():
    text = " ".join(build_parser().format_help().split())
    for f in dataclasses.fields(Args):
        assert f"--{f.name}" in text and " ".join(f.metadata["help"].split()) in text, f.name
    assert "--tokenizer_name" in text and "Peak learning rate." in text


def test_bad_flag_fails_before_loading_anything():
    # The command exits on the flag alone: no model, no data (a missing Hub id would hang offline).
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "minrm.train",
            "--model_name_or_path",
            "nobody/nothing",
            "--gradient_accumulation_steps",
            "-2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "--gradient_accumulation_steps: must be at least 1" in result.stderr


# ----------------------------------------------------------------------------------------------
# A YAML config file in place of flags (the reference's `python script.py config.yaml`)

REFERENCE_YAML = """
exp_name: tulu3_8b_rm
model_name_or_path: allenai/Llama-3.1-Tulu-3-8B-SFT
model_revision: main
tokenizer_name: allenai/Llama-3.1-Tulu-3-8B-SFT   # an alias, as on the command line
tokenizer_revision: main
use_slow_tokenizer: true
dataset_mixer_list:
  - allenai/llama-3.1-tulu-3-8b-preference-mixture
  - 1.0
max_token_length: 4096
max_prompt_token_length: 2048
per_device_train_batch_size: 4
gradient_accumulation_steps: 4
learning_rate: 3e-6            # a string to YAML 1.1; a float to the flag
lr_scheduler_type: linear
num_train_epochs: 1
gradient_checkpointing: true
with_tracking: yes
seed: 8
push_to_hub: false
"""


def test_a_yaml_file_gives_the_same_args_as_the_flags(tmp_path):
    config = tmp_path / "tulu3.yaml"
    config.write_text(REFERENCE_YAML)
    assert parse_args([str(config)]) == parse_args(REFERENCE_LINE)
    overrides = ["--seed", "3", "--dataset_mixer_list", "a/b", "0.5", "c/d", "2", "--with_tracking", "False"]
    assert parse_args([str(config), *overrides]) == parse_args(REFERENCE_LINE + overrides)
    # With the toy model, the keys the file sets count as given: the toy recipe fills only the rest.
    toy_config = tmp_path / "toy.yml"
    toy_config.write_text("learning_rate: 0.5\ndataset_mixer_eval_list: []\n")
    assert parse_args([str(toy_config)]) == parse_args(["--learning_rate", "0.5", "--dataset_mixer_eval_list"])
    assert parse_args([str(toy_config)]).per_device_train_batch_size == TOY_RECIPE["per_device_train_batch_size"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rat: 1e-3\n", ": unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
        ("foo: 1\n", ": unknown key 'foo'"),
        ("learning_rate: fast\n", ": argument --learning_rate: invalid float value: 'fast'"),
        ("seed: [1, 2]\n", ": a list where one value is expected: 2"),
        ("dataset_mixer_list: {a/b: 1.0}\n", ": dataset_mixer_list: give a list (NAME AMOUNT ...), not a mapping"),
        ("- seed\n- 1\n", ": expected `flag: value` lines, got a YAML list"),
        ("seed: [1\n", " line 2: not valid YAML"),
    ],
)
def test_bad_yaml_names_the_file(tmp_path, text, message):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as e:
        parse_args([str(config)])
    assert str(e.value).startswith(f"minrm: error: {config}{message}")


# ----------------------------------------------------------------------------------------------
# The flags of K-response rows and their losses, and checks that need nothing but the flags


def test_new_flags_defaults_and_the_args_log():
    args = parse_args([])
    assert (args.loss, args.center_rewards_coefficient, args.max_responses_per_prompt) == ("bradley_terry", None, None)
    assert (args.responses_key, args.scores_key, args.margin_key) == ("responses", "scores", "margin")
    given = "--loss plackett_luce --center_rewards_coefficient 0.01 --max_responses_per_prompt 4 --responses_key r "
    given += "--scores_key s --margin_key m"
    logged = dataclasses.asdict(parse_args(given.split()))  # what train.py prints at start, as JSON
    assert {k: logged[k] for k in ("loss", "center_rewards_coefficient", "max_responses_per_prompt")} == {
        "loss": "plackett_luce",
        "center_rewards_coefficient": 0.01,
        "max_responses_per_prompt": 4,
    }
    assert (logged["responses_key"], logged["scores_key"], logged["margin_key"]) == ("r", "s", "m")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--loss", "listnet"], "argument --loss: invalid choice: 'listnet'"),
        (["--max_responses_per_prompt", "1"], "--max_responses_per_prompt: must be at least 2 (a comparison needs two), got 1"),
        (["--center_rewards_coefficient", "-0.1"], "--center_rewards_coefficient: must be a number >= 0, got -0.1"),
        (["--center_rewards_coefficient", "nan"], "--center_rewards_coefficient: must be a number >= 0, got nan"),
        (["--checkpointing_steps", "bad"], "--checkpointing_steps: expected a positive integer or `epoch`, got 'bad'"),
        (["--checkpointing_steps", "0"], "--checkpointing_steps: expected a positive integer or `epoch`, got '0'"),
        (["--resume_from_checkpoint", "auto"], "--resume_from_checkpoint: auto needs --run_name (it finds the run's folder)"),
        (["--cache_dataset_only", "--dataset_skip_cache"], "--cache_dataset_only: builds the dataset cache, which --dataset_skip_cache turns off"),
        (["--dataset_mixer_list", "a/b", "1e3"], "--dataset_mixer_list: amount '1e3' for 'a/b' is not a positive number"),
    ],
)  # fmt: skip
def test_flags_checked_at_parse(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--model_name_or_path", "x/y", *flags])
    assert message in str(exc.value) + capsys.readouterr().err


def test_good_values_of_the_checked_flags():
    args = parse_args(["--checkpointing_steps", "epoch", "--resume_from_checkpoint", "auto", "--run_name", "r"])
    assert (args.checkpointing_steps, args.resume_from_checkpoint) == ("epoch", "auto")
    args = parse_args(["--center_rewards_coefficient", "0", "--max_responses_per_prompt", "2"])
    assert (args.center_rewards_coefficient, args.max_responses_per_prompt) == (0.0, 2)
    assert parse_args(["--dataset_mixer_list", "a/b", "400", "c/d", "0.5"]).dataset_mixer_list[1::2] == ["400", "0.5"]


def test_checkpointing_steps_fails_before_any_model_or_data_work(monkeypatch, tmp_path):
    """The trainer's entry (`main(parse_args())`) stops on the flag before its first fetch, load or process group."""

    def never(*args, **kwargs):
        raise AssertionError("model or data work began before the flag was checked")

    for module, name in [(train.checks, "check_model"), (train.distributed, "init_distributed"), (train, "load_tokenizer"),
                         (train.cache, "load_datasets"), (train.reward, "skeleton"), (train.reward, "read_model")]:  # fmt: skip
        monkeypatch.setattr(module, name, never)
    with pytest.raises(SystemExit) as exc:
        train.main(train.parse_args(["--checkpointing_steps", "bad", "--output_dir", str(tmp_path)]))
    assert exc.value.code == "minrm: error: --checkpointing_steps: expected a positive integer or `epoch`, got 'bad'"


def test_config_imports_nothing_from_minrm():
    """config.py is the bottom of the package: every module may read the flags, it reads none of them."""
    code = "import sys, minrm.config; print(sorted(m for m in sys.modules if m.split('.')[0] == 'minrm'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.split("\n")[0] == "['minrm', 'minrm.config']", result.stderr
