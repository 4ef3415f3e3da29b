"""utils.distributed: argument parsing, single-process mode, and a real 2-process gloo run."""
import argparse
import contextlib
import io
import json
import os
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import utils.distributed as distributed
from utils.distributed import (add_distributed_args, all_gather_object, all_reduce_mean, broadcast_object,
                               cleanup, gather_by_index, get_rank, get_world_size, init_distributed_mode,
                               is_dist_avail_and_initialized, is_main_process)

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables; the process group and builtin print are restored afterwards."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    cleanup()


def parse(argv):
    """Build the distributed parser (LOCAL_RANK is read when the arguments are added) and parse argv."""
    parser = add_distributed_args(argparse.ArgumentParser())
    return parser.parse_args(argv)


@pytest.mark.parametrize("argv", [["--local_rank", "1"], ["--local-rank", "1"], ["--local_rank=1"]])
def test_local_rank_flag_spellings(clean_env, argv):
    assert parse(argv).local_rank == 1


def test_local_rank_from_env_only(clean_env):
    clean_env.setenv("LOCAL_RANK", "3")
    assert parse([]).local_rank == 3


def test_defaults_without_launcher(clean_env):
    args = parse([])
    assert args.local_rank == -1
    assert args.dist_backend is None
    assert args.dist_timeout_minutes == 30
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_bad_choices_rejected(clean_env):
    with pytest.raises(SystemExit):
        parse(["--dist_backend", "mpi"])
    with pytest.raises(SystemExit):
        parse(["--device", "tpu"])


def test_single_process_init(clean_env):
    args = parse(["--device", "cpu"])
    init_distributed_mode(args)
    assert args.distributed is False
    assert (args.world_size, args.local_rank) == (1, 0)
    # The rank is get_rank(); no copy of it (or of the GPU index, which is the device's) goes on args.
    assert not {"rank", "gpu"} & set(vars(args))
    assert args.device == torch.device("cpu") and isinstance(args.device, torch.device)
    assert args.dist_backend == "gloo"
    assert not is_dist_avail_and_initialized()
    assert (get_rank(), get_world_size(), is_main_process()) == (0, 1, True)


def test_world_size_one_without_rank_is_single_process(clean_env):
    clean_env.setenv("WORLD_SIZE", "1")
    args = parse(["--device", "cpu"])
    init_distributed_mode(args)
    assert args.distributed is False and args.world_size == 1


def test_world_size_without_rank_is_an_error(clean_env):
    clean_env.setenv("WORLD_SIZE", "2")
    args = parse(["--device", "cpu"])
    with pytest.raises(RuntimeError, match="RANK"):
        init_distributed_mode(args)


def test_rank_without_world_size_is_an_error(clean_env):
    clean_env.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="WORLD_SIZE"):
        init_distributed_mode(parse(["--device", "cpu"]))


def test_rank_out_of_range_is_an_error(clean_env):
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("RANK", "2")
    clean_env.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="RANK=2"):
        init_distributed_mode(parse(["--device", "cpu"]))


def test_missing_master_address_is_an_error(clean_env):
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        clean_env.setenv(name, value)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        init_distributed_mode(parse(["--device", "cpu"]))


