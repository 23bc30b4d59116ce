"""Folders and URL lists: the same posts/media rows as a scrape, through the same stages."""

import json

import pytest
from PIL import Image

from clipgram import catalog, search, synthetic, tables
from clipgram.cli import main
from clipgram.config import defaults
from clipgram.flows.ingest import ingest_account
from clipgram.models import clip
from clipgram.sources import folder, urls

SETTINGS = defaults().replace("download", concurrency=2, timeout_s=5, retries=1,
                              allow_private_network=True).download


@pytest.fixture
def photos(tmp_path):
    """Nested folders, several formats, a corrupt file, and files that are not images."""
    root = tmp_path / "Holiday_2025"
    (root / "day1").mkdir(parents=True)
    (root / "day2" / "beach").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "day1" / "red.jpg")
    Image.new("RGBA", (20, 20), (0, 0, 255, 128)).save(root / "day1" / "blue.png")
    Image.new("RGB", (16, 16), (0, 255, 0)).save(root / "day2" / "green.webp")
    Image.new("P", (16, 16), 3).save(root / "day2" / "beach" / "sand.gif")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(root / "day2" / "dark.bmp")
    (root / "day2" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.jpg").write_bytes((root / "day1" / "red.jpg").read_bytes())
    return root


def test_folder_import_makes_posts_and_verified_media_rows(tmp_path, photos):
    data = tmp_path / "data"
    result = folder.scan(data, "holiday", photos, SETTINGS)
    assert (result.done, result.failed) == (6, 1)
    con = tables.connect(data)
    rows = dict(con.execute("SELECT p.caption, m.status FROM posts p JOIN media m USING (account, shortcode)"
                            ).fetchall())
    assert rows == {"day1/red.jpg": "done", "day1/blue.png": "done", "day2/green.webp": "done",
                    "day2/beach/sand.gif": "done", "day2/dark.bmp": "done", "day2/broken.jpg": "failed"}
    error = con.execute("SELECT error FROM media WHERE status = 'failed'").fetchone()[0]
    assert "broken" not in error and ("truncated" in error or "corrupt" in error)
    for path, width in con.execute("SELECT path, width FROM media WHERE status = 'done'").fetchall():
        assert (data / path).is_file() and width > 0
    assert con.execute("SELECT DISTINCT owner_username, typename FROM posts").fetchall() == [("holiday", "LocalFile")]


def test_folder_rerun_adds_only_new_files(tmp_path, photos):
    data = tmp_path / "data"
    folder.scan(data, "holiday", photos, SETTINGS)
    parts = sorted((data / "tables").rglob("*.parquet"))
    assert folder.scan(data, "holiday", photos, SETTINGS).done == 0
    assert sorted((data / "tables").rglob("*.parquet")) == parts
    Image.new("RGB", (8, 8), (1, 2, 3)).save(photos / "day2" / "late.jpg")
    assert folder.scan(data, "holiday", photos, SETTINGS).done == 1
    assert tables.connect(data).execute("SELECT count(*), count(DISTINCT media_id) FROM media").fetchone() == (7, 7)


@pytest.mark.parametrize("content", [
    "# my list\n{base}/a.jpg\n\n{base}/b.jpg\n{base}/a.jpg\n",
    json.dumps(["{base}/a.jpg", "{base}/b.jpg"]),
    json.dumps([{"url": "{base}/a.jpg", "caption": "first"}, {"url": "{base}/b.jpg"}]),
    json.dumps({"urls": ["{base}/a.jpg", "{base}/b.jpg"]}),
    json.dumps({"first": "{base}/a.jpg", "second": "{base}/b.jpg"}),
])
def test_url_list_shapes_queue_the_same_rows(tmp_path, content):
    path = tmp_path / "list.txt"
    path.write_text(content.replace("{base}", "https://img.example"))
    assert urls.scan(tmp_path / "data", "list", path).done == 2
    con = tables.connect(tmp_path / "data")
    assert sorted(con.execute("SELECT url, status FROM media").fetchall()) == [
        ("https://img.example/a.jpg", "pending"), ("https://img.example/b.jpg", "pending")]
    assert urls.scan(tmp_path / "data", "list", path).done == 0  # a rerun queues nothing


@pytest.mark.parametrize("content, says", [
    ('["https://a.example/x.jpg", ', "invalid JSON at line 1"),
    ('[{"link": "https://a.example/x.jpg"}]', 'object with a "url"'),
])
def test_bad_url_lists_say_what_is_wrong(tmp_path, content, says):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(urls.BadUrlList, match=says):
        urls.scan(tmp_path / "data", "bad", path)
    assert not (tmp_path / "data" / "tables").exists()


def test_folder_flows_through_embed_caption_and_search(prefect_harness, make_config, tmp_path):
    """A folder of synthetic scenes ingested by the Prefect flow; CLIP finds the scene it names."""
    import random

    rng = random.Random(3)
    scenes = rng.sample(synthetic.all_scenes(), 6)
    root = tmp_path / "scenes"
    root.mkdir()
    for i, scene in enumerate(scenes):
        synthetic.render(scene, 96, rng).save(root / f"{i}.png")
    cfg = make_config(tmp_path / "data")
    results = ingest_account("scenes", cfg.as_dict(), source=str(root))
    by_stage = {r.stage: r for r in results}
    assert by_stage["scrape"].done == by_stage["embed"].done == by_stage["embed"].details["captioned"] == 6
    con = catalog.connect(cfg.data_dir)
    encoder = clip.from_config(cfg.models)
    right = 0
    for i, scene in enumerate(scenes):
        top = search.text_search(con, cfg.data_dir, encoder, f"a {scene.color} {scene.shape}", k=1)[0]
        caption = con.execute("SELECT caption FROM posts WHERE shortcode = ?", [top.shortcode]).fetchone()[0]
        right += caption == f"{i}.png"
    assert right >= 3  # the offline model is small; chance is 1 in 6


def test_cli_ingests_a_url_list_served_locally(prefect_harness, make_config, tmp_path, sample_site, capsys):
    listing = tmp_path / "picks.txt"
    listing.write_text(f"{sample_site}/images/CgDemo0001.jpg\n{sample_site}/images/CgDemo0002.jpg\n"
                       f"{sample_site}/images/missing.jpg\n")
    data = tmp_path / "data"
    base = ["--data-dir", str(data), "--clip-model", "tiny", "--captioner", "tiny", "--device", "cpu"]
    # 127.0.0.1 is refused without the flag: the images fail, with the reason
    assert main(["ingest", str(listing), "--as", "picks", *base]) == 0
    con = tables.connect(data)
    errors = [r[0] for r in con.execute("SELECT error FROM media WHERE account = 'picks'").fetchall()]
    assert len(errors) == 3 and all("allow-private-network" in e for e in errors)
    capsys.readouterr()

    allowed = tmp_path / "allowed"
    assert main(["ingest", str(listing), "--allow-private-network", "--data-dir", str(allowed),
                 *base[2:]]) == 0
    con = tables.connect(allowed)
    status = dict(con.execute("SELECT url, status FROM media WHERE account = 'picks'").fetchall())
    assert sorted(status.values()) == ["done", "done", "failed"]
    assert catalog.connect(allowed).execute("SELECT count(*) FROM embeddings").fetchone() == (2,)


def test_inputs_that_cannot_work_fail_the_flow_at_once_without_retries(prefect_harness, make_config, tmp_path):
    import time

    bad = tmp_path / "bad.json"
    bad.write_text('[{"link": "nope"}]')
    cfg = make_config(tmp_path / "data")
    start = time.monotonic()
    with pytest.raises(urls.BadUrlList):
        ingest_account("bad", cfg.as_dict(), source=str(bad))
    assert time.monotonic() - start < 10  # the scrape task's retries wait 10 s, then 60 s


def test_cli_refuses_a_bad_since_date_and_a_stray_as(tmp_path, capsys):
    assert main(["ingest", "nasa", "--since", "last week", "--data-dir", str(tmp_path)]) == 2
    assert "scrape.since: expected a date like 2024-01-31" in capsys.readouterr().err
    assert main(["ingest", "nasa", "--as", "x", "--data-dir", str(tmp_path)]) == 2
    assert "--as names a folder or URL list" in capsys.readouterr().err


def test_a_long_url_list_with_garbage_lines_queues_the_good_ones_and_names_the_bad_once(tmp_path, caplog):
    garbage = ["not a url", "ftp://files.example/a.jpg", "javascript:alert(1)", "http://", "\x00\x01binary",
               "https://[::1/broken.jpg", "   <html><body>", "mailto:me@example.com"]
    lines, bad_lines = [], []
    for i in range(10_000):
        if i % 97 == 5:
            lines.append(garbage[i % len(garbage)])
            bad_lines.append(i + 1)
        else:
            lines.append(f"https://cdn.example/{i}.jpg")
    listing = tmp_path / "long.txt"
    listing.write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING", logger="clipgram.scrape"):
        result = urls.scan(tmp_path / "data", "long", listing)
    unique_garbage = len(set(lines[n - 1] for n in bad_lines))  # a repeated line is one entry
    assert result.failed == unique_garbage and result.done == 10_000 - len(bad_lines) + unique_garbage
    summary = [r.message for r in caplog.records if "not http(s) URLs" in r.message]
    assert len(summary) == 1 and f"line {bad_lines[0]} " in summary[0]
    con = tables.connect(tmp_path / "data")
    rows = dict(con.execute("SELECT status, count(*) FROM media GROUP BY status").fetchall())
    assert rows == {"pending": 10_000 - len(bad_lines), "failed": unique_garbage}
    errors = [e for (e,) in con.execute("SELECT error FROM media WHERE status = 'failed'").fetchall()]
    assert all(e.startswith("line ") and "long.txt" in e for e in errors)
    assert urls.scan(tmp_path / "data", "long", listing).done == 0  # a rerun queues nothing
    assert con.execute("SELECT count(*) FROM media").fetchone() == (10_000 - len(bad_lines) + unique_garbage,)
