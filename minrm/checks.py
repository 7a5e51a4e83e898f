"""What the flags point at, checked before anything expensive starts, each failure in one line (docs/errors.md):
`check_paths` on the file system alone, then `check_model`, the run's first fetch, and `check_push_to_hub`.
"""

import os
import tempfile

import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig

from minrm.config import CHAT_TEMPLATES, DATA_FILES, TOY, fail, load_or_exit


def _check_source(flag: str, name: str, model: bool, neither: str = "an existing folder nor a valid Hub id") -> None:
    """`name` is an existing folder or a valid Hub id (`name` or `org/name`); a model folder holds a config."""
    if os.path.isdir(name):
        if model and not os.path.isfile(os.path.join(name, "config.json")):
            fail(flag, f"the folder {name} has no config.json: it is not a Hugging Face model folder")
        return
    if os.path.exists(name):
        fail(flag, f"{name} is a file; give the folder that holds it, or a Hub id")
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        fail(flag, f"the folder {name} does not exist")
    try:
        validate_repo_id(name)
    except HFValidationError:
        fail(flag, f"{name!r} is neither {neither}")


def _check_writable(flag: str, path: str) -> None:
    """A folder can be made (and removed) in the nearest existing ancestor (`os.access` says yes to root on /proc)."""
    target = os.path.abspath(path)
    while not os.path.exists(target):
        target = os.path.dirname(target)
    if not os.path.isdir(target):
        fail(flag, f"cannot create {path}: {target} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".minrm_probe_", dir=target))
    except OSError as e:
        fail(flag, f"cannot create {path}: a folder cannot be made in {target} ({e.strerror})")


def check_paths(args) -> None:
    """On the file system alone: the files and folders named exist, Hub ids are valid, output folders can be made."""
    for flag in ("dataset_mixer_list", "dataset_mixer_eval_list"):
        for name in getattr(args, flag)[::2]:
            if name.endswith(DATA_FILES) and not os.path.isfile(name):
                fail(flag, f"local dataset file {name!r} does not exist")
    if args.model_name_or_path != TOY:
        _check_source("model_name_or_path", args.model_name_or_path, model=True)
    if args.tokenizer_name_or_path not in (None, TOY):
        _check_source("tokenizer_name_or_path", args.tokenizer_name_or_path, model=False)
    if args.chat_template_name not in (None, *CHAT_TEMPLATES):  # else a tokenizer to borrow from
        known = f"a template minrm knows ({', '.join(CHAT_TEMPLATES)}) nor a tokenizer's folder or Hub id"
        _check_source("chat_template_name", args.chat_template_name, model=False, neither=known)
    _check_writable("output_dir", args.output_dir)
    if not args.dataset_skip_cache:
        _check_writable("dataset_local_cache_dir", args.dataset_local_cache_dir)
    if (resume := args.resume_from_checkpoint) not in (None, "auto") and not os.path.isdir(resume):
        fail("resume_from_checkpoint", f"the checkpoint folder {resume} does not exist")


def check_model(args, flag: str = "model_name_or_path"):
    """The model's config loads (from its folder or the Hub), a local folder holds weights, and the packed batchings
    can run the model, so that a wrong model fails before the data is built. Returns the config (None for the toy)."""
    name = args.model_name_or_path
    if name == TOY:
        return None
    _check_source(flag, name, model=True)
    kwargs = {"revision": args.model_revision, "trust_remote_code": args.trust_remote_code}
    config = load_or_exit(AutoConfig.from_pretrained, flag, name, **kwargs)
    if os.path.isdir(name) and not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(name)):
        fail(flag, f"the folder {name} has no weights (*.safetensors or *.bin files)")
    if args.batching != "padded":
        packed_attentions(config, args.packed_attention, torch.cuda.is_available(), args.batching)
    if args.context_parallel_size > 1:
        check_context_parallel(config, args.context_parallel_size, args.packed_attention)
    return config


