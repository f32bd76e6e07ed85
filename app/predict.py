"""Serving assembled models: a bounded LRU of loaded models, image decoding, batches."""

from __future__ import annotations

import base64
import binascii
import io
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from PIL import Image, UnidentifiedImageError

from app.metrics import PREDICT_BATCH, PREDICT_IMAGES

ALLOWED_FORMATS = {"PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"}


class ImageError(ValueError):
    """An uploaded image that cannot be used (mapped to 422)."""


class ModelCache:
    """At most `size` loaded models, least recently used evicted; thread-safe."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, key: str, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:  # one load per model, however many requests wait for it
            with self._lock:
                if key in self._items:
                    return self._items[key]
            value = load()
            with self._lock:
                self._items[key] = value
                self._items.move_to_end(key)
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
                self._loading.pop(key, None)
            return value

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def b64decode_image(text: str, index: int = 0) -> bytes:
    """Decode base64url (or standard base64), padding optional; data: URLs accepted."""
    s = text.strip()
    if s.startswith("data:") and "," in s:
        s = s.split(",", 1)[1]
    s = s.replace("-", "+").replace("_", "/")
    s = "".join(s.split())
    s += "=" * (-len(s) % 4)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"image {index}: not valid base64") from None


def decode_image(data: bytes, spec, max_pixels: int, index: int = 0):
    """Bytes of an image -> float tensor [C, H, W] in [0, 1] at the spec's size."""
    import torch

    if not data:
        raise ImageError(f"image {index}: empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in ALLOWED_FORMATS:
                raise ImageError(
                    f"image {index}: format {img.format} is not supported (use PNG or JPEG)"
                )
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(
                    f"image {index}: {w}x{h} pixels is over the limit of {max_pixels} pixels"
                )
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(
            f"image {index}: not a readable image (supported: {', '.join(sorted(ALLOWED_FORMATS))})"
        ) from None
    except (
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise ImageError(f"image {index}: not a readable PNG or JPEG image ({exc})") from None
    img = to_8bit(img)
    img = img.convert("L" if spec.channels == 1 else "RGB")
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return t.view(spec.height, spec.width, spec.channels).permute(2, 0, 1).float().div_(255.0)


def to_8bit(img):
    """16- and 32-bit greyscale as 8-bit, scaled (Pillow's convert("L") clips at 255, which
    turns every non-black pixel of a 16-bit image white)."""
    if img.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return img
    import numpy as np

    a = np.asarray(img)
    if img.mode == "I" and a.size and int(a.max()) <= 255:
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8))


def predict(classifier, images: list, top_k: int, batch_size: int) -> list[list[dict]]:
    """Top-k classes with probabilities for each image tensor, in batches."""
    import torch

    names = list(classifier.class_names)
    k = max(1, min(top_k, len(names)))
    out: list[list[dict]] = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.stack(images[start : start + batch_size])
            PREDICT_BATCH.observe(len(batch))
            PREDICT_IMAGES.inc(len(batch))
            probs = torch.softmax(classifier(batch).float(), dim=1)
            p, idx = probs.topk(k, dim=1)
            for row_p, row_i in zip(p.tolist(), idx.tolist(), strict=True):
                out.append(
                    [
                        {"class": names[i], "probability": float(q)}
                        for q, i in zip(row_p, row_i, strict=True)
                    ]
                )
    return out
