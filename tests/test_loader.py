"""The loader: uint8 crops from the workers, and the split of JPEGs between workers and the device."""

import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from clipgram import images, loader
from clipgram.models import clip, pick_device


@pytest.fixture(scope="module")
def preprocess(make_config, tmp_path_factory):
    return clip.from_config(make_config(tmp_path_factory.mktemp("data")).models).preprocess


def test_workers_hand_over_uint8_crops_that_finish_into_open_clips_tensor(preprocess, sample_paths):
    files = loader.ImageFiles(sample_paths, preprocess, 89_478_485, min_side=None)
    for i, path in enumerate(sample_paths[:4]):
        crop = files.decode(i)
        assert crop.dtype == torch.uint8  # a quarter of the bytes of float32 between processes
        assert torch.equal(files.finish(crop[None])[0], preprocess(images.load_rgb(path)))


def test_a_transform_that_cannot_be_split_runs_whole_in_the_workers(preprocess, sample_paths):
    custom = T.Compose([*preprocess.transforms[:2], T.Lambda(lambda img: img.rotate(90)),
                        *preprocess.transforms[2:]])
    assert loader.Transform.of(custom) is None
    split = loader.Split(None, workers=0)
    files = loader.ImageFiles(sample_paths, custom, 89_478_485, split)
    assert files.split is None  # the device decoder could not mirror the rotation
    out = files[0][1]
    assert out.dtype == torch.float32 and torch.equal(out, custom(images.load_rgb(sample_paths[0])))


@pytest.mark.parametrize("worker_s, workers, device_s, main_s", [
    (0.010, 4, 0.002, 0.0005), (0.010, 1, 0.001, 0.0), (0.008, 8, 0.004, 0.0003)])
def test_balance_makes_both_sides_take_equally_long(worker_s, workers, device_s, main_s):
    share = loader.balance(worker_s, workers, device_s, main_s)
    assert 0 < share < 1
    workers_side = (1 - share) * worker_s / workers
    main_side = share * device_s + main_s
    assert workers_side == pytest.approx(main_side)
    # slower workers or a faster device decoder: the device takes more
    assert loader.balance(2 * worker_s, workers, device_s, main_s) > share
    assert loader.balance(worker_s, workers, device_s / 2, main_s) > share


def test_balance_gives_the_workers_everything_when_the_model_is_the_bottleneck():
    assert loader.balance(0.010, 4, 0.001, main_s=0.003) == 0.0  # the workers alone take 0.0025 s/img


def test_a_busy_main_process_moves_the_decoding_to_the_workers(preprocess, sample_paths):
    """Real worker processes read the share the main process sets while the run goes."""
    settings = loader.LoaderSettings(batch_size=2, workers=1, gpu_decode=True)  # torchvision's decoder, CPU
    files = loader.dataset(sample_paths * 3, preprocess, settings)
    split = files.split
    assert split.share == 0.5
    batches, counts = [], [0]  # counts: images decoded on the device, as the split saw them so far
    for indices, batch, failures in loader.batches(files, settings, pick_device("cpu")):
        assert not failures and batch.shape[0] == len(indices)
        batches.append(indices)
        counts.append(split.decoded["device"])  # up to the batch before this one
        time.sleep(0.3)  # a slow model: the main process should not decode too
    counts.append(split.decoded["device"])
    on_device = [b - a for a, b in zip(counts[1:], counts[2:])]
    assert len(batches) == 3 * len(sample_paths) // 2
    assert split.share == loader.Split.BOUNDS[0]
    assert sum(on_device[:2]) > 0  # it started at half and half
    # past the batches the worker had queued, only the floor's images (2 %, to keep measuring) go there
    late = [i for indices in batches[-20:] for i in indices]
    assert sum(on_device[-20:]) == sum(split.on_device(i) for i in late) <= 1


def test_a_fixed_share_stays_put(preprocess, sample_paths):
    settings = loader.LoaderSettings(batch_size=4, workers=1, gpu_decode=True, gpu_share=1.0)
    files = loader.dataset(sample_paths, preprocess, settings)
    for _ in loader.batches(files, settings, pick_device("cpu")):
        time.sleep(0.1)
    assert files.split.share == 1.0
    assert files.split.decoded == {"worker": 0, "device": len(sample_paths)}


