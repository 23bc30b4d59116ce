import pytest

from clipgram.config import ConfigError, load_config


def test_defaults_env_and_overrides_layer_in_order(tmp_path):
    user = tmp_path / "user.toml"
    user.write_text("[embed]\nbatch_size = 32\n[download]\nconcurrency = 2\n")
    cfg = load_config(user, overrides={"download": {"concurrency": 5}},
                      environ={"CLIPGRAM_EMBED_BATCH_SIZE": "128", "CLIPGRAM_DATA_DIR": str(tmp_path)})
    assert cfg.embed.batch_size == 128          # env beats the file
    assert cfg.download.concurrency == 5        # flags beat everything
    assert cfg.data_dir == tmp_path.resolve()
    assert cfg.caption.max_length == load_config(environ={}).caption.max_length


def test_env_values_are_typed():
    cfg = load_config(environ={"CLIPGRAM_DOWNLOAD_TIMEOUT_S": "2.5", "CLIPGRAM_SCRAPE_LIMIT": "7"})
    assert cfg.download.timeout_s == 2.5 and cfg.scrape.limit == 7


@pytest.mark.parametrize("environ, message", [
    ({"CLIPGRAM_EMBED_BATCH_SIZ": "3"}, "embed.batch_siz"),
    ({"CLIPGRAM_EMBED_BATCH_SIZE": "many"}, "embed.batch_size: expected int"),
])
def test_bad_env_names_the_key(environ, message):
    with pytest.raises(ConfigError, match=message):
        load_config(environ=environ)


@pytest.mark.parametrize("text, message", [
    ("[embed]\nbatchsize = 3\n", "unknown key embed.batchsize"),
    ("[embedding]\nbatch_size = 3\n", r"unknown section \[embedding\]"),
    ("[download]\nconcurrency = \"eight\"\n", "download.concurrency: expected int"),
    ("[models]\nclip = 3\n", "models.clip: expected str"),
])
def test_bad_file_names_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})


def test_unrelated_env_is_ignored():
    assert load_config(environ={"CLIPGRAM_TEST_MODEL_CACHE": "/x"}).as_dict() == load_config(environ={}).as_dict()


@pytest.mark.parametrize("environ, expected", [
    ({"CLIPGRAM_EMBED_BATCH_SIZE": "auto"}, "auto"),
    ({"CLIPGRAM_EMBED_BATCH_SIZE": "64"}, 64),
])
def test_auto_keys_take_auto_or_their_type(environ, expected):
    assert load_config(environ=environ).embed.batch_size == expected


@pytest.mark.parametrize("value, expected", [("auto", None), ("0.25", 0.25), ("1", 1.0)])
def test_the_gpu_share_reaches_the_loader(value, expected):
    from clipgram import loader
    from clipgram.models import pick_device

    cfg = load_config(environ={"CLIPGRAM_DECODE_GPU_SHARE": value})
    assert loader.loader_settings(cfg, "embed", pick_device("cpu")).gpu_share == expected


@pytest.mark.parametrize("environ, message", [
    ({"CLIPGRAM_EMBED_BATCH_SIZE": "0"}, "embed.batch_size"),
    ({"CLIPGRAM_DECODE_GPU": "maybe"}, "decode.gpu: expected bool"),
    ({"CLIPGRAM_DECODE_GPU_SHARE": "1.5"}, "decode.gpu_share: expected \"auto\" or a value from 0 to 1"),
    ({"CLIPGRAM_DECODE_GPU_SHARE": "most"}, "decode.gpu_share: expected float"),
    ({"CLIPGRAM_MODELS_PRECISION": "fp8"}, "models.precision: expected one of"),
])
def test_auto_keys_and_choices_refuse_other_values(environ, message):
    with pytest.raises(ConfigError, match=message):
        load_config(environ=environ)


@pytest.mark.parametrize("text, environ, expected", [
    ("[decode]\ndraft_factor = 3\n", {}, 3.0),           # a TOML integer is fine
    ("", {"CLIPGRAM_DECODE_DRAFT_FACTOR": "0"}, 0.0),
    ("", {"CLIPGRAM_DECODE_DRAFT_FACTOR": "1.5"}, 1.5),
])
def test_draft_factor_is_a_float(tmp_path, text, environ, expected):
    (tmp_path / "user.toml").write_text(text)
    value = load_config(tmp_path / "user.toml", environ=environ).decode.draft_factor
    assert isinstance(value, float) and value == expected


@pytest.mark.parametrize("value", ["0.5", "-1"])
def test_draft_factor_below_one_is_refused(value):
    # decoding below the model's input size would throw detail away: only 0 (off) or >= 1
    with pytest.raises(ConfigError, match="decode.draft_factor: expected 0 .off. or at least 1"):
        load_config(environ={"CLIPGRAM_DECODE_DRAFT_FACTOR": value})
