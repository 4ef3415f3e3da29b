"""Process-group setup and the few collectives the project needs; identities in a single process.

One code path serves 1..N processes: the launcher (torchrun, or `torch.distributed.launch`) provides
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without it everything runs as rank 0 of 1.
"""
import argparse
import builtins
import os
from datetime import timedelta
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from utils.arg_types import positive_float

BACKENDS = ("nccl", "gloo")
DEVICES = ("cuda", "cpu")

# The builtin print before setup_for_distributed replaced it, so repeated setups do not stack wrappers.
_ORIGINAL_PRINT: Optional[Callable[..., None]] = None


def _env_int(name: str) -> Optional[int]:
    """An integer environment variable, None when unset; a non-integer value is an error."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def add_distributed_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --local_rank/--local-rank, --dist_backend, --dist_timeout_minutes and --device."""
    group = parser.add_argument_group("distributed")
    env_local_rank = _env_int("LOCAL_RANK")
    # Both spellings: torch.distributed.launch without --use_env passes --local-rank (newer torch)
    # or --local_rank (older torch); torchrun only sets the LOCAL_RANK environment variable.
    group.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int,
                       default=-1 if env_local_rank is None else env_local_rank,
                       help="GPU of this process on its node (set by the launcher; -1 = not launched)")
    group.add_argument("--dist_backend", default=None, choices=BACKENDS,
                       help="process-group backend (default: nccl on CUDA, gloo on the CPU)")
    group.add_argument("--dist_timeout_minutes", type=positive_float, default=30.0,
                       help="collectives give up after this long, so a crashed rank cannot block the others forever")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=DEVICES,
                       help="compute device (default: cuda when available)")
    return parser


def _require_attrs(args: argparse.Namespace) -> None:
    """Fail early when `args` was not built with add_distributed_args."""
    missing = [name for name in ("local_rank", "dist_backend", "dist_timeout_minutes", "device")
               if not hasattr(args, name)]
    if missing:
        raise ValueError(f"args lacks {missing}; build the parser with utils.distributed.add_distributed_args")


def _resolve_device_and_backend(args: argparse.Namespace) -> str:
    """Validate --device / --dist_backend against the machine; return the backend to use."""
    device = str(args.device)
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but CUDA is not available; use --device cpu")
    backend = args.dist_backend
    if backend is None:
        backend = "nccl" if device == "cuda" else "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"--dist_backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "nccl" and (device != "cuda" or not torch.cuda.is_available()):
        raise RuntimeError(f"--dist_backend nccl needs CUDA (device is {device!r}, "
                           f"cuda available: {torch.cuda.is_available()}); use --dist_backend gloo")
    if not args.dist_timeout_minutes > 0:
        raise ValueError(f"--dist_timeout_minutes must be > 0, got {args.dist_timeout_minutes}")
    return backend


