"""Train a Bradley-Terry reward model from pairs or ranked lists: the loop, top to bottom.

    python -m minrm.train                      # the embedded toy run: offline, under a minute on a CPU
    python -m minrm.train --help               # every flag
    torchrun --nproc_per_node 8 -m minrm.train --model_name_or_path allenai/Llama-3.1-Tulu-3-8B-SFT \\
        --dataset_mixer_list allenai/llama-3.1-tulu-3-8b-preference-mixture 1.0 ...
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node 8 \\
        --rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:29500 -m minrm.train ...

Phases: setup -> data -> model -> shard -> loop (step, log, eval, save) -> export -> plot. A row is
a prompt with K responses (a pair: K = 2); one optimizer step (`train_step`) takes batch_size =
per_device_train_batch_size x world_size x gradient_accumulation_steps rows (world_size / C with
--context_parallel_size C), and its loss is the mean over them of each row's loss (model/loss.py).
"""

import dataclasses
import json
import math
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from minrm import checks, distributed
from minrm.config import Args, parse_args
from minrm.data import batching, cache, mixer
from minrm.data.tokenizer import load_tokenizer
from minrm.distributed import print0
from minrm.model import hf_folder, liger, reward
from minrm.model.loss import LOSS, STATS, row_statistics
from minrm.training import checkpoint, failsafe
from minrm.training.evaluate import evaluate
from minrm.training.tracking import Tracker, summary_line


class NonFinite(Exception):
    """A step's loss or gradient norm is NaN or infinite; raised before its update is applied."""


# ----------------------------------------------------------------------------------------------
# The optimizer and the learning rate: AdamW as the reference builds it; the schedules as pure
# functions of the step (the same values as `transformers.get_scheduler` after `step` scheduler
# steps), over the true number of optimizer steps (the reference multiplies it by the epochs again,
# so with more than one epoch its rate never reaches the end value: README, "Where minrm differs").

POLYNOMIAL_END_LR = 1e-7  # transformers' default lr_end for the polynomial schedule


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.AdamW:
    # torch's AdamW with the reference's eps; weight decay applies to every parameter, norms and
    # score head included, as in the reference. Fused: one kernel per device and dtype for all the
    # parameters, on CPU and CUDA and on FSDP2's DTensor shards (a pointwise op to DTensor), as
    # torchtitan builds its AdamW. Left to choose, torch runs its single-tensor loop on CPU (foreach
    # defaults to CUDA only), a Python loop of DTensor dispatches per parameter: 17x slower on the
    # toy model, 4x on a 20M one. The update is the single-tensor one to a float32 rounding.
    return torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, eps=args.eps, weight_decay=args.weight_decay, fused=True
    )


def lr_multiplier(kind: str, step: int, warmup: int, total: int, peak_lr: float = 1.0) -> float:
    if kind != "constant" and step < warmup:
        return step / max(1, warmup)
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)  # 0 -> 1 over the decay
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if kind == "cosine":  # half a cosine wave
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if kind == "cosine_with_restarts":  # one hard restart in transformers' default: one cycle
        return 0.0 if progress >= 1.0 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0))))
    if kind == "polynomial":  # power 1 from the peak to POLYNOMIAL_END_LR, then flat
        if step > total:
            return POLYNOMIAL_END_LR / peak_lr
        return ((peak_lr - POLYNOMIAL_END_LR) * (1.0 - progress) + POLYNOMIAL_END_LR) / peak_lr
    raise ValueError(f"unknown lr_scheduler_type {kind!r}")


# ----------------------------------------------------------------------------------------------
# One optimizer step


def forward_backward(model, batch, args: Args, rows: int, responses: int | None = None) -> torch.Tensor:
    """One micro-batch's forward and backward; returns its rows' `STATS`, summed, on the device. FSDP
    sums the ranks' gradients (`shard_model`), so dividing by the step's rows over all ranks (and its
    responses, for the centering) gives the gradient of the step's mean loss, however it was cut."""
    inputs, prefs = batch
    rewards = model(**inputs)  # (R,) fp32, row by row
    stats = row_statistics(rewards, prefs, args.loss)  # (N, len(STATS))
    objective = stats[:, LOSS].sum() / rows
    if args.center_rewards_coefficient:  # pulls rewards towards 0 (arXiv:2312.09244)
        valid = prefs.index >= 0  # every response counts, identical ones sharing a reward included
        squares = torch.where(valid, rewards.square()[prefs.index], 0.0).sum()
        objective = objective + args.center_rewards_coefficient * squares / responses
    objective.backward()
    return stats.detach().sum(0)