def test_exif_rotated_jpegs_are_decoded_by_the_workers_not_the_device(preprocess, sample_paths, tmp_path):
    """nvjpeg ignores EXIF orientation: a rotated phone photo must not go there."""
    rotated = tmp_path / "rotated.jpg"
    with Image.open(sample_paths[0]) as img:
        exif = img.getexif()
        exif[0x0112] = 6  # stored sideways: display rotated 90°
        img.save(rotated, exif=exif)
    split = loader.Split(1.0, workers=0)  # every JPEG the device may take
    files = loader.ImageFiles([sample_paths[1], rotated], preprocess, 89_478_485, split)
    assert files[0][1].dim() == 1  # plain JPEG: its bytes, for the device
    crop = files[1][1]
    assert crop.dim() == 3 and torch.equal(files.finish(crop[None])[0], preprocess(images.load_rgb(rotated)))


def test_a_jpeg_the_device_cannot_decode_fails_alone(preprocess, sample_paths, tmp_path):
    bogus = tmp_path / "bogus.jpg"
    bogus.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG" * 20)
    settings = loader.LoaderSettings(batch_size=4, workers=0, gpu_decode=True, gpu_share=1.0)
    files = loader.dataset([sample_paths[0], bogus, sample_paths[1]], preprocess, settings)
    [(indices, batch, failures)] = list(loader.batches(files, settings, pick_device("cpu")))
    assert indices == [0, 2] and batch.shape[0] == 2  # each good image once
    assert [i for i, _ in failures] == [1]


@pytest.mark.parametrize("workers, batch_size, expected", [(1, 32, 4), (14, 256, 2), (14, 1024, 2), (4, 512, 4), (6, 512, 2)])
def test_workers_decode_fewer_batches_ahead_when_batches_are_large(workers, batch_size, expected):
    settings = loader.LoaderSettings(batch_size=batch_size, workers=workers, gpu_decode=False)
    assert loader.prefetch_factor(settings) == expected
    assert workers * batch_size * expected <= max(loader.PREFETCH_IMAGES, 2 * workers * batch_size)


def test_other_models_inputs_come_from_the_same_decode_through_workers(preprocess, sample_paths):
    """With `also`, each item is every model's input made from one decode, stacked per model,
    across worker processes; the device decoder (one model's crops only) stays out."""
    from clipgram.models.ocr import Masked

    square = Masked(96)
    settings = loader.LoaderSettings(batch_size=3, workers=1, gpu_decode=True)
    files = loader.dataset(sample_paths[:5], preprocess, settings, also=[square])
    assert files.split is None
    seen = []
    for indices, (crops, squares), failures in loader.batches(files, settings, pick_device("cpu")):
        assert not failures and len(crops) == len(squares) == len(indices)
        for k, i in enumerate(indices):
            image = images.load_rgb(sample_paths[i])
            assert torch.equal(crops[k], preprocess(image)) and torch.equal(squares[k], square(image))
        seen += indices
    assert sorted(seen) == list(range(5))


def test_inputs_of_their_own_sizes_are_padded_to_their_batch_and_cropped_back():
    """OCR's inputs keep their images' sizes (within max_side): a batch pads them to its
    largest, and the reader crops each back to exactly its own pixels."""
    from clipgram.models.ocr import Masked, unmask

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(30, 50), (40, 20)]]
    masked = Masked(45)  # the 50 px wide one is scaled to 45 × 27; the other is within it
    inputs = [masked(picture) for picture in pictures]
    assert [tuple(t.shape) for t in inputs] == [(4, 27, 45), (4, 40, 20)]
    batch = loader.stack(inputs)
    assert batch.shape == (2, 4, 40, 45)
    for item, own in zip(batch, inputs):
        assert np.array_equal(unmask(item), unmask(own))
    assert np.array_equal(unmask(batch[1])[:, :, ::-1], np.asarray(pictures[1]))  # BGR for the engine
    assert loader.stack([inputs[0], inputs[0]]).shape == (2, 4, 27, 45)  # one size: no padding
