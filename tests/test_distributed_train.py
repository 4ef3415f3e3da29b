"""Real multi-process runs on the CPU with gloo: training, restarts, resume, evaluation, launchers.

Every launch is a subprocess (or spawned process) with a timeout, so a hang fails the test instead of
blocking CI. Runs are tiny (20-px images, 32-px inputs, one relational block, 4 pairs per batch).
"""
import argparse
import csv
import importlib.util
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import train
from models.backbone import ResNetBackbone
from models.checkpoint import load_model_folder, save_model_folder
from models.relational import RelationalTransformer
from models.resend import ReSeND
from tests.dist_probe import fingerprint, free_port, launcher_env, read_probe, run_command
from tests.imagegen import make_image_tree
from training.engine import backward_micro_batch
from training.run_folder import prepare_run_folder
from training.settings import Objective, Optimisation, ProcessSettings, ResumeSettings, RunSettings
from training.state import TRAIN_STATE_FILE
from utils.distributed import cleanup
from utils.precision import grad_scaler

LAUNCH_TIMEOUT = 300  # seconds; a healthy launch takes 10-40 s on 2 shared cores
RUN_FOLDER = "Folder_resnet18_rel_transformer"
N_SCORED = 21  # odd: the 2-process evaluation shards are padded with a duplicate
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "--monitor_interval", "0.5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train/{a,b,c} (13 images: also an odd support set) and target/{a,b,d} (21 images, d unknown)."""
    root = tmp_path_factory.mktemp("dist_data")
    make_image_tree(root, {"train/a": 4, "train/b": 4, "train/c": 5}, size=20)
    make_image_tree(root, {"target/a": 7, "target/b": 7, "target/d": 7}, size=20, seed=1)
    return root


def train_argv(data_root, out, *extra):
    """train.py arguments of a tiny Folder training run."""
    return ["--dataset", "Folder", "--train_dir", str(data_root / "train"), "--checkpoint_folder_path", str(out),
            "--image_size", "32", "--batch_size", "4", "--neg_to_pos_ratio", "1", "--transf_depth", "1",
            "--backbone_weights", "none", "--num_workers", "0", "--device", "cpu", "--warmup", "1",
            "--log_period", "2", "--save_period", "2", "--eval_period", "1000", *extra]


def eval_argv(data_root, ckpt, *extra):
    """train.py --only_eval arguments on the Folder benchmark (support train/, scored target/)."""
    return ["--only_eval", "--dataset", "Folder", "--source_dir", str(data_root / "train"),
            "--target_dir", str(data_root / "target"), "--checkpoint_folder_path", str(ckpt),
            "--image_size", "32", "--eval_batch_size", "4", "--num_workers", "0", "--device", "cpu", *extra]


def run_here(argv):
    """train.py in this (non-launched) process."""
    train.main(train.get_args_parser().parse_args(argv))


def checked(result):
    """Fail with the workers' first traceback and the launcher's summary when it did not exit cleanly."""
    if result.returncode != 0:
        out = result.stdout
        first = out.find("Traceback")
        excerpt = out[first:first + 6000] if first >= 0 else ""
        raise AssertionError(f"exit code {result.returncode}; first traceback:\n{excerpt}\n...\n{out[-3000:]}")
    return result


def checkpoint_fingerprint(folder):
    """Fingerprint of a checkpoint.pth's parameters, in the optimiser's order (as dist_probe hashes them)."""
    state = torch.load(Path(folder) / TRAIN_STATE_FILE, weights_only=False)
    model = ReSeND(ResNetBackbone("resnet18"), RelationalTransformer(feat_dim=512, n_outputs=1, depth=1))
    model.backbone.load_state_dict(state["backbone"])
    model.relational.load_state_dict(state["relational"])
    return fingerprint(model.parameters()), state["iteration"]


# --- training: one torchrun job whose worker group crashes once and is restarted -----------------