def train_step(model, optimizer, batches: list, args: Args, stop, saver, d):
    """One optimizer step over this rank's micro-batches. Returns the step's metrics (means over
    every rank's rows), whether any rank got a stop signal, and the global gradient norm; raises
    NonFinite, before the update, when the loss or the gradient norm is NaN or infinite."""
    # With --context_parallel_size C the C processes of a group each count the group's rows (and responses): the
    # rewards' gather sums their gradients (model/context_parallel.py), so the step's gradient is still the mean's.
    rows = args.per_device_train_batch_size * d.world_size * args.gradient_accumulation_steps
    responses = None
    if args.center_rewards_coefficient:  # the step's responses over all ranks
        count = sum(int((prefs.index >= 0).sum()) for _, prefs in batches)
        responses = int(distributed.all_reduce_sum(torch.tensor(count, device=d.device)))
    sums = torch.zeros(len(STATS), device=d.device)  # stays on the device: no sync per micro-batch
    for k, batch in enumerate(batches):
        # Gradients are reduce-scattered after every micro-batch and accumulate in fp32 shards
        # (skipping it would keep a whole unsharded fp32 gradient on every rank until the last
        # one). With HSDP only the all-reduce across nodes waits for the last micro-batch.
        model.set_requires_all_reduce(k == len(batches) - 1)
        sums += forward_backward(model, batching.to_device(batch, d.device), args, rows, responses)
    metrics = dict(zip(STATS, (distributed.all_reduce_sum(sums) / rows).tolist()))
    # The global gradient norm, before clipping: torch's norm of the DTensor gradients, reduced over
    # every rank's shards (each value counted once, the replicas of HSDP included).
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    norm = norm.full_tensor().item()
    stopping = distributed.all_reduce_max(int(stop.requested), d.device) > 0  # every rank stops after this step
    if bad := [f"{k} = {v}" for k, v in {"loss": metrics["loss"], "grad_norm": norm}.items() if not math.isfinite(v)]:
        raise NonFinite(f"{', '.join(bad)}; its update was not applied")
    if 0 < args.max_grad_norm < norm:  # scale the gradients by max_grad_norm / norm (below it, a pass for nothing)
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), args.max_grad_norm, torch.tensor(norm))
    saver.wait_staged()  # a save in flight must have copied the state before this update changes it
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return metrics, stopping, norm


