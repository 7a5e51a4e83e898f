"""The trained model as a Hugging Face folder (`AutoModelForSequenceClassification.from_pretrained` loads
it: safetensors weights, `config.json` naming the original architecture, the tokenizer, a model card), and
its upload to the Hub. The end of training writes it from the sharded model; `minrm.export` from a checkpoint.
"""

from pathlib import Path

import torch.distributed as dist
from huggingface_hub import HfApi, save_torch_state_dict
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from minrm.distributed import Dist


def save_hf_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, architecture: str, out_dir: str, d: Dist,
                   card: str, max_shard_size: str = "5GB") -> None:  # fmt: skip
    """Gather the full state dict onto rank 0's CPU (one full copy, nowhere else) and write it there, with the model
    card. `architecture` is the class name before FSDP2 wrapped it (`FSDPLlama...` is not loadable)."""
    # Memory: every rank takes part in the all-gathers, which go one parameter at a time; with
    # cpu_offload each gathered tensor moves to rank 0's CPU and the device copy is dropped, and the
    # other ranks keep nothing. So rank 0 peaks at one full CPU copy of the weights (plus one
    # parameter on the device); safetensors then writes the shards from that copy, one file at a time.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.is_main:
        # A gathered tensor can be a view into FSDP's padded buffer (e.g. the (1, H) score head
        # split over ranks along dim 0); safetensors refuses to save such partial storages.
        state = {k: t.clone() if t.untyped_storage().nbytes() != t.nbytes else t for k, t in state.items()}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_torch_state_dict(state, out_dir, max_shard_size=max_shard_size, metadata={"format": "pt"})
        model.config.architectures = [architecture]
        model.config.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        Path(out_dir, "README.md").write_text(card)
    dist.barrier()


def push_folder(folder: str, repo_id: str, revision: str) -> str:
    """Upload `folder` to branch `revision` of the model repo `repo_id` (created if needed); returns its URL. A failure
    (the network, the Hub) exits (status 1) with one line: where the model is saved, the command that uploads it."""
    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.create_branch(repo_id, branch=revision, exist_ok=True)
        # The run folder also holds the resumable checkpoints.
        api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=f"minrm: {revision}",
                          ignore_patterns=["checkpoints/*"])  # fmt: skip
    except Exception as e:  # httpx's or the Hub's errors: the model on disk is what matters now
        reason = (str(e).strip().splitlines() or [""])[0]
        failed = f"the upload to {repo_id} (branch {revision}) failed ({type(e).__name__}: {reason})"
        later = f"Upload it later with: hf upload {repo_id} {folder} --revision {revision} --exclude 'checkpoints/*'"
        raise SystemExit(f"minrm: error: --push_to_hub: {failed}; the model is saved in {folder}. {later}") from None
    return f"https://huggingface.co/{repo_id}/tree/{revision}"


def resolve_hub_repo(args) -> tuple[str, str]:
    """The reference's naming: ENTITY/REPO_ID (default open_instruct_dev, the logged-in user), branch = run name."""
    entity = args.hf_entity or HfApi().whoami()["name"]
    return f"{entity}/{args.hf_repo_id or 'open_instruct_dev'}", args.hf_repo_revision or args.run_name


HYPERPARAMETERS = ("loss center_rewards_coefficient max_responses_per_prompt learning_rate lr_scheduler_type "
                   "warm_up_steps per_device_train_batch_size gradient_accumulation_steps num_train_epochs "
                   "total_episodes max_token_length max_prompt_token_length max_grad_norm weight_decay eps seed"
                   ).split()  # fmt: skip


def model_card(args, metrics: dict) -> str:
    """README.md of the exported folder: base model, data, key hyperparameters, final metrics."""
    hyper = "".join(f"- {k}: {getattr(args, k)}\n" for k in HYPERPARAMETERS)
    final = "".join(f"- {k}: {v:.6g}\n" if isinstance(v, float) else f"- {k}: {v}\n" for k, v in metrics.items())
    train, evals = " ".join(args.dataset_mixer_list), " ".join(args.dataset_mixer_eval_list) or "none"
    return f"""---
base_model: {args.model_name_or_path}
library_name: transformers
tags: [reward-model, minrm]
---

# {args.run_name}

A reward model trained with minrm from preference pairs or ranked lists (the loss is below). Load it with \
`AutoModelForSequenceClassification.from_pretrained`; the reward is the single logit.

- Base model: `{args.model_name_or_path}`
- Training data (mixer list): `{train}`
- Eval data (mixer list): `{evals}`

## Hyperparameters

{hyper}
## Final metrics

{final}"""