def test_local_rank_flag_disagreeing_with_env_is_an_error(clean_env):
    args = parse(["--device", "cpu", "--local_rank", "1"])
    clean_env.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        init_distributed_mode(args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on machines without CUDA")
def test_nccl_without_cuda_is_an_error(clean_env):
    with pytest.raises(RuntimeError, match="nccl"):
        init_distributed_mode(parse(["--device", "cpu", "--dist_backend", "nccl"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on machines without CUDA")
def test_cuda_device_without_cuda_is_an_error(clean_env):
    with pytest.raises(RuntimeError, match="CUDA"):
        init_distributed_mode(parse(["--device", "cuda"]))


def test_launched_init_uses_env_method_and_timeout(clean_env):
    """The process-group call itself, recorded instead of executed (the real one is tested below)."""
    for name, value in (("WORLD_SIZE", "4"), ("RANK", "2"), ("LOCAL_RANK", "0"),
                        ("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "29999")):
        clean_env.setenv(name, value)
    calls = []
    clean_env.setattr(distributed.dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    args = parse(["--device", "cpu", "--dist_timeout_minutes", "7"])
    init_distributed_mode(args)
    assert calls == [dict(backend="gloo", init_method="env://", world_size=4, rank=2,
                          timeout=timedelta(minutes=7))]
    assert (args.distributed, args.world_size, args.local_rank) == (True, 4, 0)


def test_non_master_print_is_silenced(clean_env):
    distributed.setup_for_distributed(False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print("hidden")
        print("shown", force=True)
    assert out.getvalue() == "shown\n"
    cleanup()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print("restored")
    assert out.getvalue() == "restored\n"


def test_single_process_collectives(clean_env):
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    mean = all_reduce_mean(x)
    assert mean is not x and not mean.requires_grad
    assert torch.equal(mean, torch.tensor([1.0, 2.0]))
    assert all_reduce_mean(torch.tensor([3, 4])).dtype == torch.get_default_dtype()
    assert broadcast_object({"a": 1}) == {"a": 1}
    with pytest.raises(ValueError, match="src"):
        broadcast_object(1, src=1)
    assert all_gather_object("x") == ["x"]


def test_single_process_gather_by_index():
    values = torch.tensor([[2.0, 20.0], [0.0, 0.0], [1.0, 10.0], [0.0, 0.0]])
    indices = torch.tensor([2, 0, 1, 0])  # index 0 twice, as DistributedSampler padding does
    out = gather_by_index(values, indices, 3)
    assert torch.equal(out, torch.tensor([[0.0, 0.0], [1.0, 10.0], [2.0, 20.0]]))
    with pytest.raises(RuntimeError, match=r"\[3\]"):
        gather_by_index(torch.arange(3), torch.tensor([0, 1, 2]), 4)
    with pytest.raises(RuntimeError, match="out of range"):
        gather_by_index(torch.arange(2), torch.tensor([0, 5]), 2)
    with pytest.raises(ValueError, match="does not match"):
        gather_by_index(torch.arange(3), torch.tensor([0, 1]), 2)


# --- a real 2-process gloo group ------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _checks_on_rank(rank: int, world_size: int) -> dict:
    """Everything one rank observes; the parent process asserts on it."""
    from torch.utils.data.distributed import DistributedSampler

    args = add_distributed_args(argparse.ArgumentParser()).parse_args(
        ["--device", "cpu", "--dist_timeout_minutes", "1"])
    init_distributed_mode(args)
    seen = {"args": [args.distributed, args.world_size, args.local_rank, str(args.device),
                     args.dist_backend],
            "rank_ws": [get_rank(), get_world_size(), is_main_process()]}

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        print("plain")
        print("forced", force=True)
    seen["printed"] = stdout.getvalue()

    seen["mean_float"] = all_reduce_mean(torch.tensor([rank + 1.0, 10.0 * rank])).tolist()
    seen["mean_int"] = all_reduce_mean(torch.tensor([rank * 3])).tolist()
    seen["broadcast0"] = broadcast_object({"from": rank, "items": [rank] * 2})
    seen["broadcast1"] = broadcast_object(f"rank{rank}", src=1)
    seen["all_gather"] = all_gather_object(rank * 10)

    # DistributedSampler over 5 items on 2 ranks: 3 each, one padding duplicate.
    sampler = DistributedSampler(list(range(5)), num_replicas=world_size, rank=rank, shuffle=True, seed=3)
    shard = torch.tensor(list(sampler), dtype=torch.long)
    seen["shard"] = shard.tolist()
    feats = torch.stack([shard.float(), shard.float() * 10 + 0.5], dim=1)
    seen["gather_float2d"] = gather_by_index(feats, shard, 5).tolist()
    seen["gather_int1d"] = gather_by_index(shard * 7, shard, 5).tolist()
    seen["gather_int_dtype"] = str(gather_by_index(shard * 7, shard, 5).dtype)

    # Unequal shards: 4 vs 2 items, then 6 vs 0 items.
    idx = torch.tensor([0, 2, 4, 5]) if rank == 0 else torch.tensor([3, 1])
    seen["gather_unequal"] = gather_by_index(idx.double() / 2, idx, 6).tolist()
    idx = torch.arange(6) if rank == 0 else torch.zeros(0, dtype=torch.long)
    seen["gather_empty_shard"] = gather_by_index(idx * 2, idx, 6).tolist()

    # Index 1 is produced by no rank: every rank must raise (and none may hang).
    try:
        gather_by_index(torch.ones(1), torch.tensor([0 if rank == 0 else 2]), 3)
        seen["missing"] = "no error"
    except RuntimeError as err:
        seen["missing"] = str(err)

    distributed.barrier()
    cleanup()
    seen["after_cleanup"] = is_dist_avail_and_initialized()
    return seen


def _dist_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Child process: launcher-like environment, run the checks, write results (or the traceback)."""
    out = Path(out_dir)
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        (out / f"rank{rank}.json").write_text(json.dumps(_checks_on_rank(rank, world_size)))
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def test_two_process_gloo(tmp_path):
    world_size = 2
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_dist_worker, args=(rank, world_size, port, str(tmp_path)))
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    hung = [p.pid for p in procs if p.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    errors = {p.name: p.read_text() for p in sorted(tmp_path.glob("rank*.error"))}
    assert not errors, errors
    assert not hung, f"workers {hung} did not finish"
    assert [p.exitcode for p in procs] == [0, 0]

    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world_size)]
    shards = [r["shard"] for r in results]
    assert len(shards[0]) == len(shards[1]) == 3 and set(shards[0] + shards[1]) == set(range(5))

    for rank, seen in enumerate(results):
        assert seen["args"] == [True, 2, rank, "cpu", "gloo"]
        assert seen["rank_ws"] == [rank, 2, rank == 0]
        assert seen["printed"] == ("plain\nforced\n" if rank == 0 else "forced\n")
        assert seen["mean_float"] == [1.5, 5.0]
        assert seen["mean_int"] == [1.5]
        assert seen["broadcast0"] == {"from": 0, "items": [0, 0]}
        assert seen["broadcast1"] == "rank1"
        assert seen["all_gather"] == [0, 10]
        assert seen["gather_float2d"] == [[i, i * 10 + 0.5] for i in range(5)]
        assert seen["gather_int1d"] == [i * 7 for i in range(5)]
        assert seen["gather_int_dtype"] == "torch.int64"
        assert seen["gather_unequal"] == [i / 2 for i in range(6)]
        assert seen["gather_empty_shard"] == [i * 2 for i in range(6)]
        assert "[1]" in seen["missing"] and "1 of 3" in seen["missing"]
        assert seen["after_cleanup"] is False