def check_push_to_hub(args) -> None:
    """With --push_to_hub, before any work: a token is found, the Hub accepts it, and whoami says it may write to the
    repo; sets --hf_entity when not given. Only rank 0, which uploads, asks (whoami is rate-limited)."""
    if not args.push_to_hub or os.environ.get("RANK", "0") != "0":
        return
    how = "log in with `hf auth login`, set HF_TOKEN, or pass --push_to_hub False"
    try:
        me = HfApi().whoami()
    except LocalTokenNotFoundError:
        fail("push_to_hub", f"no Hugging Face token found, so the model could not be uploaded; {how}")
    except OfflineModeIsEnabled:
        fail("push_to_hub", "HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it or pass --push_to_hub False")
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "no"
        fail("push_to_hub", f"the Hub refused the token (HTTP {status}: {str(e).splitlines()[0]}); {how}")
    except Exception as e:  # the network: httpx's errors, whatever the transport
        fail("push_to_hub", f"cannot reach the Hub to check the token ({type(e).__name__}: {e}); retry, or {how}")
    token = (me.get("auth") or {}).get("accessToken") or {}
    entity = args.hf_entity or me["name"]
    repo_id = f"{entity}/{args.hf_repo_id or 'open_instruct_dev'}"
    name = f"the token {token.get('displayName', '')!r}"
    if token.get("role") == "read":
        write = "log in with a write token (`hf auth login`) or pass --push_to_hub False"
        fail("push_to_hub", f"{name} is read-only; {write}")
    if token.get("role") == "fineGrained":
        scoped = (token.get("fineGrained") or {}).get("scoped") or []
        writable = {s.get("entity", {}).get("name") for s in scoped if "repo.write" in s.get("permissions", [])}
        if not writable & {entity, repo_id}:  # a user's or an organisation's repos, or this one repo
            fail("push_to_hub", f"{name} (fine-grained) cannot write to {entity}'s repos; give it `repo.write` there")
    if entity != me["name"]:
        orgs = {org.get("name"): org for org in me.get("orgs") or []}
        if entity not in orgs:
            fail("hf_entity", f"{me['name']} is not a member of {entity}, so cannot create {repo_id}; check the name")
        if orgs[entity].get("roleInOrg") == "read":
            fail("hf_entity", f"{me['name']} can only read in {entity}; ask for write access, or upload elsewhere")
    args.hf_entity = entity


# ----------------------------------------------------------------------------------------------
# What runs packed rows (--batching packed or shared_prefix), from the model's config alone

SEGMENTS = "minrm_segments"  # the name model/attention.py registers its segment attention under


def packed_attentions(config, choice: str, cuda: bool, batching: str = "shared_prefix") -> tuple[list[str], str | None]:
    """The attentions that may run this model's packed rows, in the order to try them (`segments` is
    model/attention.py's; none left: the model's own with a dense mask), and why `auto` passes over
    FlexAttention; what cannot run is refused in one line naming the flag."""
    config = config.get_text_config()
    if problem := packing_problem(config):
        fail(f"batching {batching}", f"{config.model_type} {problem}; use --batching padded")
    mixed = mask_window(config) == "mixed"  # per-layer windows: only segment attention has them
    if mixed and choice in ("flex_attention", "mask"):
        fail(f"packed_attention {choice}", f"{config.model_type} mixes sliding-window and full attention layers, "
             "which one mask cannot express; use --packed_attention auto or --batching padded")  # fmt: skip
    no_flex = flex_problem(config, cuda)
    if no_flex and choice == "flex_attention":
        fail("packed_attention flex_attention", f"{no_flex}; use auto or segments")
    if choice != "auto":
        return {"flex_attention": ["flex_attention"], "segments": [SEGMENTS], "mask": []}[choice], None
    return (["flex_attention"] if cuda and not mixed and not no_flex else []) + [SEGMENTS], no_flex


def flex_problem(config, cuda: bool) -> str | None:
    """Why FlexAttention cannot run this model here (None when it can). Inductor's CUDA kernel refuses
    heads of fewer than 16 dims (`tl.dot`); its CPU one runs any."""
    config = config.get_text_config()
    qk = getattr(config, "qk_head_dim", None)  # multi-head latent attention: its own query/key size
    qk = qk or getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    smallest = min(qk, getattr(config, "v_head_dim", None) or qk)
    if not cuda or smallest >= 16:
        return None
    return f"{config.model_type} has attention heads of {smallest} dims; FlexAttention's GPU kernel needs 16 or more"


def packing_problem(config) -> str | None:
    """Why packed rows cannot run this model (None when they can)."""
    config = config.get_text_config()
    if getattr(config, "attn_logit_softcapping", None):  # Gemma 2
        return "softcaps its attention logits, which the packed attentions do not"
    if config.model_type == "gpt_oss":  # sink logits per head, and layers that mix windows
        return "has attention sinks, which the packed attentions do not run with its mixed sliding layers"
    return None


def check_context_parallel(config, c: int, packed_attention: str) -> None:
    """Refuse, in one line, a --context_parallel_size C > 1 that the model's attention cannot split."""
    config, flag = config.get_text_config(), f"context_parallel_size {c}"
    if packed_attention not in ("auto", "segments"):
        fail(flag, f"runs the segment attention between its all-to-alls, not --packed_attention {packed_attention}")
    if problem := packing_problem(config):
        fail(flag, f"{config.model_type} {problem}")
    if config.num_attention_heads % c:
        fail(flag, f"must divide the model's {config.num_attention_heads} attention heads")


def mask_window(config) -> int | str | None:
    """The sliding window one mask for every layer must apply: the config's when all layers slide,
    None when none does, "mixed" when some layers slide and others attend in full."""
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or ["sliding_attention"])
    if window is None or kinds == {"sliding_attention"}:
        return window
    return "mixed" if "sliding_attention" in kinds else None
