"""Bad files and flags get one line naming what and where, before any model is loaded."""

import json
import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
from huggingface_hub import HfApi

from minrm import train
from minrm.checks import check_model, check_paths, check_push_to_hub
from minrm.config import parse_args
from minrm.data.tokenizer import load_tokenizer
from minrm.model import hf_folder
from tests.conftest import ROOT, build_dataset

CONVERSATION = {
    "chosen": [{"role": "user", "content": "copy: red cat"}, {"role": "assistant", "content": "red cat"}],
    "rejected": [{"role": "user", "content": "copy: red cat"}, {"role": "assistant", "content": "red dog"}],
}
LINE = json.dumps(CONVERSATION).encode()


def refused(call, *args) -> str:
    """The message a SystemExit carries (a string code: the process exits with status 1)."""
    with pytest.raises(SystemExit) as e:
        call(*args)
    assert isinstance(e.value.code, str)
    return e.value.code


def parse_and_check(flags: list[str]):
    """The flags parsed and their paths checked, as train.py starts."""
    check_paths(parse_args(flags))


def build(path: str, *flags: str):
    args = parse_args(["--dataset_mixer_list", path, "1.0", *flags])
    return build_dataset(args.dataset_mixer_list, ["train"], load_tokenizer(args), args, "train")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"", "{path} is empty: it has no rows"),
        ("blank.jsonl", b"\n  \n\n", "{path} is empty: it has no rows"),
        ("empty.json", b" \n", "{path} is empty: it has no rows"),
        ("empty.parquet", b"", "{path} is empty: it has no rows"),
        ("latin1.jsonl", LINE + b"\n" + LINE + b"\n" + LINE.replace(b"red dog", b"r\xe9d dog") + b"\n", "{path} line 3: bytes that are not UTF-8 (b'\\xe9d d' at byte"),
        ("latin1.json", b"[\n" + LINE + b",\n" + LINE.replace(b"cat", b"c\xe4t") + b"\n]", "{path} line 3: bytes that are not UTF-8"),
        ("object.json", json.dumps(CONVERSATION, indent=1).encode(), "{path} holds one JSON object, not rows: a .json file holds a list of objects, or one object per line"),
        ("numbers.json", b"[" + LINE + b", 3]", "{path} row 1 is a JSON int, not an object"),
        ("cut.json", b"[\n" + LINE + b",\n" + LINE[:20], "{path} line 3 column 21: invalid JSON"),
        ("text.parquet", b"chosen,rejected\nred cat,red dog\n", "{path} is not a Parquet file"),
    ],
)  # fmt: skip
def test_bad_data_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    assert refused(build, str(path)).startswith("minrm: error: " + message.format(path=path))


def test_good_json_forms_read_like_jsonl(tmp_path):
    rows = [
        CONVERSATION,
        {**CONVERSATION, "rejected": CONVERSATION["rejected"][:1] + [{"role": "assistant", "content": "cat"}]},
    ]
    expected = build(write_lines(tmp_path / "rows.jsonl", rows))
    (tmp_path / "array.json").write_text(json.dumps(rows, indent=2))
    assert build(str(tmp_path / "array.json"))[:] == expected[:]
    assert build(write_lines(tmp_path / "lines.json", rows))[:] == expected[:]  # JSON lines in a .json


