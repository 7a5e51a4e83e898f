"""Train a pairwise (Bradley-Terry) reward model: the loop, top to bottom.

    python -m minrm.train                      # the embedded toy run: offline, about a minute on a CPU
    python -m minrm.train --help               # every flag
    torchrun --nproc_per_node 8 -m minrm.train --model_name_or_path allenai/Llama-3.1-Tulu-3-8B-SFT \\
        --dataset_mixer_list allenai/llama-3.1-tulu-3-8b-preference-mixture 1.0 ...
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node 8 \\
        --rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:29500 -m minrm.train ...

Phases: setup -> data -> model -> shard -> loop (step, log, eval, save) -> export -> plot; a stop signal or
a non-finite value ends the loop early (failsafe.py). One optimizer step consumes `batch_size` =
per_device_train_batch_size x world_size x gradient_accumulation_steps pairs, in micro-batches of
per_device_train_batch_size pairs per process (or cut by a token budget, --max_tokens_per_batch).
A micro-batch's chosen and rejected sequences go through the model in one forward pass, and the
loss is -logsigmoid(r_chosen - r_rejected), averaged over the step's pairs.
"""

import dataclasses
import gc
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from minrm.batching import check_token_budget, device_batch, micro_batches, split_to
from minrm.checkpoint import (
    CheckpointWriter,
    TrainerState,
    check_resume_args,
    checkpoint_interval,
    config_hash,
    load_checkpoint,
    resolve_resume,
    truncate_logs,
)
from minrm.config import Args, parse_args
from minrm.data import load_tokenizer, pairs_at, show_pair, stream_indices
from minrm.dataset_cache import load_datasets
from minrm.distributed import (
    all_reduce_max,
    all_reduce_sum,
    broadcast_object,
    fill_from_rank0,
    init_distributed,
    print0,
    rank0_alone,
    shard_model,
)
from minrm.evaluate import evaluate
from minrm.export import model_card, push_folder, resolve_hub_repo, save_hf_folder
from minrm.failsafe import StopSignal, exit_after_signal, exit_nonfinite, nonfinite, nonfinite_weights
from minrm.inputs import check_model
from minrm.liger import apply_liger_kernel
from minrm.model import load_model, transformer_blocks
from minrm.optim import build_optimizer, clip_grad_norm_, lr_multiplier, set_lr
from minrm.packed_attention import check_packing
from minrm.tracking import Tracker, summary_line