@pytest.fixture(scope="module")
def restarted_run(data, tmp_path_factory):
    """torchrun --max_restarts 1, 4 iterations, checkpoints at 2 and 4; rank 1 is SIGKILLed after step 3.

    The restarted group must resume from the iteration-2 checkpoint through --auto_resume alone.
    """
    work = tmp_path_factory.mktemp("restarted")
    cmd = [*TORCHRUN, "--max_restarts", "1", "tests/dist_probe.py", "--probe_dir", str(work / "probe"),
           "--crash_rank", "1", "--crash_at_step", "3", "--",
           *train_argv(data, work / "out", "--iterations", "4", "--auto_resume")]
    result = run_command(cmd, timeout=2 * LAUNCH_TIMEOUT)
    return {"result": result, "out": work / "out", "folder": work / "out" / RUN_FOLDER, "probe": work / "probe"}


def test_two_processes_hold_identical_weights_after_every_step(restarted_run):
    checked(restarted_run["result"])
    probe = restarted_run["probe"]
    first = [read_probe(probe, 0, rank) for rank in (0, 1)]
    second = [read_probe(probe, 1, rank) for rank in (0, 1)]
    # Rank 1 died right after step 3; rank 0 was stopped somewhere after step 2.
    assert len(first[1]) == 3 and len(first[0]) >= 2, first
    common = min(len(first[0]), len(first[1]))
    assert first[0][:common] == first[1][:common]
    assert len(second[0]) == len(second[1]) == 2 and second[0] == second[1]
    assert len(set(first[1] + second[1][1:])) == 4, "every step must change the weights"
    # What rank 0 saved is exactly what every rank held after the last step.
    digest, iteration = checkpoint_fingerprint(restarted_run["folder"])
    assert iteration == 4 and digest == second[0][-1]


def test_restarted_worker_group_resumes_from_the_last_checkpoint(restarted_run):
    checked(restarted_run["result"])
    folder, probe = restarted_run["folder"], restarted_run["probe"]
    assert sorted(p.name for p in restarted_run["out"].iterdir() if p.name != ".cache") == [RUN_FOLDER]
    log = (folder / "out.txt").read_text()
    assert f"resumed from {folder} at iteration 2" in log, log
    assert "it 4/4" in log and "done in" in log
    # The resumed step 3 equals the crashed attempt's step 3: the restart continues bit for bit.
    assert read_probe(probe, 1, 0)[0] == read_probe(probe, 0, 1)[2]
    model = load_model_folder(str(folder))
    assert model.iteration == 4 and (folder / "last_checkpoint.txt").read_text().strip() == "4"


def test_one_process_resumes_a_two_process_checkpoint(restarted_run, data, tmp_path):
    checked(restarted_run["result"])
    # The single process draws other shards than the two did, so only continuation is checked.
    folder = tmp_path / RUN_FOLDER
    shutil.copytree(restarted_run["folder"], folder, symlinks=True)  # keeps checkpoints/last a link
    before, _ = checkpoint_fingerprint(folder)
    # One more iteration than the checkpoint's run: a change of --iterations needs --resume_override.
    run_here(train_argv(data, tmp_path / "unused", "--iterations", "5", "--resume", str(folder),
                        "--resume_override"))
    log = (folder / "out.txt").read_text()
    # init_distributed_mode records the number of processes; a resume may change it, and says so.
    assert (f"resumed from {folder} at iteration 4 ({os.path.realpath(folder / 'checkpoints' / 'it000004')}); "
            "--resume_override: --iterations 4 -> 5; changed: --world_size 2 -> 1\n") in log
    after, iteration = checkpoint_fingerprint(folder)
    assert iteration == 5 and after != before
    assert load_model_folder(str(folder)).iteration == 5
    assert not (tmp_path / "unused").exists() or os.listdir(tmp_path / "unused") == [".cache"]