def _launch_env(args: argparse.Namespace) -> tuple[int, int, int, bool]:
    """(rank, world_size, local_rank, launched) from the launcher's environment and --local_rank."""
    rank = _env_int("RANK")
    world_size = _env_int("WORLD_SIZE")
    env_local_rank = _env_int("LOCAL_RANK")
    arg_local_rank = args.local_rank if args.local_rank is not None and args.local_rank >= 0 else None
    if env_local_rank is not None and arg_local_rank is not None and env_local_rank != arg_local_rank:
        raise ValueError(f"--local_rank {arg_local_rank} disagrees with environment LOCAL_RANK={env_local_rank}")
    local_rank = env_local_rank if env_local_rank is not None else arg_local_rank

    if world_size is None:
        if rank is not None:
            raise RuntimeError(f"environment sets RANK={rank} but not WORLD_SIZE; launch with torchrun "
                               "or set both RANK and WORLD_SIZE")
        # Not launched: a --local_rank given by hand only selects the GPU.
        return 0, 1, 0 if local_rank is None else local_rank, False
    if world_size < 1:
        raise ValueError(f"environment WORLD_SIZE must be >= 1, got {world_size}")
    if rank is None:
        if world_size == 1:
            return 0, 1, 0 if local_rank is None else local_rank, False
        raise RuntimeError(f"environment sets WORLD_SIZE={world_size} but not RANK; launch with torchrun "
                           "(or torch.distributed.launch) so that RANK, WORLD_SIZE and LOCAL_RANK are all set")
    if not 0 <= rank < world_size:
        raise ValueError(f"environment RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    if world_size == 1:
        # A one-process launch gains nothing from a process group; run it exactly like no launcher.
        return 0, 1, 0 if local_rank is None else local_rank, False
    if local_rank is None:
        raise RuntimeError(f"RANK={rank} and WORLD_SIZE={world_size} are set but LOCAL_RANK is not "
                           "(neither in the environment nor as --local_rank); launch with torchrun")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise RuntimeError(f"RANK/WORLD_SIZE are set but {missing} are not; the launcher must provide them "
                           "(init_method env://)")
    return rank, world_size, local_rank, True


def _elastic_attempt_store(timeout: timedelta) -> Optional[dist.Store]:
    """Under torchrun, the env:// store with a key prefix per restart attempt; None otherwise."""
    attempt = _env_int("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    # torchrun keeps one store for every restart of a worker group (--max_restarts). Without a
    # prefix, a restarted group reads the dead attempt's gloo/nccl addresses from it and fails to
    # connect or hangs instead of resuming.
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    return dist.PrefixStore(f"attempt_{attempt}", store)


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Join the launcher's process group (or set up a single process); resolve args' process fields.

    Afterwards `args.device` is the torch.device of this process (`cuda:<local rank>` or `cpu`),
    `args.dist_backend` the backend, `args.local_rank` the local rank, `args.distributed` whether a
    process group exists, and `args.world_size` the number of processes, which a resume compares
    with the checkpoint's (training.state.RESUME_MAY_CHANGE). The rank is `get_rank()`.
    """
    _require_attrs(args)
    backend = _resolve_device_and_backend(args)
    rank, world_size, local_rank, launched = _launch_env(args)
    use_cuda = str(args.device) == "cuda"
    if local_rank < 0:
        raise ValueError(f"local rank must be >= 0, got {local_rank}")
    if use_cuda:
        n_gpus = torch.cuda.device_count()
        if local_rank >= n_gpus:
            raise RuntimeError(f"local rank {local_rank} has no GPU: this node has {n_gpus} visible GPU(s)")
        torch.cuda.set_device(local_rank)

    args.world_size = world_size
    args.local_rank = local_rank
    args.device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    args.dist_backend = backend
    args.distributed = launched
    if launched:
        timeout = timedelta(minutes=args.dist_timeout_minutes)
        store = _elastic_attempt_store(timeout)
        if store is None:
            dist.init_process_group(backend=backend, init_method="env://", world_size=world_size, rank=rank,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend=backend, store=store, world_size=world_size, rank=rank,
                                    timeout=timeout)
        barrier()
    setup_for_distributed(rank == 0)
    if launched:
        print(f"distributed: {world_size} processes, backend {backend}, "
              f"rank 0 on {args.device}", flush=True)


def setup_for_distributed(is_master: bool) -> None:
    """Silence print on non-master ranks; `print(..., force=True)` still prints everywhere."""
    global _ORIGINAL_PRINT
    if _ORIGINAL_PRINT is None:
        _ORIGINAL_PRINT = builtins.print
    original = _ORIGINAL_PRINT

    def rank_aware_print(*print_args: Any, **kwargs: Any) -> None:
        force = kwargs.pop("force", False)
        if is_master or force:
            original(*print_args, **kwargs)

    builtins.print = rank_aware_print


def _restore_print() -> None:
    """Undo setup_for_distributed."""
    global _ORIGINAL_PRINT
    if _ORIGINAL_PRINT is not None:
        builtins.print = _ORIGINAL_PRINT
        _ORIGINAL_PRINT = None


def is_dist_avail_and_initialized() -> bool:
    """True when a process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Rank of this process (0 in a single process)."""
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 in a single process)."""
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0."""
    return get_rank() == 0


def communication_device() -> torch.device:
    """Where tensors must live for collectives: the current GPU under nccl, else the CPU."""
    if is_dist_avail_and_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if not is_dist_avail_and_initialized():
        return
    if dist.get_backend() == "nccl":
        # Without device_ids nccl guesses the GPU from the rank, which is wrong on multi-node runs.
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """A new (detached) tensor holding the mean of `tensor` over processes; integers become float."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"all_reduce_mean expects a torch.Tensor, got {type(tensor).__name__}")
    dtype = tensor.dtype if tensor.is_floating_point() else torch.get_default_dtype()
    result = tensor.detach().to(dtype=dtype, copy=True)
    if not is_dist_avail_and_initialized():
        return result
    comm = result.to(communication_device())
    dist.all_reduce(comm, op=dist.ReduceOp.SUM)
    comm /= get_world_size()
    return comm.to(tensor.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s (picklable) `obj` on every process."""
    world_size = get_world_size()
    if not 0 <= src < world_size:
        raise ValueError(f"broadcast src must be in [0, {world_size}), got {src}")
    if not is_dist_avail_and_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj: Any) -> list:
    """Every process's (picklable) `obj`, as a list indexed by rank."""
    if not is_dist_avail_and_initialized():
        return [obj]
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _all_gather_padded(values: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    """All ranks' `values` (first dim `lengths[r]`, same trailing shape and dtype) via pad-and-gather."""
    device = communication_device()
    # Gloo has no bool all_gather; bytes round-trip exactly.
    wire = values.to(torch.uint8) if values.dtype == torch.bool else values
    wire = wire.to(device).contiguous()
    max_len = max(lengths)
    padded = torch.zeros((max_len, *wire.shape[1:]), dtype=wire.dtype, device=device)
    padded[:wire.shape[0]] = wire
    buffers = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(buffers, padded)
    return [buf[:n].to(values.dtype) for buf, n in zip(buffers, lengths)]


def gather_by_index(local_values: torch.Tensor, local_indices: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank's shard merged into dataset order 0..total-1 (DistributedSampler padding duplicates dropped)."""
    if not isinstance(local_values, torch.Tensor) or not isinstance(local_indices, torch.Tensor):
        raise TypeError("gather_by_index expects tensors for local_values and local_indices")
    if local_indices.dim() != 1 or local_indices.is_floating_point() or local_indices.dtype == torch.bool:
        raise ValueError(f"local_indices must be a 1-D integer tensor, got dtype {local_indices.dtype} "
                         f"shape {tuple(local_indices.shape)}")
    if local_values.dim() < 1 or local_values.shape[0] != local_indices.shape[0]:
        raise ValueError(f"local_values shape {tuple(local_values.shape)} does not match "
                         f"{local_indices.shape[0]} local_indices")
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"total must be a non-negative int, got {total!r}")

    indices = local_indices.detach().to("cpu", torch.int64)
    values = local_values.detach()
    if is_dist_avail_and_initialized():
        # Shapes first: every rank sees the same metadata, so a mismatch raises on all ranks alike
        # instead of leaving some of them blocked inside all_gather.
        meta = all_gather_object((values.shape[0], tuple(values.shape[1:]), str(values.dtype)))
        if len({(shape, dtype) for _, shape, dtype in meta}) != 1:
            raise RuntimeError(f"gather_by_index: ranks disagree on value shape/dtype: {meta}")
        lengths = [n for n, _, _ in meta]
        all_values = torch.cat(_all_gather_padded(values, lengths))
        all_indices = torch.cat(_all_gather_padded(indices, lengths)).cpu()
    else:
        all_values, all_indices = values, indices

    if all_indices.numel():
        low, high = int(all_indices.min()), int(all_indices.max())
        if low < 0 or high >= total:
            raise RuntimeError(f"gather_by_index: index out of range [0, {total}): min {low}, max {high}")
    unique, first = np.unique(all_indices.numpy(), return_index=True)
    if unique.size != total:
        missing = np.setdiff1d(np.arange(total), unique)
        raise RuntimeError(f"gather_by_index: {missing.size} of {total} indices were produced by no rank, "
                           f"e.g. {missing[:10].tolist()}")
    # unique == arange(total), so the first occurrence of each index gives the dataset order.
    order = torch.from_numpy(first).to(all_values.device)
    return all_values.index_select(0, order).to(local_values.device)


def cleanup() -> None:
    """Destroy the process group (if any) and restore the builtin print."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()
    _restore_print()
