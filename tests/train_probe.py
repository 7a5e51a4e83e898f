"""`minrm.train` as users run it, with probes at its phase boundaries (for test_distributed.py).

    torchrun --nproc_per_node 2 -m tests.train_probe OUT_DIR [minrm flags...]

Each rank writes OUT_DIR/rank<R>.json: `load`, its peak resident memory (Linux VmHWM, reset
through /proc/self/clear_refs) from the `skeleton` call until the weights are in the
shards, above its resident memory at the start; `steps`, for each optimizer step, the bytes of all
live tensors at the start of each micro-batch's forward (found by the garbage collector: FSDP2's
internal gradient buffers included). Rank 0 also saves the full state dict as loaded
(`loaded.pt`) and the rewards the sharded model gives right after loading to fixed sequences
(`rewards.pt`: a padded batch, hence --batching padded). All sizes in KiB.
"""

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

import minrm.train as train

PROBE_IDS = [[5, 9, 12, 7, 3, 20], [4, 8, 30], [11, 6, 6, 19, 2]]


def memory_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def tensor_kb() -> int:
    """KiB held by the storages of all live tensors and their gradients (which autograd makes in C++:
    reached through `.grad`), each storage counted once."""
    storages = {}
    for obj in gc.get_objects():
        if torch.is_tensor(obj):
            for t in (obj, obj.grad):
                t = t.to_local() if isinstance(t, DTensor) else t
                if t is not None and not t.is_meta:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values()) // 1024


def start_phase() -> int:
    """Restart the peak (VmHWM) from the current resident size, which it returns."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return memory_kb("VmRSS")


def save_loaded(model, d, out: str) -> None:
    """Rank 0 saves the full state dict and the rewards of PROBE_IDS (right-padded); all ranks take part."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    width, pad = max(map(len, PROBE_IDS)), model.config.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in PROBE_IDS])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in PROBE_IDS])
    with torch.no_grad():
        last = torch.tensor([i * width + len(s) - 1 for i, s in enumerate(PROBE_IDS)])
        rewards = model(input_ids=ids.to(d.device), last_index=last.to(d.device), attention_mask=mask.to(d.device)).cpu()
    if d.is_main:
        torch.save({k: v.clone() for k, v in state.items()}, os.path.join(out, "loaded.pt"))
        torch.save({"input_ids": ids, "attention_mask": mask, "rewards": rewards}, os.path.join(out, "rewards.pt"))


def main(out: str, argv: list[str]) -> None:
    record = {"load": None, "steps": []}
    skeleton, fill_from_rank0, train_step = train.reward.skeleton, train.reward.fill_from_rank0, train.train_step
    start = {}

    def skeleton_probe(*args, **kwargs):
        start["load"] = start_phase()
        return skeleton(*args, **kwargs)

    def fill_probe(model, full, d):
        fill_from_rank0(model, full, d)
        record["load"] = memory_kb("VmHWM") - start["load"]
        save_loaded(model, d, out)
        model.register_forward_pre_hook(lambda *_: record["steps"][-1].append(tensor_kb()))

    def step_probe(*args, **kwargs):
        record["steps"].append([])
        return train_step(*args, **kwargs)

    train.reward.skeleton, train.reward.fill_from_rank0, train.train_step = skeleton_probe, fill_probe, step_probe
    train.main(train.parse_args(argv))  # destroys the process group at the end
    with open(os.path.join(out, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    assert not dist.is_initialized()
    main(sys.argv[1], sys.argv[2:])
