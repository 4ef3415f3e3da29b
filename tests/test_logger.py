"""utils.logger: meters, progress lines, the rank-0 TensorBoard writer and the out.txt text log."""
import logging
import math
import struct
from types import SimpleNamespace

import pytest
import torch

import utils.logger as logger_module
from utils.logger import MetricLogger, SmoothedValue, TensorBoardWriter, setup_text_log


def own_handlers(logger):
    """The handlers setup_text_log installed (pytest may attach its own capture handlers)."""
    return [h for h in logger.handlers if getattr(h, "_resend_handler", False)]


def close_own_handlers(logger):
    """Leave the shared "resend" logger without open files for the next test."""
    for handler in own_handlers(logger):
        logger.removeHandler(handler)
        handler.close()


def read_scalar_events(path):
    """(tag, step, value) of every simple_value in a TFRecord events file, parsed with tensorboardX's protos."""
    from tensorboardX.proto import event_pb2

    data = path.read_bytes()
    scalars, pos = [], 0
    while pos < len(data):
        # TFRecord: uint64 length, uint32 length-crc, payload, uint32 payload-crc.
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        pos += 12
        event = event_pb2.Event()
        event.ParseFromString(data[pos:pos + length])
        pos += length + 4
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.append((value.tag, event.step, value.simple_value))
    return scalars


def test_smoothed_value_statistics():
    meter = SmoothedValue(window_size=3)
    for v in (1.0, 2.0, 3.0, 10.0):
        meter.update(v)
    assert meter.value == 10.0
    assert meter.median == 3.0          # window holds 2, 3, 10
    assert meter.avg == pytest.approx(5.0)
    assert meter.max == 10.0
    assert meter.global_avg == pytest.approx(4.0)  # all four values
    meter.update(0.0, n=4)
    assert meter.global_avg == pytest.approx(16.0 / 8)
    assert str(meter) == "3.0000 (2.0000)"


def test_smoothed_value_empty_and_bad_input():
    meter = SmoothedValue()
    assert math.isnan(meter.global_avg) and math.isnan(meter.median)
    with pytest.raises(ValueError, match="window_size"):
        SmoothedValue(window_size=0)
    with pytest.raises(ValueError, match="n must"):
        meter.update(1.0, n=0)


def test_smoothed_value_sync_is_identity_in_one_process():
    meter = SmoothedValue()
    meter.update(2.0, n=3)
    meter.synchronize_between_processes()
    assert (meter.count, meter.total) == (3, 6.0)


def test_metric_logger_string_and_meters():
    logger = MetricLogger(delimiter=" | ")
    logger.update(loss=torch.tensor(0.5), lr=0.008)
    logger.update(loss=1.5)
    text = str(logger)
    assert "loss: 1.0000 (1.0000)" in text and "lr: 0.0080 (0.0080)" in text and " | " in text
    assert logger.loss.global_avg == pytest.approx(1.0)
    with pytest.raises(AttributeError, match="nope"):
        logger.nope
    with pytest.raises(ValueError, match="loss"):
        logger.update(loss=torch.ones(2))
    with pytest.raises(TypeError, match="tag"):
        logger.update(tag="text")


def test_log_every_yields_everything_and_prints_progress():
    lines = []
    logger = MetricLogger(log_fn=lines.append)
    seen = []
    for item in logger.log_every(list(range(5)), print_freq=2, header="Epoch: [0]"):
        seen.append(item)
        logger.update(loss=float(item))
    assert seen == [0, 1, 2, 3, 4]
    # items 0, 2, 4 (the last) plus the total-time line
    assert len(lines) == 4
    assert lines[0].startswith("Epoch: [0] [0/5]") and "eta: " in lines[0] and "loss: 0.0000" in lines[0]
    assert lines[2].startswith("Epoch: [0] [4/5]") and "loss: 2.0000 (2.0000)" in lines[2]
    assert "s/it" in lines[2]
    assert "total time" in lines[3]


