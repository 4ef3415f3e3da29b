"""The command line: flag ranges refused at parse time, flag combinations refused before any file
exists, and input errors reported as one line instead of a traceback."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train

BAD_VALUES = [
    ("--image_size", "7", "must be at least 32, got 7"),
    ("--image_size", "1", "must be at least 32, got 1"),
    ("--image_size", "big", "expected an integer, got 'big'"),
    ("--random_horiz_flip", "5", "must be a probability in [0, 1], got 5"),
    ("--prob_jitter", "-0.1", "must be a probability in [0, 1], got -0.1"),
    ("--random_grayscale", "1.5", "must be a probability in [0, 1], got 1.5"),
    ("--sigmoid_compression", "0", "must be positive, got 0"),
    ("--sigmoid_expansion", "-2", "must be positive, got -2"),
    ("--momentum", "-5", "must be >= 0, got -5"),
    ("--weight_decay", "-1", "must be >= 0, got -1"),
    ("--jitter", "-0.5", "must be >= 0, got -0.5"),
    ("--learning_rate", "0", "must be positive, got 0"),
    ("--learning_rate", "nan", "expected a finite number, got 'nan'"),
    ("--clip_grad", "-1", "must be positive, got -1"),
    ("--min_scale", "0", "must be an area fraction in (0, 1], got 0"),
    ("--max_scale", "2", "must be an area fraction in (0, 1], got 2"),
    ("--batch_size", "0", "must be at least 1, got 0"),
    ("--accum_steps", "0", "must be at least 1, got 0"),
    ("--iterations", "-3", "must be at least 1, got -3"),
    ("--warmup", "-1", "must be at least 0, got -1"),
    ("--step_after", "0", "must be at least 1, got 0"),
    ("--neg_to_pos_ratio", "0", "must be at least 1, got 0"),
    ("--log_period", "0", "must be at least 1, got 0"),
    ("--save_period", "0", "must be at least 1, got 0"),
    ("--eval_period", "0", "must be at least 1, got 0"),
    ("--few_shot", "0", "must be at least 1, got 0"),
    ("--NNK", "0", "must be at least 1, got 0"),
    ("--eval_batch_size", "0", "must be at least 1, got 0"),
    ("--num_workers", "-1", "must be at least 0, got -1"),
    ("--transf_depth", "0", "must be at least 1, got 0"),
    ("--transf_n_heads", "0", "must be at least 1, got 0"),
    ("--dist_timeout_minutes", "0", "must be positive, got 0"),
    ("--class_balancing", "maybe", "expected on/off (or true/false, yes/no, 1/0), got 'maybe'"),
    ("--knn_normalize", "2", "expected on/off (or true/false, yes/no, 1/0), got '2'"),
]


@pytest.mark.parametrize("flag,value,message", BAD_VALUES, ids=[f"{f}={v}" for f, v, _ in BAD_VALUES])
def test_out_of_range_flags_are_refused_by_the_parser(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.get_args_parser().parse_args([flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_yes_no_flags_take_every_spelling_the_authors_and_users_write():
    parser = train.get_args_parser()
    for text, expected in (("False", False), ("true", True), ("off", False), ("ON", True), ("no", False),
                           ("y", True), ("0", False), ("1", True)):
        args = parser.parse_args(["--class_balancing", text, "--knn_normalize", text, "--ae_features", text])
        assert args.class_balancing is args.knn_normalize is args.ae_features is expected, text


def test_values_at_the_edges_of_each_range_are_accepted():
    args = train.get_args_parser().parse_args([
        "--image_size", "32", "--random_horiz_flip", "1", "--prob_jitter", "0", "--momentum", "0",
        "--weight_decay", "0", "--min_scale", "1", "--max_scale", "1", "--warmup", "0", "--num_workers", "0"])
    assert (args.image_size, args.random_horiz_flip, args.momentum, args.min_scale) == (32, 1.0, 0.0, 1.0)


def test_min_scale_above_max_scale_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "outputs"
    args = train.get_args_parser().parse_args(["--min_scale", "0.9", "--max_scale", "0.5", "--device", "cpu",
                                               "--checkpoint_folder_path", str(out)])
    with pytest.raises(ValueError, match=r"^--min_scale 0.9 is larger than --max_scale 0.5$"):
        train.main(args)
    assert not out.exists()


@pytest.mark.parametrize("dataset", ["ImageNet", "Folder", "Digits"])
def test_target_is_refused_when_training_on_a_dataset_without_targets(dataset, tmp_path):
    out = tmp_path / "outputs"
    args = train.get_args_parser().parse_args(["--dataset", dataset, "--target", "Bogus", "--device", "cpu",
                                               "--checkpoint_folder_path", str(out)])
    with pytest.raises(ValueError, match=f"^--target Bogus has no meaning when training on {dataset}"):
        train.main(args)
    assert not out.exists()


def test_input_errors_end_in_one_line_on_stderr(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "no_such_checkpoint"
    argv = ["--only_eval", "--dataset", "PACS_DG", "--target", "Photo", "--device", "cpu",
            "--data_root", str(tmp_path), "--checkpoint_folder_path", str(missing)]
    # A missing checkpoint folder: exit 1, one line naming it.
    assert train.run_command_line(argv) == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: checkpoint folder not found: {missing}\n"
    # --debug_errors (or RESEND_DEBUG_ERRORS=1) shows where the error came from instead.
    with pytest.raises(ValueError, match=str(missing)):
        train.run_command_line(argv + ["--debug_errors"])
    monkeypatch.setenv("RESEND_DEBUG_ERRORS", "1")
    with pytest.raises(ValueError, match=str(missing)):
        train.run_command_line(argv)
    monkeypatch.delenv("RESEND_DEBUG_ERRORS")
    # Under torchrun every rank fails alike and only rank 0 prints.
    monkeypatch.setenv("RANK", "1")
    train._report("error: on every rank")
    monkeypatch.setenv("RANK", "0")
    train._report("error: on every rank")
    assert capsys.readouterr().err == "error: on every rank\n"


def test_bad_data_and_bad_flag_combinations_exit_with_status_2(tmp_path, capsys):
    argv = ["--only_eval", "--dataset", "PACS_DG", "--target", "Photo", "--device", "cpu",
            "--data_root", str(tmp_path / "nowhere"), "--checkpoint_folder_path", str(tmp_path),
            "--backbone_only", "--backbone_weights", "none", "--evaluator", "knn"]
    assert train.run_command_line(argv) == 2
    assert capsys.readouterr().err.startswith(f"error: data root {tmp_path / 'nowhere'} does not exist")
    assert train.run_command_line(["--min_scale", "0.9", "--max_scale", "0.5", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == "error: --min_scale 0.9 is larger than --max_scale 0.5\n"


def test_interrupt_ends_in_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "main", interrupted)
    assert train.run_command_line(["--device", "cpu"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_help_lists_every_flag_once(capsys):
    with pytest.raises(SystemExit):
        train.get_args_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in ("--image_size", "--random_horiz_flip", "--debug_errors", "--min_scale"):
        assert out.count(f"  {flag} ") == 1, flag


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        train.get_args_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    # Help lines wrap, so look at each flag's whole entry.
    entries = [entry for entry in out.split("\n  -") if entry.strip()]
    repeated = [entry.split()[0] for entry in entries if entry.count("default") > 1]
    assert repeated == []
    assert "(default: 224)" in out and "(default: cuda when available)" in out
    assert "(default: None)" not in out and "(default: False)" not in out
    entry = {e.split()[0]: " ".join(e.split()) for e in entries}
    # A zero is a default like any other; a yes/no value reads as the on/off it is typed as.
    assert entry["-margins_epoch"].endswith("(default: 0)") and entry["-save_maps"].endswith("(default: 0)")
    assert entry["-knn_normalize"].endswith("(default: on)") and entry["-ae_features"].endswith("(default: off)")


def test_a_torchvision_that_cannot_be_imported_is_named_in_one_line(tmp_path):
    root = Path(__file__).resolve().parents[1]
    # What a mismatched pair does: torchvision's import fails inside its C extension.
    (tmp_path / "torchvision").mkdir()
    (tmp_path / "torchvision" / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    done = subprocess.run([sys.executable, str(root / "train.py"), "--help"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=120)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: torchvision (")
    assert "cannot be imported with torch" in done.stderr and "torchvision::nms does not exist" in done.stderr
    assert "pip install --force-reinstall torch torchvision" in done.stderr


@pytest.mark.parametrize("argv, tf32", [([], True), (["--no_tf32"], False), (["--amp", "bf16"], False)])
def test_tf32_follows_amp_and_no_tf32(argv, tf32, monkeypatch):
    import torch
    monkeypatch.setattr(train, "init_distributed_mode", lambda args: (_ for _ in ()).throw(KeyboardInterrupt))
    args = train.get_args_parser().parse_args(["--device", "cpu", *argv])
    try:
        with pytest.raises(KeyboardInterrupt):
            train.main(args)
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
