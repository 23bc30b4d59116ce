"""`make demo`'s path: the embedded sample through the real download, the flow and the searches."""

import json
import re
import shlex
from html.parser import HTMLParser

from clipgram import demo
from clipgram.cli import main, next_steps


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_demo_ingests_searches_and_writes_a_results_page(prefect_harness, tmp_path, monkeypatch,
                                                         capsys, tiny_clip_ckpt, tiny_coca_ckpt):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")           # the real default's weights: not here
    monkeypatch.setenv("CLIPGRAM_MODELS_CACHE_DIR", str(tiny_clip_ckpt.parent))
    monkeypatch.chdir(tmp_path)  # a suggested search writes results.html here
    data = tmp_path / "demo"
    assert main(["demo", "--data-dir", str(data), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    # model auto says which model it took
    assert re.search(r"models: CLIP clipgram-tiny-clip@ckpt-\w+, captioner clipgram-tiny-coca@ckpt-\w+", out)
    assert "Text → image (CLIP)" in out and "Hybrid, CLIP + BM25" in out
    assert "Caption full-text (BM25)" in out and "top hashtags" in out
    assert re.search(r"^1\s+-?\d\.\d{4}\s+clipgram\.demo\s+CgDemo\d{4}", out, re.MULTILINE)

    # it ends with what to try next, each command working on its library as printed
    steps = out.split("Next, on this library")[1].strip().splitlines()[1:]
    assert [line.strip() for line in steps] == next_steps(data)
    for line in steps:
        assert main(shlex.split(line)[1:]) == 0, line
    assert "1 " in capsys.readouterr().out  # the searches found something

    page = data / "demo.html"
    parser = _Images()
    parser.feed(page.read_text())
    assert len(parser.sources) == 15  # three searches, five hits each
    assert all((page.parent / src).is_file() for src in parser.sources)  # thumbnails load


def test_shipped_sample_matches_its_generator(tmp_path):
    demo.build_sample(tmp_path / "sample")
    shipped = sorted(demo.SAMPLE_DIR.glob("*.json"))
    built = sorted((tmp_path / "sample").glob("*.json"))
    assert [p.name for p in shipped] == [p.name for p in built]
    for a, b in zip(shipped, built):
        assert json.loads(a.read_text())["node"] == json.loads(b.read_text())["node"]
    images = {p.name for p in (demo.SAMPLE_DIR / "images").iterdir()}
    assert images == {p.name for p in (tmp_path / "sample" / "images").iterdir()}