def test_auto_resume_keeps_the_folder_of_an_attempt_that_died_before_its_first_checkpoint(tmp_path):
    args = train.get_args_parser().parse_args(
        ["--dataset", "Folder", "--checkpoint_folder_path", str(tmp_path), "--auto_resume", "--device", "cpu"])
    base = tmp_path / RUN_FOLDER
    settings = RunSettings.from_args(args), ResumeSettings.from_args(args), vars(args)
    first = prepare_run_folder(*settings)
    assert (first.path, first.created, first.resume_state) == (str(base), True, None)
    # What an attempt writes before its first checkpoint does not make the folder foreign.
    (base / "out.txt").write_text("attempt 0\n")
    (base / "tensorboard").mkdir()
    again = prepare_run_folder(*settings)
    assert (again.path, again.created, again.resume_state) == (str(base), False, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUN_FOLDER]


def test_restart_attempts_use_separate_store_keys(monkeypatch):
    """torchrun keeps one store across restarts: each attempt's process group must use its own keys."""
    import torch.distributed as dist

    from utils.distributed import add_distributed_args, init_distributed_mode
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29500"), ("TORCHELASTIC_RESTART_COUNT", "3")):
        monkeypatch.setenv(name, value)
    shared = dist.HashStore()
    monkeypatch.setattr(dist, "rendezvous", lambda url, **kwargs: iter([(shared, 1, 2)]))
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    try:
        init_distributed_mode(add_distributed_args(argparse.ArgumentParser()).parse_args(["--device", "cpu"]))
    finally:
        cleanup()
    assert len(calls) == 1 and (calls[0]["rank"], calls[0]["world_size"]) == (1, 2)
    calls[0]["store"].set("rank_0", "addr")
    assert shared.get("attempt_3/rank_0") == b"addr"


# --- gradient equivalence: 1 x 2B  ==  1 x B x accum 2  ==  2 x B  ==  2 x B/2 x accum 2 -------------

PAIRS = 8


def _grad_settings(accum_steps):
    """The objective and optimisation settings of train.py's defaults with `accum_steps`."""
    args = train.get_args_parser().parse_args(["--accum_steps", str(accum_steps), "--device", "cpu"])
    return Objective.from_args(args), Optimisation.from_args(args)


def _grads(model, inputs, pair_ranges, accum_steps, distributed):
    """Gradient of one iteration built by the training engine's own micro-step function."""
    for param in model.parameters():
        param.grad = None
    objective, optimisation = _grad_settings(accum_steps)
    images_a, images_b, relation = inputs
    for micro, (start, stop) in enumerate(pair_ranges):
        backward_micro_batch(model, images_a[start:stop], images_b[start:stop], relation[start:stop], objective,
                             optimisation, grad_scaler(torch.device("cpu"), "none"), torch.device("cpu"),
                             last=micro == accum_steps - 1)
    inner = model.module if distributed else model
    return {name: p.grad.clone() for name, p in inner.named_parameters()}


def _model_and_inputs(work):
    """The model (backbone BatchNorm in eval mode) and the 8 input pairs saved by the test."""
    model = ReSeND(ResNetBackbone("resnet18"), RelationalTransformer(feat_dim=512, n_outputs=1, depth=1))
    model.load_state_dict(torch.load(work / "model.pt"))
    model.train()
    # BatchNorm in train mode normalises per batch, so batch splits would differ for that reason alone.
    model.backbone.eval()
    return model.to(memory_format=torch.channels_last), torch.load(work / "inputs.pt")