def main(args: Args) -> dict:
    # ------------------------------------------------------------------------------------------
    # Setup
    check_resume_args(args)
    check_model(args)  # the model's config loads (folder or Hub), before any other fetch
    check_packing(args)
    d = init_distributed(args.timeout_minutes)
    # Every rank must agree on the run name (it names the output folder): rank 0's clock decides.
    args.run_name = broadcast_object(args.run_name or f"{args.exp_name}__{args.seed}__{int(time.time())}")
    run_dir = os.path.join(args.output_dir, args.run_name)
    if d.is_main:
        os.makedirs(run_dir, exist_ok=True)
    torch.manual_seed(args.seed)

    # ------------------------------------------------------------------------------------------
    # Data: mixed, checked, tokenized and length-filtered once per node, then read from the cache.
    tokenizer = load_tokenizer(args)
    train_set, eval_set = load_datasets(args, tokenizer, d)
    if args.cache_dataset_only:
        print0("data: the dataset cache is built (--cache_dataset_only); exiting without training")
        dist.destroy_process_group()
        return {}
    check_token_budget(train_set, args.max_tokens_per_batch, args.batching, "training")
    check_token_budget(eval_set, args.max_tokens_per_batch, args.batching, "eval")
    if d.is_main and not args.no_visualize:
        print0(show_pair(train_set[0], tokenizer))

    # Derived values, computed once. Every optimizer step is a full batch; the pairs that cannot
    # fill the last one are dropped (and counted).
    micro_batch_size = args.per_device_train_batch_size * d.world_size
    batch_size = micro_batch_size * args.gradient_accumulation_steps
    total_episodes = args.total_episodes or args.num_train_epochs * len(train_set)
    num_training_steps = total_episodes // batch_size
    if num_training_steps == 0:
        raise SystemExit(
            f"minrm: error: {total_episodes} training pairs are fewer than one batch of {batch_size} "
            "(per_device_train_batch_size x processes x gradient_accumulation_steps)."
        )
    derived = {
        "world_size": d.world_size,
        "micro_batch_size": micro_batch_size,
        "local_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps,
        "batch_size": batch_size,
        "total_episodes": total_episodes,
        "num_training_steps": num_training_steps,
        "unused_episodes": total_episodes - num_training_steps * batch_size,
    }
    eval_steps = set()
    if eval_set is not None and args.num_evals > 0:
        eval_steps = {max(1, round(k * num_training_steps / args.num_evals)) for k in range(1, args.num_evals + 1)}
    print0(json.dumps({"args": dataclasses.asdict(args), "derived": derived}, indent=1))
    print0(
        f"train: {num_training_steps} optimizer steps of {batch_size} pairs; {derived['unused_episodes']} pairs unused"
    )

    # ------------------------------------------------------------------------------------------
    # Model, kernels, sharding, optimizer
    # Every rank builds the model on the meta device (no memory) and shards it; rank 0 alone reads
    # the weights, one full fp32 copy in host memory (the others wait outside any collective: a Hub
    # download has no time bound), and broadcasts them into everyone's shards.
    model = load_model(args, tokenizer, meta=True)
    architecture = type(model).__name__  # before FSDP2 renames the class
    print0(apply_liger_kernel(model, args.use_liger_kernel, args.strict_kernels, d.device))
    print0(shard_model(model, transformer_blocks(model), d, args.mixed_precision))
    full = rank0_alone(lambda: load_model(args, tokenizer), "model", "rank 0 to read the model")
    fill_from_rank0(model, full, d)
    del full
    gc.collect()  # rank 0's copy refers to itself (its bound forward): free it now, not at a later collection
    optimizer = build_optimizer(model, args)

    # ------------------------------------------------------------------------------------------
    # Resume (checkpoint.py). The step number is the data position and the LR schedule state.
    derived["train_pairs"] = len(train_set)
    meta = {"architecture": architecture, "config_hash": config_hash(model.config), "derived": derived}
    meta["args"] = dataclasses.asdict(args)
    trainer = TrainerState()
    resume_path = resolve_resume(args, run_dir, d)
    if resume_path:
        trainer = load_checkpoint(resume_path, model, optimizer, meta)
    if args.resume_from_checkpoint and d.is_main:
        truncate_logs(run_dir, trainer)  # drop what a killed run logged after its last checkpoint
    checkpoint_every = checkpoint_interval(args.checkpointing_steps, len(train_set), batch_size)
    # The clock of metrics.jsonl's `time/elapsed_s`: training seconds, continuing a checkpoint's.
    started = time.monotonic() - trainer.elapsed_s
    tracker = Tracker(run_dir, args, derived, started) if d.is_main else None
    saver = CheckpointWriter(run_dir, args.keep_last_n_checkpoints, d)
    stop = StopSignal()  # from here on SIGTERM/SIGINT stop the run after a step, with a checkpoint (failsafe.py)

    # ------------------------------------------------------------------------------------------
    # Loop
    model.train()
    episode = trainer.episode
    ga = args.gradient_accumulation_steps
    steps = range(trainer.step, num_training_steps)
    bar = tqdm(
        steps, initial=trainer.step, total=num_training_steps, disable=not d.is_main, desc="train", dynamic_ncols=True
    )
    metrics = trainer.metrics
    forwards = 0  # micro-batches run on this rank
    for step in bar:
        lr = args.learning_rate * lr_multiplier(
            args.lr_scheduler_type, step, args.warm_up_steps, num_training_steps, args.learning_rate
        )
        set_lr(optimizer, lr)
        # This rank's pairs of the step: its slice of each of the GA micro-batches of the stream.
        indices = []
        for micro in range(ga):
            start = step * batch_size + micro * micro_batch_size + d.rank * args.per_device_train_batch_size
            indices += stream_indices(start, args.per_device_train_batch_size, len(train_set), args.seed)
        chunks = micro_batches(
            pairs_at(train_set, indices), args.per_device_train_batch_size, args.max_tokens_per_batch, args.batching
        )
        if args.max_tokens_per_batch and d.world_size > 1:  # every rank runs as many forwards
            chunks = split_to(chunks, all_reduce_max(len(chunks), d.device))
        sums = torch.zeros(6, device=d.device)  # per-pair values, summed, and a stop flag: stays on the device
        forwards += len(chunks)
        for k, pairs in enumerate(chunks):
            # Gradients are reduce-scattered after every micro-batch and accumulate in fp32 shards
            # (skipping it would keep a whole unsharded fp32 gradient on every rank until the last
            # one). With HSDP only the all-reduce across nodes waits for the last micro-batch.
            model.set_requires_all_reduce(k == len(chunks) - 1)
            rewards = model(
                **device_batch(pairs, tokenizer.pad_token_id, args.batching, d.device)
            )  # (2B,): chosen then rejected
            chosen, rejected = rewards.chunk(2)
            margin = chosen - rejected
            losses = -F.logsigmoid(margin)
            # The sum over this rank's B x GA pairs of the step, divided by their number: the mean,
            # however the pairs were cut. FSDP's reduce-scatter then averages over ranks.
            (losses.sum() / len(indices)).backward()
            with torch.no_grad():
                sums[:5] += torch.stack(
                    [(margin > 0).float().sum(), losses.sum(), chosen.sum(), rejected.sum(), margin.sum()]
                )
        episode += batch_size
        grad_norm = clip_grad_norm_(model, args.max_grad_norm)  # the global norm, clipped or not

        # One reduction and one host sync per step, before the update: the metrics' sums, whether a
        # rank got a stop signal (so that every rank stops after the same step), and the grad norm.
        sums[5] = stop.requested
        *totals, stop_votes, norm = torch.cat([all_reduce_sum(sums), grad_norm.reshape(1).float()]).tolist()
        if bad := nonfinite(loss=totals[1] / batch_size, grad_norm=norm):
            exit_nonfinite(f"{bad}; its update was not applied", step + 1, lr, saver, run_dir, d)
        saver.wait_staged()  # a save in flight must have copied the state before this update changes it
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # Means over the step's pairs: the reference's mean of equal micro-batches' means.
        means = [total / batch_size for total in totals]
        metrics = {"episode": episode, "epoch": episode / len(train_set)}
        for name, value in zip(["accuracy", "loss", "chosen_rewards", "rejected_rewards", "reward_margin"], means):
            metrics[f"train/rm/{name}"] = value
        metrics["train/rm/lr"] = lr  # the rate this step used (the reference logs the next step's)
        if d.is_main:
            tracker.log(metrics)
            bar.write(f"step {step + 1}/{num_training_steps} {summary_line(metrics)} grad_norm={norm:.4g}")

        if step + 1 in eval_steps:
            eval_metrics, samples = evaluate(
                model, eval_set, tokenizer, d, args.per_device_eval_batch_size, args.batching, args.max_tokens_per_batch
            )
            eval_metrics = {"episode": episode, "epoch": episode / len(train_set), **eval_metrics}
            metrics.update(eval_metrics)
            if d.is_main:
                tracker.log(eval_metrics)
                tracker.log_samples(step + 1, samples)
                bar.write(f"eval {step + 1}/{num_training_steps} {summary_line(eval_metrics)}")
                for row in samples[:3]:
                    bar.write(
                        f"  {'ok ' if row['correct'] else 'bad'} {row['chosen_reward']:+.3f} vs {row['rejected_reward']:+.3f}: {row['chosen_response'][:60]!r} / {row['rejected_response'][:60]!r}"
                    )

        # Save a checkpoint every `checkpoint_every` steps and on a stop signal: all ranks write their
        # shards, in the background (checkpoint.py), and never non-finite weights.
        if stop_votes or (checkpoint_every and (step + 1) % checkpoint_every == 0):
            if bad := nonfinite_weights(model, d.device):
                exit_nonfinite(bad, step + 1, lr, saver, run_dir, d)
            saver.save(TrainerState(step + 1, episode, metrics, time.monotonic() - started), model, optimizer, meta)
        saver.poll()
        if stop_votes:
            exit_after_signal(stop, step + 1, num_training_steps, saver, args.run_name)

    print0(f"train: {forwards} micro-batches on rank 0 over {len(steps)} steps")

    # ------------------------------------------------------------------------------------------
    # Export, after the last checkpoint is complete and never with non-finite weights. All ranks
    # gather; rank 0 writes while the others wait in a barrier: bounded by the write, within
    # --timeout_minutes.
    saver.wait()
    if bad := nonfinite_weights(model, d.device):
        exit_nonfinite(bad, num_training_steps, metrics["train/rm/lr"], saver, run_dir, d)
    save_hf_folder(model, tokenizer, architecture, run_dir, d, card=model_card(args, metrics))
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
            repo_id, revision = resolve_hub_repo(args)
            print(f"pushed to {push_folder(run_dir, repo_id, revision)}", flush=True)
    return metrics


if __name__ == "__main__":
    main(parse_args())