def main(args: Args) -> dict:
    # ------------------------------------------------------------------------------------------
    # Setup
    checks.check_paths(args)  # what the flags name, on the file system, before any fetch
    checks.check_model(args)  # the model's config loads (folder or Hub), before any other fetch
    checks.check_push_to_hub(args)  # a push that cannot happen is found now, not after the run
    d = distributed.init_distributed(args.timeout_minutes, args.context_parallel_size)
    # Every rank must agree on the run name (it names the output folder): rank 0's clock decides.
    args.run_name = distributed.broadcast_object(args.run_name or f"{args.exp_name}__{args.seed}__{int(time.time())}")
    run_dir = os.path.join(args.output_dir, args.run_name)
    if d.is_main:
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"minrm: error: --output_dir: cannot create {run_dir} ({e.strerror})") from None

    # ------------------------------------------------------------------------------------------
    # Data: mixed, checked, tokenized and length-filtered once per node, then read from the cache.
    tokenizer = load_tokenizer(args)
    train_set, eval_set = cache.load_datasets(args, tokenizer, d)
    if args.cache_dataset_only:
        print0("data: the dataset cache is built (--cache_dataset_only); exiting without training")
        dist.destroy_process_group()
        return {}
    batching.check_token_budget(train_set, args.max_tokens_per_batch, args.batching, "training")
    batching.check_token_budget(eval_set, args.max_tokens_per_batch, args.batching, "eval")
    if d.is_main and not args.no_visualize:
        print0(mixer.show_pair(train_set[0], tokenizer))

    # Derived values, computed once. Every optimizer step is a full batch of rows; the rows that
    # cannot fill the last one are left out (and counted).
    per_device, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    batch_size = per_device * d.data_size * accumulation
    total_episodes = args.total_episodes or args.num_train_epochs * len(train_set)
    num_training_steps = total_episodes // batch_size
    if num_training_steps == 0:
        raise SystemExit(
            f"minrm: error: {total_episodes} training rows are fewer than one batch of {batch_size} "
            "(per_device_train_batch_size x processes / context_parallel_size x gradient_accumulation_steps)."
        )
    derived = dict(world_size=d.world_size, micro_batch_size=per_device * d.data_size, batch_size=batch_size)
    derived |= dict(local_batch_size=per_device * accumulation, total_episodes=total_episodes, train_pairs=len(train_set))
    derived |= dict(num_training_steps=num_training_steps, unused_episodes=total_episodes % batch_size)
    evals = range(1, args.num_evals + 1) if eval_set is not None else ()
    eval_steps = {max(1, round(k * num_training_steps / args.num_evals)) for k in evals}
    print0(json.dumps({"args": dataclasses.asdict(args), "derived": derived}, indent=1))
    print0(f"train: {num_training_steps} steps of {batch_size} rows; {derived['unused_episodes']} rows unused")

    # ------------------------------------------------------------------------------------------
    # Model, kernels, sharding, optimizer
    # Every rank builds the model on the meta device (no memory) and shards it; rank 0 alone reads
    # the weights, one full fp32 copy in host memory (the others wait outside any collective: a Hub
    # download has no time bound), and broadcasts them into everyone's shards.
    model = reward.skeleton(args, tokenizer, cuda=d.device.type == "cuda", context=d.context)
    architecture = type(model).__name__  # before FSDP2 renames the class
    print0(liger.apply_liger_kernel(model, args.use_liger_kernel, args.strict_kernels, d.device))
    print0(reward.shard_model(model, d, args.mixed_precision))
    full = distributed.rank0_alone(lambda: reward.read_model(args, tokenizer), "model", "rank 0 to read the model")
    reward.fill_from_rank0(model, full, d)
    del full
    optimizer = build_optimizer(model, args)

    # ------------------------------------------------------------------------------------------
    # Resume (training/checkpoint.py). The step number is the data position and the LR schedule state.
    meta = dict(architecture=architecture, config_hash=checkpoint.config_hash(model.config), derived=derived)
    meta["args"] = dataclasses.asdict(args)
    resume_path = checkpoint.resolve_resume(args, run_dir, d)
    trainer = checkpoint.load_checkpoint(resume_path, model, optimizer, meta) if resume_path else None
    trainer = trainer or checkpoint.TrainerState()
    if args.resume_from_checkpoint and d.is_main:
        checkpoint.truncate_logs(run_dir, trainer)  # drop what a killed run logged after its last checkpoint
    checkpoint_every = checkpoint.checkpoint_interval(args.checkpointing_steps, len(train_set), batch_size)
    # The clock of metrics.jsonl's `time/elapsed_s`: training seconds, continuing a checkpoint's.
    started = time.monotonic() - trainer.elapsed_s
    tracker = Tracker(run_dir, args, derived, started) if d.is_main else None
    saver = checkpoint.CheckpointWriter(run_dir, args.keep_last_n_checkpoints, d)
    stop = failsafe.StopSignal()  # from here SIGTERM/SIGINT stop the run after a step, with a checkpoint

    # ------------------------------------------------------------------------------------------
    # Loop
    model.train()
    episode = trainer.episode
    steps = range(trainer.step, num_training_steps)
    bar = tqdm(steps, initial=trainer.step, total=num_training_steps, disable=not d.is_main, desc="train")
    metrics = trainer.metrics
    forwards = 0  # micro-batches run on this rank
    for step in bar:
        lr = args.learning_rate * lr_multiplier(
            args.lr_scheduler_type, step, args.warm_up_steps, num_training_steps, args.learning_rate
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        # This rank's rows of the step, cut into micro-batches and laid out for the model.
        mine = batching.step_indices(step, d.data_rank, d.data_size, per_device, accumulation, len(train_set), args.seed)
        rows = batching.rows_at(train_set, mine)
        budget = args.max_tokens_per_batch
        chunks = batching.micro_batches(rows, args.batching, max_rows=None if budget else per_device, max_tokens=budget)
        if budget and d.world_size > 1:  # every rank runs as many forwards
            chunks = batching.split_to(chunks, distributed.all_reduce_max(len(chunks), d.device))
        batches = [batching.collate([rows[i] for i in c], tokenizer.pad_token_id, args.batching) for c in chunks]
        forwards += len(batches)
        try:
            step_metrics, stop_votes, norm = train_step(model, optimizer, batches, args, stop, saver, d)
        except NonFinite as e:
            failsafe.exit_nonfinite(str(e), step + 1, lr, saver, run_dir, d)
        episode += batch_size
        metrics = {"episode": episode, "epoch": episode / len(train_set)}
        metrics.update({f"train/rm/{name}": step_metrics[name] for name in STATS[:5]})  # the reference's five
        metrics["train/rm/lr"] = lr  # the rate this step used (the reference logs the next step's)
        if d.is_main:
            tracker.log(metrics)
            bar.write(f"step {step + 1}/{num_training_steps} {summary_line(metrics)} grad_norm={norm:.4g}")

        if step + 1 in eval_steps:
            eval_metrics, samples = evaluate(model, eval_set, tokenizer, d, args)
            eval_metrics = {"episode": episode, "epoch": episode / len(train_set), **eval_metrics}
            metrics.update(eval_metrics)
            if d.is_main:
                tracker.log_eval(f"{step + 1}/{num_training_steps}", eval_metrics, samples, bar.write)

        # Save a checkpoint every `checkpoint_every` steps and on a stop signal: all ranks write their
        # shards, in the background (training/checkpoint.py), and never non-finite weights.
        if stop_votes or (checkpoint_every and (step + 1) % checkpoint_every == 0):
            if bad := failsafe.nonfinite_weights(model):
                failsafe.exit_nonfinite(bad, step + 1, lr, saver, run_dir, d)
            state = checkpoint.TrainerState(step + 1, episode, metrics, time.monotonic() - started)
            saver.save(state, model, optimizer, meta)
        saver.poll()
        if stop_votes:
            failsafe.exit_after_signal(stop, step + 1, num_training_steps, saver, args.run_name)

    print0(f"train: {forwards} micro-batches on rank 0 over {len(steps)} steps")

    # ------------------------------------------------------------------------------------------
    # Export, after the last checkpoint is complete and never with non-finite weights. All ranks
    # gather; rank 0 writes while the others wait in a barrier: bounded by the write, within
    # --timeout_minutes.
    saver.wait()
    if bad := failsafe.nonfinite_weights(model):
        failsafe.exit_nonfinite(bad, num_training_steps, metrics["train/rm/lr"], saver, run_dir, d)
    hf_folder.save_hf_folder(model, tokenizer, architecture, run_dir, d, card=hf_folder.model_card(args, metrics))
    print0(f"saved the model to {run_dir}")
    stop.restore()
    dist.destroy_process_group()
    # Work of unbounded length (plot, upload) comes after the group is gone: no rank waits on it.
    if d.is_main:
        tracker.finish()
        if not args.no_plot:
            # A finished training is never failed by its picture; matplotlib is imported here only.
            try:
                from minrm.plot import save_run_plot

                print(f"plotted the metrics to {save_run_plot(run_dir)}", flush=True)
            except Exception as e:
                print(f"plot: metrics.png not written ({type(e).__name__}: {e})", flush=True)
        if args.push_to_hub:
            repo_id, revision = hf_folder.resolve_hub_repo(args)
            print(f"pushed to {hf_folder.push_folder(run_dir, repo_id, revision)}", flush=True)
    return metrics


if __name__ == "__main__":
    main(parse_args())
