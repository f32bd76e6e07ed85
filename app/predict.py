"""Serving assembled models: a bounded LRU of loaded models, image decoding, and
micro-batching of concurrent requests."""

from __future__ import annotations

import base64
import binascii
import io
import queue
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
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
                    _close(self._items.popitem(last=False)[1])
                self._loading.pop(key, None)
            return value

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            for value in self._items.values():
                _close(value)
            self._items.clear()


def _close(value: Any) -> None:
    close = getattr(value, "close", None)
    if close is not None:
        close()


class Batcher:
    """One model shared by concurrent requests (micro-batching).

    A request that finds the model idle runs it in its own thread at once (no
    hand-off, no waiting for company). Otherwise it queues its images, and one
    thread feeds the model every image waiting when it becomes free, up to
    `max_batch` images a call: under load, requests share calls, so the throughput
    approaches the model's batched throughput. After `close` (the model was
    evicted), requests still holding the batcher run in their own thread.
    """

    def __init__(self, classifier, max_batch: int) -> None:
        self.classifier = classifier
        self.class_names = list(classifier.class_names)
        self.spec = classifier.spec
        self.max_batch = max(1, max_batch)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._busy = threading.Lock()  # held while the model runs
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="lego-predict", daemon=True)
        self._thread.start()

    def probabilities(self, images: list) -> Any:
        """Softmax probabilities [len(images), classes] for image tensors of the spec."""
        done: Future = Future()
        if self._busy.acquire(blocking=False):  # idle: run here
            try:
                self._run([(images, done)])
            finally:
                self._busy.release()
            return done.result()
        with self._lock:
            queued = not self._closed
            if queued:
                self._queue.put((images, done))
        if not queued:
            self._run([(images, done)])
        return done.result()

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)  # after every request queued before it

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            with self._busy:  # then take everything that queued meanwhile
                pending, count = [item], len(item[0])
                while count < self.max_batch:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        self._queue.put(None)  # stop once these are answered
                        break
                    pending.append(item)
                    count += len(item[0])
                self._run(pending)

    def _run(self, pending: list) -> None:
        import torch

        images = [t for request_images, _ in pending for t in request_images]
        try:
            outs = []
            with torch.inference_mode():
                for start in range(0, len(images), self.max_batch):
                    batch = torch.stack(images[start : start + self.max_batch])
                    PREDICT_BATCH.observe(len(batch))
                    PREDICT_IMAGES.inc(len(batch))
                    outs.append(torch.softmax(self.classifier(batch).float(), dim=1))
            probs = torch.cat(outs)
        except BaseException as exc:  # noqa: BLE001 - every waiting request gets the error
            for _, done in pending:
                done.set_exception(exc)
            return
        at = 0
        for request_images, done in pending:
            done.set_result(probs[at : at + len(request_images)])
            at += len(request_images)


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

    from lego_core.data import to_8bit

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


def predict(model: Batcher, images: list, top_k: int) -> list[list[dict]]:
    """Top-k classes with probabilities for each image tensor."""
    names = model.class_names
    k = max(1, min(top_k, len(names)))
    p, idx = model.probabilities(images).topk(k, dim=1)
    return [
        [{"class": names[i], "probability": float(q)} for q, i in zip(row_p, row_i, strict=True)]
        for row_p, row_i in zip(p.tolist(), idx.tolist(), strict=True)
    ]
