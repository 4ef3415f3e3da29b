"""utils.logger: the rank-0 TensorBoard writer and the out.txt text log."""
import logging
import struct

import pytest
import torch

from utils.logger import TensorBoardWriter, setup_text_log


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


def test_tensorboard_disabled_writes_nothing(tmp_path):
    log_dir = tmp_path / "tb"
    writer = TensorBoardWriter(str(log_dir), enabled=False)
    writer.add_scalar("loss", 1.0, 0)
    writer.add_histogram("h", torch.randn(10), 0)
    writer.add_pr_curve("pr", torch.tensor([0, 1]), torch.tensor([0.2, 0.9]), 0)
    writer.add_text("t", "hello", 0)
    writer.flush()
    writer.close()
    assert writer.log_dir is None
    assert not log_dir.exists() and list(tmp_path.iterdir()) == []


def test_tensorboard_enabled_writes_readable_events(tmp_path):
    log_dir = tmp_path / "tb"
    writer = TensorBoardWriter(str(log_dir), enabled=True)
    assert writer.log_dir == str(log_dir)
    writer.add_scalar("train/loss", torch.tensor(0.75), 3)
    writer.add_scalar("train/loss", 0.5, 4)
    writer.add_histogram("feats", torch.randn(50), 3)
    writer.add_pr_curve("pr", torch.tensor([0, 1, 1, 0]), torch.tensor([0.1, 0.8, 0.6, 0.3]), 3)
    writer.add_text("args", "lr=0.008", 0)
    writer.flush()
    writer.close()
    assert writer.log_dir is None
    events = sorted(log_dir.glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    scalars = read_scalar_events(events[0])
    assert scalars == [("train/loss", 3, 0.75), ("train/loss", 4, 0.5)]


def test_tensorboard_refuses_what_is_not_one_number(tmp_path):
    writer = TensorBoardWriter(str(tmp_path / "tb"), enabled=True)
    with pytest.raises(ValueError, match=r"^metric 'train/loss' must be a scalar, got a tensor of shape \(2,\)$"):
        writer.add_scalar("train/loss", torch.ones(2), 0)
    with pytest.raises(TypeError, match=r"^metric 'tag' must be a number or a one-element tensor, got str$"):
        writer.add_scalar("tag", "text", 0)
    with pytest.raises(TypeError, match=r"^metric 'flag' must be a number or a one-element tensor, got bool$"):
        writer.add_scalar("flag", True, 0)
    writer.close()


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