def write_lines(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def folders(tmp_path, tiny_model_dir):
    """A tokenizer-only folder (no model config) and a model folder with a config but no weights."""
    tokenizer_only, no_weights = tmp_path / "tokenizer_only", tmp_path / "no_weights"
    shutil.copytree(tiny_model_dir, tokenizer_only, ignore=shutil.ignore_patterns("config.json", "*.safetensors"))
    shutil.copytree(tiny_model_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    return str(tokenizer_only), str(no_weights)


def test_bad_model_and_tokenizer_paths(folders):
    tokenizer_only, _ = folders
    cases = [
        (["--model_name_or_path", "./models/my_model"], "--model_name_or_path: the folder ./models/my_model does not exist"),
        (["--model_name_or_path", "/abs/missing"], "--model_name_or_path: the folder /abs/missing does not exist"),
        (["--model_name_or_path", "my model!"], "--model_name_or_path: 'my model!' is neither an existing folder nor a valid Hub id"),
        (["--model_name_or_path", tokenizer_only], f"--model_name_or_path: the folder {tokenizer_only} has no config.json"),
        (["--tokenizer_name", "../tok"], "--tokenizer_name_or_path: the folder ../tok does not exist"),
        (["--tokenizer_name_or_path", "a/b/c"], "--tokenizer_name_or_path: the folder a/b/c does not exist"),
        (["--tokenizer_name_or_path", "tok@1"], "--tokenizer_name_or_path: 'tok@1' is neither an existing folder nor a valid Hub id"),
    ]  # fmt: skip
    for flags, message in cases:
        assert refused(parse_and_check, flags).startswith("minrm: error: " + message), flags


def test_hub_ids_that_cannot_be_fetched_and_folders_without_weights(monkeypatch, tiny_model_dir, folders):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: fail at once
    offline = "(We couldn't connect to 'https://huggingface.co' to load the files"
    args = parse_args(["--model_name_or_path", "nobody/nothing"])
    message = refused(check_model, args)
    assert message.startswith(f"minrm: error: --model_name_or_path nobody/nothing: cannot be loaded {offline}")
    assert refused(train.main, args) == message  # first in the trainer, before check_packing's own fetch
    no_weights = refused(check_model, parse_args(["--model_name_or_path", folders[1]]))
    assert (
        no_weights
        == f"minrm: error: --model_name_or_path: the folder {folders[1]} has no weights (*.safetensors or *.bin files)"
    )
    args = parse_args(["--model_name_or_path", tiny_model_dir, "--tokenizer_name_or_path", "nobody/nothing"])
    message = refused(load_tokenizer, args)
    assert message.startswith(
        f"minrm: error: --tokenizer_name_or_path nobody/nothing: has no tokenizer that loads {offline}"
    )
    args = parse_args(["--model_name_or_path", tiny_model_dir, "--chat_template_name", "tullu"])
    assert refused(load_tokenizer, args).startswith(
        "minrm: error: --chat_template_name tullu: is neither a template minrm knows (tulu, zephyr, simple_chat) "
        f"nor a tokenizer that loads {offline}"
    )


def test_other_flags_users_get_wrong(tmp_path, pairs_file):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        (["--chat_template_name", "my template"], "--chat_template_name: 'my template' is neither a template minrm knows (tulu, zephyr, simple_chat) nor a tokenizer's folder or Hub id"),
        (["--dataset_mixer_list_splits", "validation"], "--dataset_mixer_list_splits: minrm:toy has the splits ['test', 'train'], not 'validation'"),
        (["--dataset_mixer_list", pairs_file, "1.0", "--dataset_mixer_list_splits", "test"], f"--dataset_mixer_list_splits: {pairs_file} is a local file, whose one split is `train`, not 'test'"),
        (["--dataset_mixer_eval_list", pairs_file, "1.0"], f"--dataset_mixer_eval_list_splits: {pairs_file} is a local file, whose one split is `train`, not 'test'"),
        (["--output_dir", str(a_file / "out")], f"--output_dir: cannot create {a_file / 'out'}: {a_file} is a file"),
        (["--dataset_local_cache_dir", str(a_file)], f"--dataset_local_cache_dir: cannot create {a_file}: {a_file} is a file"),
        (["--resume_from_checkpoint", str(tmp_path / "step_9")], f"--resume_from_checkpoint: the checkpoint folder {tmp_path / 'step_9'} does not exist"),
    ]  # fmt: skip
    for flags, message in cases:
        assert refused(parse_and_check, flags) == "minrm: error: " + message, flags
    assert refused(build, pairs_file, "--chosen_key", "good") == (
        f"minrm: error: {pairs_file}: no column 'good' (--chosen_key) in its first 48 rows; "
        "its columns are ['chosen', 'rejected']"
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and /sys are Linux's")
@pytest.mark.parametrize("path", ["/proc/minrm_out", "/sys/minrm_out"])
def test_output_dir_in_a_system_folder(path):
    """mkdir fails there even for root, whom `os.access` tells that /proc and /sys are writable."""
    assert refused(parse_and_check, ["--output_dir", path]).startswith(
        f"minrm: error: --output_dir: cannot create {path}: a folder cannot be made in {os.path.dirname(path)} ("
    )


def test_writable_folders_are_checked_without_a_trace(tmp_path):
    parse_and_check(["--output_dir", str(tmp_path / "out"), "--dataset_local_cache_dir", str(tmp_path / "a/cache")])
    assert os.listdir(tmp_path) == []  # the probe folders are gone, and neither folder is made yet


def test_a_run_folder_that_cannot_be_made(monkeypatch, tmp_path):
    """The run folder OUTPUT_DIR/RUN_NAME, made by rank 0 once the run name is agreed, fails with one line."""
    (tmp_path / "taken").write_text("")  # a file where the run folder goes
    monkeypatch.setattr(train.distributed, "init_distributed", lambda *flags: SimpleNamespace(is_main=True))
    monkeypatch.setattr(train.distributed, "broadcast_object", lambda value: value)
    message = refused(train.main, parse_args(["--output_dir", str(tmp_path), "--run_name", "taken"]))
    assert message == f"minrm: error: --output_dir: cannot create {tmp_path / 'taken'} (File exists)"


def test_the_trainer_exits_with_the_line(tmp_path, tiny_model_dir):
    """As users see it: exit status 1, the line last on stderr, no traceback, no model loaded."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(LINE + b"\n\xff\n")
    flags = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", str(bad), "1.0", "--dataset_skip_cache"]
    cmd = [sys.executable, "-m", "minrm.train", *flags, "--output_dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"minrm: error: {bad} line 2: bytes that are not UTF-8")
    assert "Traceback" not in result.stderr and "optimizer steps" not in result.stdout


# ----------------------------------------------------------------------------------------------
# --push_to_hub: checked at start, and an upload that fails at the end says where the model is


def test_push_without_a_token_stops_before_the_data(tmp_path):
    """No token anywhere (HF_TOKEN unset, HF_HOME an empty folder): huggingface_hub's whoami raises
    before any request, so this needs no network. One line, in seconds, before any dataset is read."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    env |= {"OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home")}
    env.pop("HF_HUB_OFFLINE", None)
    cmd = [sys.executable, "-m", "minrm.train", "--push_to_hub", "True", "--output_dir", str(tmp_path / "out")]
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and time.monotonic() - start < 60
    assert result.stderr.strip().splitlines()[-1] == (
        "minrm: error: --push_to_hub: no Hugging Face token found, so the model could not be uploaded; "
        "log in with `hf auth login`, set HF_TOKEN, or pass --push_to_hub False"
    )
    assert "Traceback" not in result.stderr and "data:" not in result.stdout  # no dataset was read
    assert not (tmp_path / "out").exists()


def whoami(name="alice", role="write", orgs=(), scoped=None) -> dict:
    """The parts of the Hub's /api/whoami-v2 answer the check reads."""
    token = {"displayName": "mytoken", "role": role}
    if scoped is not None:
        token["fineGrained"] = {"global": [], "scoped": scoped}
    return {"name": name, "orgs": [{"name": o, "roleInOrg": r} for o, r in orgs], "auth": {"accessToken": token}}


def test_push_checks_what_the_token_may_write(monkeypatch):
    real_whoami = HfApi.whoami
    def check(answer, *flags):
        monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: answer)
        args = parse_args(["--push_to_hub", "True", *flags])
        check_push_to_hub(args)
        return args

    assert check(whoami()).hf_entity == "alice"  # the upload at the end needs no second look-up
    assert check(whoami(orgs=[("lab", "write")]), "--hf_entity", "lab").hf_entity == "lab"
    user_scope = [{"entity": {"type": "user", "name": "alice"}, "permissions": ["repo.content.read", "repo.write"]}]
    assert check(whoami(role="fineGrained", scoped=user_scope)).hf_entity == "alice"
    repo_scope = [{"entity": {"type": "model", "name": "alice/rm"}, "permissions": ["repo.write"]}]
    check(whoami(role="fineGrained", scoped=repo_scope), "--hf_repo_id", "rm")
    cases = [
        (whoami(role="read"), [], "--push_to_hub: the token 'mytoken' is read-only; log in with a write token"),
        (whoami(role="fineGrained", scoped=[]), [], "--push_to_hub: the token 'mytoken' (fine-grained) cannot write to alice's repos"),
        (whoami(role="fineGrained", scoped=repo_scope), [], "cannot write to alice's repos"),  # another repo
        (whoami(), ["--hf_entity", "lab"], "--hf_entity: alice is not a member of lab, so cannot create lab/open_instruct_dev"),
        (whoami(orgs=[("lab", "read")]), ["--hf_entity", "lab"], "--hf_entity: alice can only read in lab"),
    ]  # fmt: skip
    for answer, flags, message in cases:
        assert message in refused(check, answer, *flags)
    # huggingface_hub's own whoami, with a token but offline: refused before any request.
    monkeypatch.setattr(HfApi, "whoami", real_whoami)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    assert "--push_to_hub: HF_HUB_OFFLINE is set" in refused(check_push_to_hub, parse_args(["--push_to_hub", "True"]))
    check_push_to_hub(parse_args([]))  # without --push_to_hub, nothing is asked


def test_a_failed_upload_says_where_the_model_is_and_how_to_upload_it(monkeypatch, tmp_path):
    """The network gone at the end (offline mode here: huggingface_hub refuses the request itself):
    one line with the folder and the command that uploads it later, status 1, no traceback."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    message = refused(hf_folder.push_folder, str(tmp_path), "alice/open_instruct_dev", "run1")
    failed = "the upload to alice/open_instruct_dev (branch run1) failed (OfflineModeIsEnabled: "
    assert message.startswith(f"minrm: error: --push_to_hub: {failed}")
    assert message.endswith(
        f"the model is saved in {tmp_path}. Upload it later with: "
        f"hf upload alice/open_instruct_dev {tmp_path} --revision run1 --exclude 'checkpoints/*'"
    )
