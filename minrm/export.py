"""Write a checkpoint as the Hugging Face folder the end of training writes (model/hf_folder.py),
on one process whatever the checkpoint's world size:

    python -m minrm.export output/my_run/checkpoints/step_200 output/my_run_step_200
"""

from dataclasses import dataclass

import torch.distributed as dist
from transformers.hf_argparser import HfArg

from minrm.config import Args, parse_command
from minrm.data.tokenizer import load_tokenizer
from minrm.distributed import init_distributed
from minrm.model.hf_folder import model_card, save_hf_folder
from minrm.model.reward import skeleton
from minrm.training.checkpoint import check_complete, load_model_weights


@dataclass
class ExportArgs:
    """Write a checkpoint as the Hugging Face folder training writes: python -m minrm.export CHECKPOINT OUT_DIR."""

    checkpoint: str = HfArg(help="A checkpoint folder, e.g. OUTPUT_DIR/RUN_NAME/checkpoints/step_100.")
    out_dir: str = HfArg(help="The Hugging Face folder to write.")
    max_shard_size: str = HfArg(default="5GB", help="safetensors shard size.")


def export_checkpoint(checkpoint: str, out_dir: str, max_shard_size: str) -> None:
    """The model's skeleton from the run's args in the checkpoint's meta.json; DCP loads shards of any world size."""
    try:
        meta = check_complete(checkpoint)
    except ValueError as e:
        raise SystemExit(f"minrm.export: error: {e}") from e
    args = Args(**meta["args"])
    d = init_distributed()  # a group of one: the gather in save_hf_folder is then a no-op
    tokenizer = load_tokenizer(args)
    model = skeleton(args, tokenizer).to_empty(device="cpu")  # every saved value comes from the checkpoint
    load_model_weights(checkpoint, model)
    save_hf_folder(model, tokenizer, meta["architecture"], out_dir, d, model_card(args, meta.get("metrics", {})),
                   max_shard_size)  # fmt: skip
    print(f"exported {checkpoint} (step {meta['step']}) to {out_dir}")
    dist.destroy_process_group()


if __name__ == "__main__":
    export_checkpoint(**vars(parse_command(ExportArgs, None, "python -m minrm.export", ("checkpoint", "out_dir"))))
