"""`python -m bench.ocr`: real OCR engines on the real images of shared/samples/ocr/.

Each engine is measured when it is installed: `pip install rapidocr-onnxruntime` (PP-OCRv4
detection and recognition, ONNX, in the wheel), Debian's `apt-get install tesseract-ocr`
(tesseract 5 with English), and the OCR stage's own reader (`clipgram`: rapidocr at the stage's
`max_side`, its run-together words split for search, `ocr.search_words`). The samples' SOURCES.tsv
states the text of some images (a word crop's word, a page's ground truth, sometimes only a
first line: PARTIAL) and marks the images with no text (NEGATIVE). Per engine:

- word_recall: of the stated words (case and punctuation aside), the share that come out as
  words of the engine's text (for `clipgram`, of what its search indexes): what a full-text
  search can then find; image_recall: the same
  per image, averaged (a scanned page states hundreds of words, a word crop one);
- cer: character error rate (edit distance / length) against the stated text, over the
  images whose whole text is stated, whitespace and case aside;
- false_text: of the NEGATIVE images, those the engine finds text in;
- images_per_s: over all the samples, decode included, one at a time on this CPU.

Results merge into bench/results.json under "ocr".
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from bench import save_section

Read = Callable[[Path], "str | tuple[str, str]"]  # an image → its text, or (text, what search indexes)

SAMPLES = Path(os.environ.get("CLIPGRAM_SAMPLES", Path(__file__).resolve().parents[2] / "shared" / "samples"))
PARTIAL = re.compile(r"PARTIAL|not every word|first (detected )?line|first word", re.IGNORECASE)
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def words(text: str) -> list[str]:
    return [w.casefold() for w in _WORD.findall(text)]


def edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def rapidocr() -> Callable[[Path], str] | None:
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError:
        return None
    engine = RapidOCR()

    def read(path: Path) -> str:
        found, _ = engine(str(path))
        return "\n".join(text for _, text, _ in found or [])
    return read


def tesseract() -> Callable[[Path], str] | None:
    if shutil.which("tesseract") is None:
        return None

    def read(path: Path) -> str:
        done = subprocess.run(["tesseract", str(path), "stdout", "-l", "eng"], capture_output=True, text=True)
        return done.stdout.strip()
    return read


def clipgram_reader() -> Read | None:
    try:
        from PIL import Image

        from clipgram.config import load_config
        from clipgram.models import ocr
        reader = ocr.from_config(load_config(environ={}).ocr)
    except ImportError:
        return None

    def read(path: Path) -> tuple[str, str]:
        row = reader.read_image(reader.preprocess(Image.open(path).convert("RGB")))
        return row["text"], row["words"]
    return read


ENGINES = {"rapidocr-onnxruntime": rapidocr, "tesseract": tesseract, "clipgram": clipgram_reader}


def samples() -> list[dict[str, str]]:
    with open(SAMPLES / "ocr" / "SOURCES.tsv", newline="") as f:
        return [r for r in csv.DictReader(f, delimiter="\t") if (SAMPLES / r["file"]).exists()]


def measure(read: Read, rows: list[dict[str, str]]) -> dict[str, Any]:
    stated = found = errors = characters = negatives = false_text = 0
    per_image: list[float] = []
    started = time.perf_counter()
    outputs = {}
    for row in rows:
        try:
            got = read(SAMPLES / row["file"])
            outputs[row["file"]] = got if isinstance(got, tuple) else (got, got)
        except Exception as e:  # noqa: BLE001 — an engine's failure on one image is that image's
            outputs[row["file"]] = ("", "")
            print(f"{row['file']}: {type(e).__name__}: {e}")
    seconds = time.perf_counter() - started
    for row in rows:
        got, indexed = outputs[row["file"]]
        if row["notes"].startswith("NEGATIVE"):
            negatives += 1
            false_text += bool(words(got))
        if not row["text"]:
            continue
        truth = [w for part in row["text"].split(" | ") for w in words(part)]
        have = set(words(indexed))
        stated += len(truth)
        found += sum(w in have for w in truth)
        per_image.append(sum(w in have for w in truth) / max(len(truth), 1))
        if not PARTIAL.search(row["text_source"]):
            a, b = "".join(words(row["text"])), "".join(words(got))
            errors += edit_distance(a, b)
            characters += len(a)
    return {"images": len(rows), "word_recall": round(found / max(stated, 1), 3),
            "image_recall": round(sum(per_image) / max(len(per_image), 1), 3),
            "cer": round(errors / max(characters, 1), 3), "negatives": negatives, "false_text": false_text,
            "images_per_s": round(len(rows) / seconds, 2)}


def run() -> dict[str, Any]:
    rows = samples()
    if not rows:
        return {"skipped": f"no OCR samples under {SAMPLES / 'ocr'}"}
    results: dict[str, Any] = {}
    for name, make in ENGINES.items():
        read = make()
        results[name] = measure(read, rows) if read else {"skipped": "not installed"}
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    args = parser.parse_args(argv)
    save_section(args.out, "ocr", run())


if __name__ == "__main__":
    main()