def test_log_every_uses_rank_aware_print_by_default(capsys):
    logger = MetricLogger()
    list(logger.log_every([1], print_freq=1, header="H"))
    assert "H [0/1]" in capsys.readouterr().out


def test_log_line_for_iteration_loops(monkeypatch):
    clock = iter([100.0, 110.0, 130.0])
    # Only utils.logger sees the fake clock.
    monkeypatch.setattr(logger_module, "time", SimpleNamespace(time=lambda: next(clock)))
    logger = MetricLogger()
    logger.start_timer(1000)                  # resumed at iteration 1000, t = 100 s
    logger.update(loss=0.25)
    line = logger.log_line(1010, 2000, header="train")   # 10 its in 10 s
    assert line.startswith("train [1010/2000]")
    assert "time: 1.0000 s/it" in line and "eta: 0:16:30" in line and "loss: 0.2500" in line
    line = logger.log_line(1020, 2000, header="train")   # 10 its in 20 s
    assert "time: 2.0000 s/it" in line and "eta: 0:32:40" in line


def test_log_line_without_timer_shows_no_eta():
    line = MetricLogger().log_line(10, 100)
    assert "eta: -" in line and "[ 10/100]" in line


def test_tensorboard_disabled_writes_nothing(tmp_path):
    log_dir = tmp_path / "tb"
    writer = TensorBoardWriter(str(log_dir), enabled=False)
    writer.add_scalar("loss", 1.0, 0)
    writer.add_scalars("acc", {"a": 1.0}, 0)
    writer.add_histogram("h", torch.randn(10), 0)
    writer.add_pr_curve("pr", torch.tensor([0, 1]), torch.tensor([0.2, 0.9]), 0)
    writer.add_text("t", "hello", 0)
    writer.flush()
    writer.close()
    assert writer.log_dir is None
    assert not log_dir.exists() and list(tmp_path.iterdir()) == []


def test_tensorboard_enabled_writes_readable_events(tmp_path):
    log_dir = tmp_path / "tb"
    with TensorBoardWriter(str(log_dir), enabled=True) as writer:
        writer.add_scalar("train/loss", torch.tensor(0.75), 3)
        writer.add_scalar("train/loss", 0.5, 4)
        writer.add_histogram("feats", torch.randn(50), 3)
        writer.add_pr_curve("pr", torch.tensor([0, 1, 1, 0]), torch.tensor([0.1, 0.8, 0.6, 0.3]), 3)
        writer.add_text("args", "lr=0.008", 0)
        writer.flush()
    events = sorted(log_dir.glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    scalars = read_scalar_events(events[0])
    assert scalars == [("train/loss", 3, 0.75), ("train/loss", 4, 0.5)]


def test_tensorboard_enabled_needs_a_dir():
    with pytest.raises(ValueError, match="log_dir"):
        TensorBoardWriter(None, enabled=True)


def test_setup_text_log_writes_file_without_duplicates(tmp_path, capsys):
    path = tmp_path / "run" / "out.txt"
    logger = setup_text_log(str(path), enabled=True)
    logger.info("first line")
    logger = setup_text_log(str(path), enabled=True)  # called twice: still one copy of each line
    logger.info("second line")
    for handler in own_handlers(logger):
        handler.flush()
    text = path.read_text()
    assert text.count("first line") == 1 and text.count("second line") == 1
    assert capsys.readouterr().out.count("second line") == 1
    assert len(own_handlers(logger)) == 2 and logger.name == "resend"
    assert logger.propagate is False
    close_own_handlers(logger)


def test_setup_text_log_disabled_has_no_file(tmp_path, capsys):
    path = tmp_path / "out.txt"
    logger = setup_text_log(str(path), enabled=False)
    logger.info("not on this rank")
    logger.warning("but warnings are")
    assert not path.exists()
    assert len(own_handlers(logger)) == 1
    out = capsys.readouterr().out
    assert "not on this rank" not in out and "but warnings are" in out
    close_own_handlers(logger)
    assert own_handlers(logging.getLogger("resend")) == []
