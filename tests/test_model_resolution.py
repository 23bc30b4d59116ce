"""Model ids resolve honestly: cached weights load by tag, missing ones fail fast and say what to do."""

import hashlib
import io
import json
import logging
import time

import open_clip
import pytest
import torch

from clipgram.models import load, resolve, tiny

DEFAULT = "ViT-B-32:laion2b_s34b_b79k"
REPO = "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"


def _resolve(spec, tmp_path):
    return resolve.resolve(spec, default=DEFAULT, tiny_arch="unused", cache_dir=tmp_path)


@pytest.mark.parametrize("offline", ["1", ""])
def test_missing_weights_fail_within_seconds(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)  # "": the hub is merely unreachable here
    start = time.monotonic()
    with pytest.raises(resolve.WeightsUnavailable) as error:
        _resolve(DEFAULT, tmp_path)
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert DEFAULT in message and "local checkpoint" in message and "tiny" in message


def test_weights_in_the_hub_cache_load_by_tag(tmp_path, monkeypatch):
    """A random-weight state dict saved under the real repo name stands in for the download."""
    model = open_clip.create_model("ViT-B-32")
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / REPO / "snapshots" / revision
    snapshot.mkdir(parents=True)
    torch.save(model.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    (tmp_path / "hub" / REPO / "refs").mkdir()
    (tmp_path / "hub" / REPO / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    resolved = _resolve(DEFAULT, tmp_path)
    assert resolved.id == "ViT-B-32@laion2b_s34b_b79k"
    assert resolved.weights == str(snapshot / "open_clip_pytorch_model.bin")
    loaded, preprocess, _ = load(resolved, torch.device("cpu"))
    assert torch.equal(loaded.visual.conv1.weight, model.visual.conv1.weight)
    assert preprocess.transforms[-1].mean == open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")["mean"]


def test_auto_falls_back_to_the_offline_model(tmp_path, monkeypatch, tiny_clip_ckpt):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve.resolve("auto", default=DEFAULT, tiny_arch="clipgram-tiny-clip",
                               cache_dir=tiny_clip_ckpt.parent)
    assert resolved.arch == "clipgram-tiny-clip" and resolved.weights == str(tiny_clip_ckpt)


def test_a_checkpoint_that_does_not_fit_its_architecture_names_both(tmp_path, tiny_clip_ckpt):
    resolved = _resolve(f"ViT-B-32:{tiny_clip_ckpt}", tmp_path)
    assert resolved.id.startswith("ViT-B-32@ckpt-")
    with pytest.raises(RuntimeError, match=f"{tiny_clip_ckpt}.*does not fit architecture ViT-B-32"):
        load(resolved, torch.device("cpu"))


@pytest.mark.parametrize("spec, message", [
    ("ViT-B-32:no_such_tag", "not an open_clip pretrained pair"),
    ("NoSuchNet:/tmp/x.pt", "does not exist"),
    ("ViT-B-32", "expected NAME:TAG"),
])
def test_bad_ids_are_explained(tmp_path, spec, message):
    with pytest.raises(resolve.WeightsUnavailable, match=message):
        _resolve(spec, tmp_path)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache that the hub clients read, offline."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def _hub_snapshot(hub, repo, revision, weights=None, **text_cfg):
    """A repo in a Hugging Face cache, laid out as huggingface_hub lays it: the snapshot's files
    link to blobs named by their hash. Its config is the tiny CLIP's; weights (bytes) if given."""
    root = hub / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    model_cfg = json.loads((tiny.CONFIG_DIR / f"{tiny.TINY_CLIP}.json").read_text())
    model_cfg["text_cfg"].update(text_cfg)
    files = {"open_clip_config.json": json.dumps({"model_cfg": model_cfg}).encode()}
    if weights is not None:
        files["open_clip_pytorch_model.bin"] = weights
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(blob)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)


def _weights(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_an_hf_hub_model_loads_from_the_cache_under_an_id_naming_its_weights(tmp_path, hub):
    torch.manual_seed(0)
    state = open_clip.create_model(tiny.TINY_CLIP).state_dict()  # open_clip's model of the config
    weights = _weights(state)
    _hub_snapshot(hub, "clipgram/tiny", "1" * 40, weights)

    resolved = _resolve("hf-hub:clipgram/tiny", tmp_path)
    assert resolved.id == f"hf-hub@clipgram.tiny@{hashlib.sha256(weights).hexdigest()[:12]}"
    model, _, tokenizer = load(resolved, torch.device("cpu"))
    assert torch.equal(model.visual.conv1.weight, state["visual.conv1.weight"])  # the cached weights
    assert tokenizer(["a red circle"]).shape[1] == model.context_length

    # a new commit that leaves the weights alone (a README edit) keeps the id ...
    _hub_snapshot(hub, "clipgram/tiny", "2" * 40, weights)
    assert _resolve("hf-hub:clipgram/tiny", tmp_path).id == resolved.id
    # ... and new weights get a partition of their own
    _hub_snapshot(hub, "clipgram/tiny", "3" * 40,
                  _weights({k: v + 1 for k, v in state.items()}))
    assert _resolve("hf-hub:clipgram/tiny", tmp_path).id != resolved.id


def test_an_hf_hub_model_without_weights_fails_instead_of_loading_random_ones(tmp_path, hub):
    _hub_snapshot(hub, "clipgram/config-only", "3" * 40)
    with pytest.raises(resolve.WeightsUnavailable, match="hf-hub:clipgram/config-only.*not cached"):
        _resolve("hf-hub:clipgram/config-only", tmp_path)


def test_an_hf_hub_model_with_a_hugging_face_tokenizer_gets_it_by_its_hub_id(tmp_path, hub):
    """Such a tokenizer lives in another repo, not in the snapshot open_clip loads the model from."""
    _hub_snapshot(hub, "clipgram/siglip-like", "4" * 40, b"weights",
                  hf_tokenizer_name="timm/ViT-B-16-SigLIP")
    _hub_snapshot(hub, "clipgram/plain", "5" * 40, b"weights")
    assert _resolve("hf-hub:clipgram/siglip-like", tmp_path).tokenizer == "hf-hub:clipgram/siglip-like"
    assert _resolve("hf-hub:clipgram/plain", tmp_path).tokenizer is None  # from the snapshot


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_no_gpu_means_the_cpu_and_one_log_line(caplog):
    from clipgram import models

    models._say_cpu.cache_clear()  # as in a fresh process
    with caplog.at_level(logging.INFO, logger="clipgram.models"):
        assert models.pick_device("auto") == torch.device("cpu")
        assert models.pick_device("auto") == torch.device("cpu")  # a second model: said once
    assert [r.getMessage() for r in caplog.records] == ["no GPU found: running models on the CPU"]
