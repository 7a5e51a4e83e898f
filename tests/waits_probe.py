"""The two processes of test_distributed.py's test_waits_outside_collectives_outlast_the_collective_timeout
(torch.multiprocessing.spawn): a module of its own, so that each process imports torch and
minrm.distributed alone, not the test module's transformers and the suite's fixtures (seconds each)."""

import datetime
import functools
import os
import time

import torch.distributed as dist

from minrm.distributed import gather_objects, rank0_alone


def join_with_a_short_timeout(rank: int, port: int) -> None:
    """Two processes form a group, meet, and then give its collectives a 1.5 s timeout (above the
    waits' 1 s poll of the store, by which the two may reach a collective apart): a process that
    starts later than the other (a loaded machine) does not time the join out."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    dist.barrier()
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=1.5))


def waits_worker(rank: int, port: int, results) -> None:
    """One of two processes whose group times out after 1.5 s: rank 0 reads "the model" for 2 s (then
    fails to, 2 s), and later rank 1 scores its share 2 s longer than rank 0 before a gather."""
    join_with_a_short_timeout(rank, port)

    def work(fail: bool):
        time.sleep(2)
        if fail:
            raise OSError("the Hub said no")
        return "weights"

    for fail in (False, True):
        try:
            results[rank, fail] = rank0_alone(functools.partial(work, fail), f"model{fail}", "rank 0 to read the model")
        except BaseException as e:
            results[rank, fail] = f"{type(e).__name__}: {e}"
    if rank == 1:
        time.sleep(2)
    results[rank] = gather_objects({"rank": rank, "rows": [rank] * (rank + 1)}, "test", "score its rows")
    dist.destroy_process_group()