def _grad_worker(rank, port, work):
    """Spawned rank: DDP gradients of its half of the pairs, in one batch and in two micro-batches."""
    work = Path(work)
    try:
        from torch.nn.parallel import DistributedDataParallel

        from utils.distributed import add_distributed_args, init_distributed_mode
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        torch.set_num_threads(1)
        init_distributed_mode(add_distributed_args(argparse.ArgumentParser()).parse_args(
            ["--device", "cpu", "--dist_timeout_minutes", "2"]))
        model, inputs = _model_and_inputs(work)
        ddp = DistributedDataParallel(model)
        half = PAIRS // 2
        start = rank * half
        grads = {"ddp_B": _grads(ddp, inputs, [(start, start + half)], 1, True),
                 "ddp_B/2_accum2": _grads(ddp, inputs, [(start, start + half // 2), (start + half // 2, start + half)],
                                          2, True)}
        torch.save(grads, work / f"grads_rank{rank}.pt")
        cleanup()
    except BaseException:
        (work / f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def test_gradient_is_the_same_for_any_split_of_the_pairs(tmp_path):
    torch.manual_seed(0)
    model = ReSeND(ResNetBackbone("resnet18"), RelationalTransformer(feat_dim=512, n_outputs=1, depth=1))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    images_a, images_b = (torch.randn(PAIRS, 3, 32, 32).contiguous(memory_format=torch.channels_last)
                          for _ in range(2))
    relation = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    torch.save((images_a, images_b, relation), tmp_path / "inputs.pt")

    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_grad_worker, args=(rank, port, str(tmp_path))) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    # The reference gradients are computed while the workers start up.
    model, inputs = _model_and_inputs(tmp_path)
    reference = _grads(model, inputs, [(0, PAIRS)], 1, False)
    accumulated = _grads(model, inputs, [(0, PAIRS // 2), (PAIRS // 2, PAIRS)], 2, False)
    for proc in procs:
        proc.join(timeout=LAUNCH_TIMEOUT)
    hung = [proc.pid for proc in procs if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    errors = {p.name: p.read_text() for p in tmp_path.glob("rank*.error")}
    assert not errors and not hung and [p.exitcode for p in procs] == [0, 0], (errors, hung)

    candidates = {"1 process x B x accum 2": accumulated}
    for rank in (0, 1):
        for name, grads in torch.load(tmp_path / f"grads_rank{rank}.pt").items():
            candidates[f"rank {rank} {name}"] = grads
    for key, ref in reference.items():
        # The gradients of this loss are ~1e-6 in size, so a fixed atol would accept anything:
        # each tensor is compared relative to its own largest entry (float32 summation-order noise
        # is ~1e-7 of it; a missing or doubled scaling is an error of 0.5 or 1).
        scale = ref.abs().max()
        assert scale > 0, f"{key} has no gradient"
        for label, grads in candidates.items():
            torch.testing.assert_close(grads[key] / scale, ref / scale, rtol=0, atol=1e-5,
                                       msg=lambda m, label=label, key=key: f"{label}, {key}: {m}")


# --- evaluation ------------------------------------------------------------------------------------

def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_two_process_only_eval_gives_the_single_process_results(data, tmp_path):
    torch.manual_seed(0)
    single, double = tmp_path / "ckpt1", tmp_path / "ckpt2"
    save_model_folder(str(single), ResNetBackbone("resnet18"), RelationalTransformer(512, 1, depth=1), iteration=3)
    shutil.copytree(single, double)
    # The relational scorer, and the scorers whose inputs are gathered apart from the features: block
    # norms of the jigsaw-shuffled support (featurenorm) and the scored images' feature maps (prototype_map,
    # 64 px: 2 x 2 maps).
    scorers = ("resend", "prototype_map", "featurenorm")
    extra = ("--evaluator", ",".join(scorers), "--image_size", "64")

    checked(run_command([*TORCHRUN, "train.py", *eval_argv(data, double, *extra)], timeout=LAUNCH_TIMEOUT))
    # parse_command_line records the explicit flags, which --only_eval needs.
    train.main(train.parse_command_line(eval_argv(data, single, *extra)))

    # Same settings, so the same group name in both folders (the hash does not cover the folder).
    (group,) = os.listdir(single / "eval")
    assert os.listdir(double / "eval") == [group] and group.startswith("Folder_it3_")
    for scorer in scorers:
        one = json.loads((single / "eval" / group / f"Folder_custom_{scorer}.json").read_text())
        two = json.loads((double / "eval" / group / f"Folder_custom_{scorer}.json").read_text())
        assert one["n_known"] + one["n_unknown"] == N_SCORED and one["n_unknown"] == 7
        for key in ("auroc", "fpr95", "aupr_in", "aupr_out", "closed_set_acc", "n_known", "n_unknown",
                    "n_support", "extra_metrics"):
            assert two[key] == one[key], (scorer, key)
        where = {"checkpoint": None, "loaded_from": None}
        assert {**two["settings"], **where} == {**one["settings"], **where}
        rows_one = _read_csv(single / "eval" / group / f"Folder_custom_{scorer}_scores.csv")
        rows_two = _read_csv(double / "eval" / group / f"Folder_custom_{scorer}_scores.csv")
        assert len(rows_one) == len(rows_two) == N_SCORED
        for a, b in zip(rows_one, rows_two):
            assert (a["path"], a["label"], a["known"], a["pred"]) == (b["path"], b["label"], b["known"], b["pred"])
            assert abs(float(a["normality"]) - float(b["normality"])) <= 1e-6, (scorer, a, b)
        # Not a constant: equal results mean the gathered inputs lined up.
        assert len({round(float(row["normality"]), 6) for row in rows_one}) > N_SCORED // 2, scorer
    # Rank 0 alone wrote: one TensorBoard event file, the group's figures once, no stray temp files.
    assert len(os.listdir(double / "tensorboard")) == 1
    assert sorted(os.listdir(double / "eval" / group)) == sorted(
        [f"Folder_custom_{scorer}{suffix}" for scorer in scorers for suffix in (".json", "_scores.csv")]
        + ["Folder_summary.csv", "Folder_summary.json", "manifest.json", "roc_Folder.png", "scores_Folder.png"])


# --- launchers and bad input -----------------------------------------------------------------------

def test_torch_distributed_launch_with_local_rank_flag_trains_and_evaluates(data, tmp_path):
    if importlib.util.find_spec("torch.distributed.launch") is None:
        pytest.skip(f"torch {torch.__version__} no longer ships torch.distributed.launch")
    # Without --use-env the deprecated launcher passes --local-rank=<n> to every process.
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", f"--master_port={free_port()}",
           "train.py", *train_argv(data, tmp_path / "out", "--iterations", "1", "--eval_dataset", "Folder",
                                   "--source_dir", str(data / "train"), "--target_dir", str(data / "target"))]
    checked(run_command(cmd, timeout=LAUNCH_TIMEOUT))
    folder = tmp_path / "out" / RUN_FOLDER
    assert "it 1/1" in (folder / "out.txt").read_text()
    assert load_model_folder(str(folder)).iteration == 1
    # The periodic evaluation at the last iteration ran sharded and was written once, by rank 0.
    (group,) = os.listdir(folder / "eval")
    assert group.startswith("Folder_it1_")
    record = json.loads((folder / "eval" / group / "Folder_custom_resend.json").read_text())
    assert record["n_known"] + record["n_unknown"] == N_SCORED and record["settings"]["iteration"] == 1


def test_world_size_without_rank_fails_fast_with_a_clear_error(data, tmp_path):
    out = tmp_path / "out"
    result = run_command([sys.executable, "train.py", *train_argv(data, out, "--iterations", "1")],
                         timeout=LAUNCH_TIMEOUT, env=launcher_env(WORLD_SIZE="2"))
    assert result.returncode != 0
    assert "WORLD_SIZE=2 but not RANK" in result.stdout, result.stdout[-3000:]
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--accum_steps", "--batch_size"])
def test_zero_accum_steps_or_batch_size_is_refused_before_writing(data, tmp_path, flag, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        run_here(train_argv(data, out, "--iterations", "2", flag, "0"))
    assert f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err
    assert not out.exists()


def test_sync_bn_on_the_cpu_is_refused(data, tmp_path):
    args = train.get_args_parser().parse_args(train_argv(data, tmp_path, "--sync_bn", "true"))
    args.device, args.distributed = torch.device("cpu"), True  # as init_distributed_mode leaves a launched CPU run
    with pytest.raises(ValueError, match=r"^--sync_bn true needs --device cuda \(got cpu\); use --sync_bn false on "
                                         r"the CPU$"):
        ProcessSettings.from_args(args)
    # Not given, it is on for CUDA only: a distributed CPU run goes without.
    args.sync_bn = None
    assert ProcessSettings.from_args(args) == ProcessSettings(device=torch.device("cpu"), distributed=True,
                                                              sync_bn=False)
