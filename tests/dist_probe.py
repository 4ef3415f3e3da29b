"""Helpers for the multi-process tests: launching torchrun safely, and a probing train.py entry point.

Run as a script under a launcher, this module is `train.py` plus two test-only additions, both made
from the outside through torch's global optimizer hook (the product code has no debug switch):

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_probe.py \
        --probe_dir DIR [--crash_rank R --crash_at_step N] -- <train.py arguments>

* after every optimiser step, each rank appends a fingerprint of its parameters to
  `DIR/attempt<restart>_rank<rank>.jsonl` (restart = torchrun's TORCHELASTIC_RESTART_COUNT);
* with --crash_rank/--crash_at_step, that rank SIGKILLs itself right after its N-th step of the
  first attempt, which is what a hardware fault or the OOM killer does to a worker.
"""
import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_env(**extra: str) -> dict:
    """The current environment without launcher variables, one thread per process, plus `extra`."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
           and not key.startswith("TORCHELASTIC_")}
    # Two processes share two cores with other jobs: more threads would only oversubscribe them.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_command(cmd: Sequence[str], timeout: float, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run `cmd` in REPO_ROOT in its own process group; on timeout kill the whole group and fail.

    subprocess.run's own timeout kills only the launcher, which would leave its workers running.
    """
    proc = subprocess.Popen(list(cmd), cwd=REPO_ROOT, env=env if env is not None else launcher_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} did not finish within {timeout} s (hang?); output:\n{out}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def fingerprint(params: Iterable) -> str:
    """sha256 of the parameters' values in order (layout-independent, bit-exact)."""
    digest = hashlib.sha256()
    for param in params:
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_probe(probe_dir: Path, attempt: int, rank: int) -> List[str]:
    """The per-step fingerprints one rank wrote during one attempt."""
    path = Path(probe_dir) / f"attempt{attempt}_rank{rank}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["params"] for line in path.read_text().splitlines()]


def _install_probe(probe_dir: Path, crash_rank: Optional[int], crash_at_step: Optional[int]) -> None:
    """Register the global post-step hook described in the module docstring."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = int(os.environ.get("RANK", "0"))
    path = probe_dir / f"attempt{attempt}_rank{rank}.jsonl"
    steps = [0]

    def after_step(optimizer: "torch.optim.Optimizer", *_: object) -> None:
        steps[0] += 1
        params = [p for group in optimizer.param_groups for p in group["params"]]
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": steps[0], "params": fingerprint(params)}) + "\n")
        if attempt == 0 and rank == crash_rank and steps[0] == crash_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    register_optimizer_step_post_hook(after_step)


def main(argv: Sequence[str]) -> None:
    """Parse the probe options, install the hook, run train.py's main with the rest."""
    if "--" not in argv:
        raise ValueError("usage: dist_probe.py --probe_dir DIR [--crash_rank R --crash_at_step N] -- <train args>")
    split = list(argv).index("--")
    parser = argparse.ArgumentParser("dist_probe")
    parser.add_argument("--probe_dir", required=True, type=Path)
    parser.add_argument("--crash_rank", type=int, default=None)
    parser.add_argument("--crash_at_step", type=int, default=None)
    probe = parser.parse_args(argv[:split])
    probe.probe_dir.mkdir(parents=True, exist_ok=True)

    sys.path.insert(0, str(REPO_ROOT))
    import train

    _install_probe(probe.probe_dir, probe.crash_rank, probe.crash_at_step)
    train.main(train.get_args_parser().parse_args(argv[split + 1:]))


if __name__ == "__main__":
    main(sys.argv[1:])
