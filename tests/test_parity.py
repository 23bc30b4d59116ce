"""clipgram's batched path gives what open_clip's reference loop gives, image by image."""

import math

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

from bench.throughput import _render_jpeg
from clipgram import images, loader, tables
from clipgram.models import clip, model_cache_dir, pick_device
from clipgram.stages.embed import embed

# A libjpeg-scaled decode against a full one: the shipped stand-in CLIP (which sees edges more
# than the one trained before it) moved one of the Instagram JPEGs to 0.9982.
DRAFT_FLOOR = 0.997


def _tiny_encoder(cfg, precision):
    return clip.ClipEncoder(clip.resolve.resolve("tiny", default="", tiny_arch=clip.tiny.TINY_CLIP,
                                                 cache_dir=model_cache_dir(cfg.models.cache_dir)),
                            pick_device("cpu"), precision=precision)


@pytest.fixture(scope="module")
def stored(make_config, as_downloaded, sample_paths, tmp_path_factory):
    """The sample's images in a data dir, as if downloaded, embedded by the stage."""
    cfg = make_config(tmp_path_factory.mktemp("data"), decode={"workers": 1}, embed={"batch_size": 5})
    as_downloaded(cfg, sample_paths, "parity")
    return cfg, sample_paths


@pytest.fixture(scope="module")
def instagram_jpegs(tmp_path_factory):
    """1080 px JPEGs with photo-like grain (as `make bench` renders them), and a 1.91:1 landscape."""
    directory = tmp_path_factory.mktemp("jpegs")
    paths = [_render_jpeg((directory / f"post{i}.jpg", 1080, i)) for i in range(6)]
    with Image.open(paths[0]) as square:
        square.crop((0, 257, 1080, 823)).save(directory / "landscape.jpg", quality=90)
    return [*paths, directory / "landscape.jpg"]


def _reference(encoder, path):
    """open_clip's README loop: one image, fp32, normalised afterwards."""
    with torch.no_grad():
        image = encoder.preprocess(Image.open(path)).unsqueeze(0)
        features = encoder.model.encode_image(image)
        return (features / features.norm(dim=-1, keepdim=True))[0].numpy()


def _stored_vectors(cfg, encoder):
    con = tables.connect(cfg.data_dir)
    rows = con.execute(f"SELECT sha256, embedding FROM ({tables.scan_sql(tables.EMBEDDINGS, cfg.data_dir, str(cfg.data_dir), encoder.id)})").fetchall()
    return {sha: np.asarray(vec, dtype=np.float32) for sha, vec in rows}


@pytest.mark.parametrize("precision, floor", [("fp32", 0.999), ("bf16", 0.99)])
def test_stored_embeddings_match_the_reference_loop(stored, precision, floor):
    cfg, paths = stored
    encoder = _tiny_encoder(cfg, precision)
    embed(cfg.data_dir, "parity", cfg, encoder)
    vectors = _stored_vectors(cfg, encoder)
    assert len(vectors) == len(paths)
    cosines = [float(vectors[f"{i:064x}"] @ _reference(encoder, p)) for i, p in enumerate(paths)]
    assert min(cosines) >= floor, cosines
    for table_dir in (cfg.data_dir / "tables" / "embeddings").iterdir():
        for part in table_dir.iterdir():
            part.unlink()  # next precision starts from nothing


def test_text_embeddings_match_the_reference(stored):
    cfg, _ = stored
    encoder = clip.from_config(cfg.models)
    texts = ["a red circle", "a blue square on a white background"]
    with torch.no_grad():
        ref = encoder.model.encode_text(encoder.tokenizer(texts))
        ref = (ref / ref.norm(dim=-1, keepdim=True)).numpy()
    ours = encoder.encode_text(texts)
    assert np.min(np.sum(ours * ref, axis=1)) >= 0.999


def test_gpu_preprocessing_mirrors_open_clips_transform(stored):
    """The tensor transform used after nvjpeg, checked here on CPU-decoded JPEGs."""
    cfg, paths = stored
    encoder = clip.from_config(cfg.models)
    mirror = loader.Transform.of(encoder.preprocess)
    assert mirror is not None
    decoded = [torchvision.io.decode_jpeg(torchvision.io.read_file(str(p)),
                                          mode=torchvision.io.ImageReadMode.RGB) for p in paths]
    ours = encoder.encode_images(mirror.finish(mirror.crop_decoded(decoded)))
    ref = np.stack([_reference(encoder, p) for p in paths])
    assert np.min(np.sum(ours * ref, axis=1)) >= 0.999


