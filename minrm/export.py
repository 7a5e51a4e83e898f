"""Write a trained (sharded) model as a Hugging Face folder, and push it to the Hub.

The folder loads with `AutoModelForSequenceClassification.from_pretrained(folder)`: safetensors
weights (sharded above `max_shard_size`, with their index), `config.json` naming the original
architecture, and the tokenizer with its chat template.
"""

import os

from huggingface_hub import HfApi, save_torch_state_dict
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from minrm.distributed import Dist, barrier


def save_hf_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    architecture: str,
    out_dir: str,
    d: Dist,
    max_shard_size: str = "5GB",
) -> None:
    """Gather the full state dict onto rank 0's CPU (one full copy, nowhere else) and write it there.

    `architecture` is the class name before FSDP2 wrapped it (`FSDPLlama...` is not loadable).
    """
    # Every rank takes part in the all-gathers; with cpu_offload only rank 0 keeps the tensors.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.is_main:
        for key, tensor in state.items():
            # A gathered tensor can be a view into FSDP's padded buffer (e.g. the (1, H) score head
            # split over ranks along dim 0); safetensors refuses to save such partial storages.
            if tensor.untyped_storage().nbytes() != tensor.nbytes:
                state[key] = tensor.clone()
        os.makedirs(out_dir, exist_ok=True)
        save_torch_state_dict(state, out_dir, max_shard_size=max_shard_size, metadata={"format": "pt"})
        model.config.architectures = [architecture]
        model.config.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    del state
    barrier()


def push_folder(folder: str, repo_id: str, revision: str) -> str:
    """Upload `folder` to branch `revision` of the model repo `repo_id` (created if needed); returns its URL."""
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.create_branch(repo_id, branch=revision, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=f"minrm: {revision}")
    return f"https://huggingface.co/{repo_id}/tree/{revision}"


def resolve_hub_repo(args) -> tuple[str, str]:
    """The reference's naming: ENTITY/REPO_ID (default open_instruct_dev, the logged-in user), branch = run name."""
    entity = args.hf_entity or HfApi().whoami()["name"]
    return f"{entity}/{args.hf_repo_id or 'open_instruct_dev'}", args.hf_repo_revision or args.run_name
