"""Text in images: a real pretrained OCR model, PP-OCRv4 (detection, orientation, recognition).

It runs through rapidocr-onnxruntime, whose wheel ships the three ONNX models: nothing is
fetched from a hub (`pip install 'clipgram[ocr]'`). PP-OCRv4's Chinese model reads Chinese
and English (chosen over tesseract by measurement: `python -m bench.ocr`, README "Text in
images"). The engine reads one image at a time on the CPU; the stage's loader decodes ahead.

Images reach the engine as batches (the loader stacks them): each is scaled to fit `max_side`,
with a fourth channel marking where the image is; a batch of images of different sizes is
padded to its largest (loader.stack), and the reader crops each back to its own size. No
image is padded further than its batch needs: an Instagram batch of 1080 px squares is sent
as it is, not inside a max_side square.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipgram.config import OcrSettings
from clipgram.errors import ClipgramError

log = logging.getLogger("clipgram.ocr")

PACKAGE = "rapidocr-onnxruntime"
MODEL = "PP-OCRv4"
LANGUAGES = ("zh", "en")  # what PP-OCRv4's Chinese recogniser reads
INSTALL = "pip install 'clipgram[ocr]'"


class OcrMissing(ClipgramError, ImportError):
    pass


def installed_version() -> str | None:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def model_id(settings: OcrSettings) -> str:
    """The OCR partition's name (the model and the engine's version), without loading it."""
    version = installed_version()
    if version is None:
        raise OcrMissing(f"reading text in images needs {PACKAGE}: {INSTALL} "
                         f"(or turn it off: [ocr] enabled = false)")
    return f"{MODEL}@rapidocr-{version}"


def published_id(settings: OcrSettings) -> str | None:
    """The OCR model whose text the catalog shows: None when OCR is off or not installed."""
    if not settings.enabled:
        return None
    try:
        return model_id(settings)
    except OcrMissing:
        return None


@dataclass(frozen=True)
class Line:
    text: str
    box: list[float]  # x1, y1, … x4, y4 as fractions of the image's width and height
    confidence: float


@dataclass(frozen=True)
class Masked:
    """The preprocess: a PIL image → uint8 (4, height, width) within `side`: RGB, and a mask of
    where the image is once its batch pads it (a class, not a closure: decode workers receive
    it pickled)."""

    side: int

    def __call__(self, image: Image.Image) -> torch.Tensor:
        scale = min(1.0, self.side / max(image.size))
        if scale < 1.0:
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.BILINEAR)
        out = torch.empty((4, image.height, image.width), dtype=torch.uint8)
        out[:3] = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)  # PIL's own: read-only
        out[3] = 255
        return out


def unmask(item: torch.Tensor) -> np.ndarray:
    """One preprocessed image, padded in its batch or not → the engine's input: HWC uint8, BGR
    (OpenCV's order), its own size."""
    import cv2  # the engine's own dependency

    mask = item[3]
    height = int(mask[:, 0].count_nonzero())
    width = int(mask[0].count_nonzero())
    planes = item[:3, :height, :width].numpy()
    # interleaved by OpenCV in one pass: 0.1 ms for a 1080 px square here, against 3.3 ms for
    # numpy's copy of a permuted view, in the process (and on the cores) the engine runs in
    return cv2.merge([planes[2], planes[1], planes[0]])


class OcrReader:
    def __init__(self, settings: OcrSettings):
        self.id = model_id(settings)
        self.languages = list(LANGUAGES)
        self.min_confidence = settings.min_confidence
        self.device = torch.device("cpu")  # onnxruntime's CPU provider: no GPU wheel here
        self.preprocess = Masked(settings.max_side)
        from rapidocr_onnxruntime import RapidOCR

        threads = settings.threads or -1
        self.engine = RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=threads,
                               text_score=settings.min_confidence)

    def read_one(self, image: np.ndarray) -> list[Line]:
        """The lines of text in one image (HWC BGR), in reading order: top to bottom, then left
        to right along a line."""
        found, _ = self.engine(image)
        height, width = image.shape[:2]
        lines = [Line(str(text).strip(), [float(v) for x, y in box for v in (x / width, y / height)],
                      float(score)) for box, text, score in found or []]
        lines = [line for line in lines if _plausible(line, self.min_confidence)]
        return sorted(lines, key=_reading_order(lines))

    def read_image(self, item: torch.Tensor) -> dict[str, Any]:
        """The OCR table's row of one image from `preprocess`."""
        return row(self.read_one(unmask(item.cpu())), self.languages)

    def read(self, batch: torch.Tensor) -> list[dict[str, Any]]:
        """One row per image of a batch from `preprocess`."""
        return [self.read_image(item) for item in batch]


_LATIN_RUN = re.compile(r"[A-Za-z]{6,}")


def search_words(text: str) -> str:
    """`text` with the words of each long run of Latin letters appended where it splits.

    PP-OCRv4's recogniser often drops the spaces between English words ("JAZZNIGHT",
    "Cleanhandswithsoapandwater"), which full-text search cannot then find. wordninja
    splits such runs by English word frequencies; the run itself stays too, so a name it
    splits wrongly ("Instagram" → "Insta gram") is still found as written.
    """
    import wordninja

    extra = [" ".join(parts) for run in _LATIN_RUN.findall(text) if len(parts := wordninja.split(run)) > 1]
    return "\n".join([text, *extra]) if extra else text


def row(lines: list[Line], languages: list[str]) -> dict[str, Any]:
    text = "\n".join(line.text for line in lines)
    return {"text": text, "words": search_words(text),
            "lines": [{"text": line.text, "box": line.box, "confidence": line.confidence} for line in lines],
            "languages": languages, "error": None}


LONE_CHARACTER_CONFIDENCE = 0.9


def _plausible(line: Line, min_confidence: float) -> bool:
    """Whether a recognised line is text: some letter or digit, read with confidence. A lone
    shape is often read as one glyph (a filled square as '■', an outlined one as '口'), so a
    line of one character needs a surer reading."""
    if line.confidence < min_confidence or not any(unicodedata.category(c)[0] in "LN" for c in line.text):
        return False
    return len(line.text) > 1 or line.confidence >= LONE_CHARACTER_CONFIDENCE


def _reading_order(lines: list[Line]):
    """Sort key: lines whose vertical middles are within half a line's height share a row."""
    heights = sorted(max(line.box[1::2]) - min(line.box[1::2]) for line in lines) or [0.0]
    row_height = max(heights[len(heights) // 2], 1e-6)

    def key(line: Line) -> tuple[int, float]:
        middle = (min(line.box[1::2]) + max(line.box[1::2])) / 2
        return round(middle / row_height), min(line.box[0::2])
    return key


def from_config(settings: OcrSettings) -> OcrReader:
    return OcrReader(settings)