def test_draft_decoded_instagram_jpegs_match_the_reference_loop(make_config, as_downloaded, instagram_jpegs,
                                                                tmp_path):
    """The default config decodes 1080 px JPEGs at a smaller libjpeg scale; embeddings stay put."""
    cfg = make_config(tmp_path / "data", decode={"workers": 1}, embed={"batch_size": 4})
    encoder = _tiny_encoder(cfg, "fp32")
    side = loader.draft_side(encoder.preprocess, cfg.decode.draft_factor)
    assert side is not None  # else this compares full decodes: not the point
    assert all(images.load_rgb(p, min_side=side).width < 1080 for p in instagram_jpegs)
    as_downloaded(cfg, instagram_jpegs, "parity")
    embed(cfg.data_dir, "parity", cfg, encoder)
    vectors = _stored_vectors(cfg, encoder)
    assert len(vectors) == len(instagram_jpegs)
    cosines = [float(vectors[f"{i:064x}"] @ _reference(encoder, p)) for i, p in enumerate(instagram_jpegs)]
    assert min(cosines) >= DRAFT_FLOOR, cosines


@pytest.mark.parametrize("factor", [None, 0.0])  # None: the default config's
def test_the_embed_stage_decodes_jpegs_at_the_draft_scale(make_config, as_downloaded, instagram_jpegs, tmp_path,
                                                          monkeypatch, factor):
    decode = {"workers": 0} | ({} if factor is None else {"draft_factor": factor})
    cfg = make_config(tmp_path / "data", decode=decode)  # in-process: the spy sees every decode
    encoder = clip.from_config(cfg.models)
    as_downloaded(cfg, instagram_jpegs[:2], "parity")
    sizes, load_rgb = [], images.load_rgb

    def spy(*args, **kwargs):
        img = load_rgb(*args, **kwargs)
        sizes.append(img.size)
        return img

    monkeypatch.setattr(images, "load_rgb", spy)
    assert embed(cfg.data_dir, "parity", cfg, encoder).done == 2
    side = loader.draft_side(encoder.preprocess, cfg.decode.draft_factor)
    expected = [load_rgb(p, min_side=side).size for p in instagram_jpegs[:2]]
    assert sizes == expected
    assert all(w < 1080 for w, _ in sizes) == (cfg.decode.draft_factor > 0)


def test_draft_side_follows_the_models_resize(stored):
    cfg, _ = stored
    preprocess = clip.from_config(cfg.models).preprocess
    resize = preprocess.transforms[0]
    assert isinstance(resize, T.Resize)
    size = resize.size if isinstance(resize.size, int) else resize.size[0]
    assert loader.draft_side(preprocess, 2.0) == 2 * size
    assert loader.draft_side(preprocess, 1.5) == math.ceil(1.5 * size)
    assert loader.draft_side(preprocess, 0.0) is None
    assert loader.draft_side(T.Compose(preprocess.transforms[1:]), 2.0) is None  # no Resize first
    assert loader.draft_side(T.Compose([T.Resize((64, 96)), T.ToTensor()]), 2.0) == 192  # squash
    settings = loader.loader_settings(cfg, "embed", pick_device("cpu"))
    assert settings.draft_factor == cfg.decode.draft_factor


def test_jpegs_split_between_workers_and_the_device_decoder_match_the_reference(make_config, as_downloaded,
                                                                                instagram_jpegs, tmp_path):
    """decode.gpu forced on the CPU: torchvision's decoder stands in for nvjpeg, beside a worker."""
    cfg = make_config(tmp_path / "data", decode={"workers": 1, "gpu": True}, embed={"batch_size": 2})
    encoder = _tiny_encoder(cfg, "fp32")
    as_downloaded(cfg, instagram_jpegs, "parity")
    result = embed(cfg.data_dir, "parity", cfg, encoder)
    split = result.details["decode_split"]
    assert split["workers_ips"] and split["device_decode_ips"]  # both decoders took images
    vectors = _stored_vectors(cfg, encoder)
    assert len(vectors) == len(instagram_jpegs)
    cosines = [float(vectors[f"{i:064x}"] @ _reference(encoder, p)) for i, p in enumerate(instagram_jpegs)]
    assert min(cosines) >= DRAFT_FLOOR, cosines


def test_a_compiled_channels_last_encoder_stores_what_the_reference_loop_gives(make_config, as_downloaded,
                                                                              sample_paths, tmp_path):
    """torch.compile and channels-last (both off by default) change how the stage computes, not what."""
    cfg = make_config(tmp_path / "data", decode={"workers": 0}, embed={"batch_size": 8},
                      models={"compile": True, "channels_last": True})
    paths = sample_paths[:len(sample_paths) // 8 * 8]  # batches of one shape: compiled once (half a minute)
    as_downloaded(cfg, paths, "compiled")
    encoder = clip.from_config(cfg.models)
    assert encoder._encode_image is not encoder.model.encode_image
    first_conv = next(m for m in encoder.model.visual.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    embed(cfg.data_dir, "compiled", cfg)
    vectors = _stored_vectors(cfg, encoder)
    assert len(vectors) == len(paths)
    assert min(float(vectors[f"{i:064x}"] @ _reference(encoder, p)) for i, p in enumerate(paths)) >= 0.999
