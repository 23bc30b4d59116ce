"""`make demo`'s path: the embedded sample through the real download, the flow and the searches."""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from html.parser import HTMLParser

import httpx

from clipgram import demo
from clipgram.cli import APP_STEP, main, next_steps


def _serves(args: list[str], cwd) -> None:
    """Run `clipgram ARGS --port P` in a process of its own until it answers /api/status."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = subprocess.Popen([sys.executable, "-c", "import sys; from clipgram.cli import main; sys.exit(main())",
                            *args, "--port", str(port)], cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 60
        while True:
            assert app.poll() is None, "the app exited"
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/api/status", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the app did not answer"
                time.sleep(0.2)
        assert response.status_code == 200 and response.json()["stages"]
    finally:
        app.terminate()
        app.wait(10)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_demo_ingests_searches_and_writes_a_results_page(prefect_harness, tmp_path, monkeypatch, capsys,
                                                         caplog, tiny_clip_ckpt, tiny_coca_ckpt):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")           # the real default's weights: not here
    monkeypatch.setenv("CLIPGRAM_MODELS_CACHE_DIR", str(tiny_clip_ckpt.parent))
    monkeypatch.chdir(tmp_path)  # a suggested search writes results.html here
    data = tmp_path / "demo"
    assert main(["demo", "--data-dir", str(data), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    # the console has clipgram's lines only: no other library's (open_clip's "No pretrained
    # weights loaded … initialized randomly" was one, and untrue)
    loggers = re.findall(r"^\d\d:\d\d:\d\d\S* [| ]*(?:INFO|WARNING|ERROR)[| ]+([\w.]+)", err, re.MULTILINE)
    assert {name.split(".")[0] for name in loggers} <= {"clipgram"}, err
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    # model auto says which model it took
    assert re.search(r"models: CLIP clipgram-tiny-clip@ckpt-\w+, captioner clipgram-tiny-coca@ckpt-\w+, OCR PP-OCRv4@", out)
    assert "Text → image (CLIP)" in out and "Hybrid, CLIP + BM25" in out
    assert "Caption full-text (BM25)" in out and "top hashtags" in out
    # the poster whose words are only in its picture, found by them: the first hit of its section
    poster = next(name for name, lines in demo.texts().items() if "Harbour Hall, 2 pm" in lines)
    ocr_section = out.split("Text in images (OCR, BM25)")[1].split("\n==")[0]
    assert re.search(rf"^1\s+\S+\s+clipgram\.demo\s+{poster.removesuffix('.jpg')}\b", ocr_section, re.MULTILINE)
    assert re.search(r"^1\s+-?\d\.\d{4}\s+clipgram\.demo\s+CgDemo\d{4}", out, re.MULTILINE)

    # it ends with what to try next, each command working on its library as printed
    steps = out.split("Next, on this library")[1].split("\n\n")[0].strip().splitlines()[1:]
    assert [line.strip() for line in steps] == next_steps(data)
    for line in steps:
        assert main(shlex.split(line)[1:]) == 0, line
    assert "1 " in capsys.readouterr().out  # the searches found something
    # and it says how to open the app on it: started as printed, it serves the library
    app_line = out.split("in a browser:")[1].strip().splitlines()[0]
    assert app_line == next_steps(data, APP_STEP)[0]
    _serves(shlex.split(app_line)[1:], tmp_path)

    page = data / "demo.html"
    parser = _Images()
    parser.feed(page.read_text())
    assert len(parser.sources) >= 16  # three searches of five hits each, and the poster
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
    assert demo.scenes() == demo.scenes(tmp_path / "sample") and demo.texts() == demo.texts(tmp_path / "sample")
    assert set(demo.scenes()) | set(demo.texts()) == images
