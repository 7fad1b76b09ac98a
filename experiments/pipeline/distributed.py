"""The processes of one launch: which one this is, the name they share, and a check that they agree.

`torchrun`, `accelerate launch` (which runs torchrun) and run.py's SLURM export set `RANK` and `WORLD_SIZE`; without
them a run is one process (rank 0 of 1). The ranks of a run must use the same output directory and run id before
torch.distributed exists (Hydra picks the directory before any recipe code runs), so both derive from the launch's
name (`launch_name`, `${launch}` in conf/config.yaml) instead of being exchanged. Once the Trainer has started
torch.distributed, `check_ranks_agree` verifies it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import time
import uuid
from datetime import datetime, timezone

import psutil
from omegaconf import OmegaConf


def process_rank() -> int:
    """This process's global rank (`RANK`, set by torchrun/accelerate and run.py's SLURM export), 0 otherwise."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes of this launch (`WORLD_SIZE`, set by torchrun/accelerate and run.py's SLURM export), 1
    otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on the process that writes results, tables and tracker runs (global rank 0)."""
    return process_rank() == 0


@functools.cache
def launch_name() -> str:
    """`<UTC start time, %Y%m%dT%H%M%SZ>_<6 hex>`: the same in every worker of one torchrun/`accelerate launch`,
    different for every other launch, even one started in the same second (Hydra names run and sweep directories
    after it; `${launch_name:}` in conf/config.yaml).

    A torchrun worker takes its launcher's start time (the parent process, shared by the node's workers) and the
    launch's rendezvous id (`TORCHELASTIC_RUN_ID`: a fresh uuid for every single-node torchrun or accelerate launch;
    with `--rdzv-id=none`, the launcher's host and pid). Across nodes only the rendezvous id is shared, so a
    multi-node launch is named after it alone. Any other process takes its own start time and a random tag.
    """
    rendezvous = os.environ.get("TORCHELASTIC_RUN_ID")
    several_nodes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) < world_size()
    if rendezvous is None:
        started, tag = time.time(), uuid.uuid4().hex
    elif several_nodes and rendezvous != "none":
        return f"rdzv_{hashlib.sha256(rendezvous.encode()).hexdigest()[:6]}"
    else:
        launcher = psutil.Process(os.getppid())
        started = launcher.create_time()
        tag = rendezvous if rendezvous != "none" else f"{socket.gethostname()}:{launcher.pid}:{started}"
    stamp = datetime.fromtimestamp(started, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}_{hashlib.sha256(tag.encode()).hexdigest()[:6]}"


# `${launch_name:}` in conf/config.yaml. OmegaConf caches the value in the config, and Hydra copies that cache into
# every job of a sweep (as for `${now:}`), so the jobs of one multirun, even in other processes, share the name.
OmegaConf.register_new_resolver("launch_name", launch_name, use_cache=True, replace=True)


def check_ranks_agree(**values) -> None:
    """Raise on every rank, naming the values, if the processes of a started torch.distributed run disagree on any
    of `values` (e.g. the output directory and the run id); nothing to check in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    differing = sorted(key for key in values if len({repr(g[key]) for g in gathered}) > 1)
    if differing:
        seen = {key: [g[key] for g in gathered] for key in differing}
        raise RuntimeError(f"The {len(gathered)} processes of this run disagree on {differing} (by rank: {seen}). "
                           "Give the run a name (run_id=...), or launch a multi-node torchrun with a shared "
                           "--rdzv-id, so that every rank derives the same.")
