"""URL lists that other people wrote (tests/SAMPLES.md): img2dataset's 10,000-line test list
with a stray word in it, an ImageNet list with CRLF endings, a one-line JSON list, a UTF-16
list written by PowerShell, and a downloader's fixture of broken links."""

import codecs
import json
import re

import pytest
from realdata import sample_dir, sample_sets, serve_cdn

from clipgram import tables
from clipgram.config import defaults
from clipgram.sources import urls
from clipgram.stages import download

LISTS = sample_sets("urls")
pytestmark = pytest.mark.skipif(not LISTS, reason="real URL lists absent (tests/SAMPLES.md)")


def _listing(name):
    (path,) = [p for p in (sample_dir("urls") / name).iterdir()]
    return path


def _lines(path):
    """The list's entries as a reader of the file sees them: by its byte-order mark, line by line."""
    raw = path.read_bytes()
    text = raw.decode("utf-16") if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) \
        else raw.decode("utf-8-sig")
    if path.suffix == ".json":
        return json.loads(text)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize("name", LISTS)
def test_a_real_url_list_queues_each_entry_once_and_keeps_what_is_no_url_as_a_failed_row(tmp_path, name):
    path = _listing(name)
    entries = _lines(path)
    result = urls.scan(tmp_path, name, path)
    con = tables.connect(tmp_path)
    rows = con.execute("SELECT url, status, error FROM media").fetchall()
    assert len(rows) == len(set(entries)) == result.done
    for url, status, error in rows:
        assert url == url.strip() and not re.search("[\r\x00\ufeff]", url)
        if not url.startswith(("http://", "https://")):
            assert status == "failed"
        if status == "failed":
            assert re.match(rf"(line|item) \d+ of {re.escape(path.name)}: ", error)
    assert result.failed == sum(status == "failed" for _, status, _ in rows)
    assert urls.scan(tmp_path, name, path).done == 0  # a rerun queues nothing


def test_img2dataset_list_downloads_its_urls_and_fails_only_its_stray_word(tmp_path):
    """Its first 500 lines and line 3054 (a word), each host moved under a local server; the
    whole 10,000-line list is queued by the test above (downloading it all takes minutes here)."""
    lines = _listing("img2dataset").read_text(encoding="utf-8").splitlines()
    with serve_cdn(sorted((sample_dir("images") / "exif-orientation-examples").glob("*.jpg"))) as cdn:
        moved = tmp_path / "test_10000.txt"
        moved.write_text("\n".join(re.sub(r"^https?://", f"{cdn.base_url}/", line)
                                   for line in [*lines[:500], lines[3053]]) + "\n")
        scanned = urls.scan(tmp_path / "data", "i2d", moved)
        settings = defaults().replace("download", concurrency=8, timeout_s=10,
                                      allow_private_network=True).download
        fetched = download.download(tmp_path / "data", "i2d", settings)
        again = download.download(tmp_path / "data", "i2d", settings)
    con = tables.connect(tmp_path / "data")
    failed = con.execute("SELECT error FROM media WHERE status = 'failed'").fetchall()
    assert scanned.failed == len(failed) == 1 and failed[0][0].startswith("line 501 ")
    assert fetched.done == scanned.done - 1 and fetched.failed == 0
    assert (again.done, again.failed) == (0, 0)  # a rerun: nothing left to do
    assert con.execute("SELECT count(*) FROM media").fetchone() == (scanned.done,)
