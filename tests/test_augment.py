"""Device-side augmentation: the same random parameters as the PIL pipeline, pixels within rounding of it."""
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from datasets.augment import (AugmentSettings, PairBytesDataset, apply_params, augment_batch, collate_pair_bytes,
                              decode_images, draw_params, read_image_bytes)
from datasets.image_lists import DataError
from datasets.pairs import PairDataset
from training.pair_stream import SeededItems

SETTINGS = AugmentSettings(image_size=32, min_scale=0.5, max_scale=1.0, horiz_flip=0.5, jitter=0.8, prob_jitter=0.5,
                           grayscale=0.3)


def photo(path, width=57, height=43, seed=0):
    """A smooth, colourful JPEG (so that resampling and colour jitter have something to act on)."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    pixels = np.stack([127 + 100 * np.sin(x / (5 + c) + rng.uniform(0, 6)) * np.cos(y / (7 + c)) for c in range(3)], -1)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=95)
    return path


def apply_with_pil(image, params, size):
    """The parameters applied with torchvision's PIL functions, in train_transform's order (independent of apply_params)."""
    out = TF.resized_crop(image, *params.crop, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    if params.flip:
        out = TF.hflip(out)
    for fn_id in params.jitter_order or ():
        factor = (params.brightness, params.contrast, params.saturation, params.hue)[fn_id]
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[fn_id]
        out = adjust(out, factor) if factor is not None else out
    if params.grayscale:
        out = TF.rgb_to_grayscale(out, num_output_channels=3)
    return TF.normalize(TF.to_tensor(out), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@pytest.mark.parametrize("seed", range(12))
def test_draws_the_pil_pipelines_parameters_in_its_order(tmp_path, seed):
    image = Image.open(photo(tmp_path / "a.jpg")).convert("RGB")
    torch.manual_seed(seed)
    expected = SETTINGS.pil_transform()(image)
    after_pipeline = torch.get_rng_state()
    torch.manual_seed(seed)
    params = draw_params(*image.size, SETTINGS)
    assert torch.equal(torch.get_rng_state(), after_pipeline)  # the same draws, nothing more
    assert torch.equal(apply_with_pil(image, params, 32), expected)
    # The tensor path on the decoded file: the same picture up to resampling and uint8 rounding.
    (decoded,) = decode_images([torch.frombuffer(bytearray(read_image_bytes(str(tmp_path / "a.jpg"))),
                                                 dtype=torch.uint8)], ["a.jpg"], torch.device("cpu"))
    tensor = apply_params(decoded, params, 32)
    difference = (tensor - expected).abs() * torch.tensor([0.229, 0.224, 0.225])[:, None, None]  # in [0, 1] units
    assert difference.mean() < 0.01 and difference.max() < 0.08, (difference.mean(), difference.max())


def test_the_draws_cover_every_branch():
    """Over a few seeds the settings above take every branch: flipped or not, jitter or not, grey or not."""
    draws = []
    for seed in range(40):
        torch.manual_seed(seed)
        draws.append(draw_params(57, 43, SETTINGS))
    assert {d.flip for d in draws} == {True, False} and {d.grayscale for d in draws} == {True, False}
    assert {d.jitter_order is None for d in draws} == {True, False}
    assert len({d.crop for d in draws}) > 30


def test_pair_bytes_dataset_matches_pair_dataset(tmp_path):
    samples = [(str(photo(tmp_path / f"{i}.jpg", seed=i)), i % 2) for i in range(4)]
    anchors, others, relation = np.array([0, 1, 2]), np.array([2, 3, 1]), np.array([0, 0, 1])
    pil = SeededItems(PairDataset(samples, anchors, others, relation, SETTINGS.pil_transform()), seed=3, pass_index=1)
    device = SeededItems(PairBytesDataset(PairDataset(samples, anchors, others, relation, SETTINGS.pil_transform()),
                                          SETTINGS), seed=3, pass_index=1)
    batch = collate_pair_bytes([device[i] for i in range(3)])
    images_a, images_b, anchor_class, rel = augment_batch(batch, SETTINGS, torch.device("cpu"))
    for i in range(3):
        img_a, img_b, cls, r = pil[i]
        for ours, theirs in ((images_a[i], img_a), (images_b[i], img_b)):
            difference = (ours - theirs).abs() * torch.tensor([0.229, 0.224, 0.225])[:, None, None]
            assert difference.mean() < 0.01 and difference.max() < 0.08
        assert (int(anchor_class[i]), int(rel[i])) == (cls, r)


def test_truncated_jpeg_bytes_are_refused_naming_the_file(tmp_path):
    path = photo(tmp_path / "cut.jpg")
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataError, match=f"cannot read image {path}: image file is truncated"):
        read_image_bytes(str(path))


def test_pair_stream_with_device_augment_gives_the_same_pairs(tmp_path):
    from training.pair_stream import PairStream
    samples = [(str(photo(tmp_path / f"{i}.jpg", seed=i)), i % 3) for i in range(9)]

    def first_batches(device_augment):
        stream = PairStream(samples, SETTINGS.pil_transform(), 2, True, 4, 0, seed=1, rank=0, world_size=1,
                            pin_memory=False, device_augment=device_augment)
        batches = stream.batches(start_micro_step=3)  # mid-pass: resume lands on the same pairs too
        return [next(batches) for _ in range(2)]

    for (pass_a, (a1, b1, c1, r1)), (pass_b, (a2, b2, c2, r2)) in zip(
            first_batches(None), first_batches((SETTINGS, torch.device("cpu")))):
        assert pass_a == pass_b and torch.equal(c1, c2) and torch.equal(r1, r2)
        for ours, theirs in ((a2, a1), (b2, b1)):
            difference = (ours - theirs).abs() * torch.tensor([0.229, 0.224, 0.225])[:, None, None]
            assert ours.shape == theirs.shape and difference.mean() < 0.01


def test_training_runs_with_device_augment(image_tree, tmp_path):
    import train
    root = image_tree({"train/a": 4, "train/b": 4}, root=tmp_path / "data", size=40)
    argv = ["--dataset", "Folder", "--train_dir", str(root / "train"), "--checkpoint_folder_path", str(tmp_path / "out"),
            "--image_size", "32", "--batch_size", "4", "--neg_to_pos_ratio", "1", "--transf_depth", "1",
            "--backbone_weights", "none", "--num_workers", "1", "--device", "cpu", "--warmup", "1",
            "--iterations", "2", "--log_period", "1", "--save_period", "2", "--device_augment"]
    assert train.run_command_line(argv) == 0
    log = (tmp_path / "out" / "Folder_resnet18_rel_transformer" / "out.txt").read_text()
    assert "it 2/2" in log and "nan" not in log
