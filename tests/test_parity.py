"""clipgram's batched path gives what open_clip's reference loop gives, image by image."""

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pipeline import demo, inference, tables
from pipeline.embed import embed
from pipeline.models import clip, pick_device


@pytest.fixture(scope="module")
def stored(make_config, tmp_path_factory):
    """The sample's images in a data dir, as if downloaded, embedded by the stage."""
    cfg = make_config(tmp_path_factory.mktemp("data"), decode={"workers": 1}, embed={"batch_size": 5})
    paths = sorted((demo.SAMPLE_DIR / "images").glob("*.jpg"))
    tables.write_part(cfg.data_dir, tables.MEDIA, "parity", [
        {"media_id": p.stem, "shortcode": p.stem, "position": 0, "status": "done",
         "sha256": f"{i:064x}", "path": str(p)} for i, p in enumerate(paths)])
    return cfg, paths


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
    encoder = clip.ClipEncoder(clip.resolve.resolve("tiny", default="", tiny_arch=clip.tiny.TINY_CLIP,
                                                    cache_dir=clip.model_cache_dir(cfg.models.cache_dir)),
                               pick_device("cpu"), precision=precision)
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
    mirror = inference.gpu_preprocess(encoder.preprocess)
    assert mirror is not None
    decoded = [torchvision.io.decode_jpeg(torchvision.io.read_file(str(p)),
                                          mode=torchvision.io.ImageReadMode.RGB) for p in paths]
    ours = encoder.encode_images(mirror(decoded))
    ref = np.stack([_reference(encoder, p) for p in paths])
    assert np.min(np.sum(ours * ref, axis=1)) >= 0.999
