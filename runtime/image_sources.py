"""Where images come from: a path, an http(s) or data: URL, or bytes (stdin). Every way a picture can be
unusable ends here as one ImageError line, so preprocessing only ever sees a decoded image.

Checks, in order: the source can be read (exists, is a file, URL reachable, under the byte cap),
Pillow recognises it, it is not a decompression bomb (Pillow's own MAX_IMAGE_PIXELS rule), it has
a sane size and aspect ratio, and its pixel data decodes completely (a truncated JPEG fails here,
not later in the middle of a run). Then EXIF orientation is applied and, for animations, the
first frame is kept. Colour-mode conversion belongs to image_processing.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

DEFAULT_TIMEOUT = 20.0  # seconds for connecting and for each read of a URL
# Seconds for the whole body: a server that sends a byte now and then never trips the per-read
# timeout. 50 MB (the cap) in 2 minutes is a slow but working connection. (Connecting and the
# headers are bounded by the per-read timeout and http.client's limits on header lines.)
DEFAULT_DEADLINE = 120.0
_CHUNK = 1 << 16
DEFAULT_MAX_BYTES = 50 * 1024 * 1024  # cap on downloaded / piped image files
# Beyond this a picture is a line, not an image: the 336-pixel floor of the short side would
# stretch it past recognition (an 8:1 panorama is the widest grid the tiling knows).
MAX_ASPECT_RATIO = 50.0
STDIN_NAME = "-"
GIVE_A_PICTURE = "give a JPEG, PNG, WebP, GIF or TIFF picture"


def load_image(
    source: str | Path | bytes,
    *,
    offline: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """Open an image from a path, an http(s) or base64 data: URL, raw bytes, or "-" (standard input).

    `offline` refuses URLs (HF_HUB_OFFLINE / --offline means no network call at all).
    """
    return decode_image(*image_bytes(source, offline=offline, timeout=timeout, max_bytes=max_bytes))


def image_bytes(
    source: str | Path | bytes,
    *,
    offline: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[bytes, str]:
    """The file bytes of a picture from any source `load_image` takes, and the name errors give it."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source), "<bytes>"
    text = str(source)
    if text == STDIN_NAME:
        return read_stdin(max_bytes=max_bytes), "<stdin>"
    if text[:5].lower() == "data:":
        return data_url_bytes(text, max_bytes=max_bytes), "<data: URL>"
    if text.lower().startswith(("http://", "https://")):
        if offline:
            raise ImageError(f"cannot fetch {text}: offline mode allows no downloads; save the image and pass its path")
        return fetch_url(text, timeout=timeout, max_bytes=max_bytes), text
    if "://" in text:
        raise ImageError(f"cannot open {text}: only http:// and https:// URLs are supported")
    return read_image_file(Path(text)), text


def read_image_file(path: Path) -> bytes:
    name = str(path)
    if not path.exists():
        raise ImageError(f"image {name} does not exist; check the path")
    if path.is_dir():
        raise ImageError(f"image {name} is a directory; pass an image file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read image {name}: {exc.strerror or exc}") from None


def read_stdin(stream: BinaryIO | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    stream = stream if stream is not None else sys.stdin.buffer
    data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageError(f"image on standard input is larger than {_mb(max_bytes)}; pass a smaller file")
    if not data:
        raise ImageError("standard input is empty; pipe an image into it (e.g. `cat photo.jpg | aria ask - ...`)")
    return data


def fetch_url(url: str, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES,
              deadline: float = DEFAULT_DEADLINE) -> bytes:
    """Download `url` with a timeout per read, a deadline for the whole and a byte cap (urllib:
    no extra dependency)."""
    ends = time.monotonic() + deadline
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "aria-cli", "Accept": "image/*,*/*;q=0.5"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ImageError(f"image at {url} is {_mb(int(length))}, over the {_mb(max_bytes)} limit")
            data = _read_until(response, max_bytes + 1, ends, f"cannot fetch {url}: the download took over "
                                                              f"{deadline:g} s; check your connection")
    except urllib.error.HTTPError as exc:
        raise ImageError(f"cannot fetch {url}: HTTP {exc.code} {exc.reason}; check the URL") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise ImageError(f"cannot fetch {url}: no answer within {timeout:g} s; check your connection") from None
        raise ImageError(f"cannot fetch {url}: {_reason(reason)}; check the URL and your connection") from None
    except TimeoutError:
        raise ImageError(f"cannot fetch {url}: no answer within {timeout:g} s; check your connection") from None
    # Connection reset mid-body, a malformed URL or port, a server that does not speak HTTP
    # (http.client's BadStatusLine, IncompleteRead, LineTooLong...).
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise ImageError(f"cannot fetch {url}: {_reason(exc)}; check the URL and your connection") from None
    if len(data) > max_bytes:
        raise ImageError(f"image at {url} is over the {_mb(max_bytes)} limit")
    return data


def data_url_bytes(url: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes a `data:[<type>][;base64],<data>` URL (RFC 2397) carries: how OpenAI-style
    clients send pictures inline. Base64 only: a picture is binary."""
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise ImageError("a data: URL must be base64, like data:image/png;base64,iVBORw0...")
    payload = "".join(payload.split())  # line breaks are allowed inside base64
    too_big = f"the image in the data: URL is over the {_mb(max_bytes)} limit"
    # Refused before decoding; base64 lengths round up to whole 3-byte groups, so the decoded
    # length is checked too (up to 2 bytes over the cap would pass this check alone).
    if len(payload) > (max_bytes + 2) // 3 * 4:
        raise ImageError(too_big)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the data: URL is not valid base64; encode the picture's file with base64") from None
    if len(data) > max_bytes:
        raise ImageError(too_big)
    return data


def _read_until(response, limit: int, ends: float, late: str) -> bytes:
    """At most `limit` bytes of the body, as they arrive; ImageError(`late`) past time `ends`."""
    chunks, size = [], 0
    while size < limit:
        chunk = response.read1(min(_CHUNK, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if time.monotonic() > ends:
            raise ImageError(late)
    return b"".join(chunks)


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode image file bytes completely, validate them, apply EXIF orientation."""
    if not data:
        raise ImageError(f"image {name} is empty (0 bytes); {GIVE_A_PICTURE}")
    # Pillow's decoders raise many exception types on hostile or damaged input (OSError,
    # SyntaxError, ValueError, struct.error, EOFError, ...). Anything raised while parsing
    # untrusted bytes is a bad image, not a bug of ours, so all of it becomes one ImageError.
    try:
        with warnings.catch_warnings():
            # Pillow warns (two lines on stderr) past MAX_IMAGE_PIXELS and refuses past twice that;
            # the refusal below is our check, a large photo under it is fine.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageError(
            f"image {name} has too many pixels (over Pillow's limit of {2 * Image.MAX_IMAGE_PIXELS:,}); "
            "it may be a decompression bomb — downscale it first"
        ) from None
    except UnidentifiedImageError:
        if _looks_like_text(data):
            raise ImageError(f"{name} is a text file, not an image; {GIVE_A_PICTURE}") from None
        raise ImageError(f"{name} is not an image Pillow can read (unknown, unsupported or damaged format); "
                         f"{GIVE_A_PICTURE}") from None
    except Exception as exc:  # noqa: BLE001 - see above
        raise ImageError(f"image {name} is damaged: {_reason(exc)}") from None
    check_image_size(image.width, image.height, name)
    try:
        image.seek(0)  # animations: the first frame
        image.load()
    except Exception as exc:  # noqa: BLE001 - see above
        raise ImageError(f"image {name} is truncated or damaged ({_reason(exc)}); re-save or re-download it") from None
    try:
        oriented = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block only loses the rotation hint
        oriented = None
    return oriented if oriented is not None else image


def check_image_size(width: int, height: int, name: str) -> None:
    """Reject pictures that have no pixels or are so thin that resizing would destroy them."""
    if width <= 0 or height <= 0:
        raise ImageError(f"image {name} has zero size ({width}x{height} pixels)")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"image {name} is {width}x{height} pixels, an aspect ratio of {ratio:.0f}:1; "
            f"crop it to at most {MAX_ASPECT_RATIO:.0f}:1"
        )


def _looks_like_text(data: bytes) -> bool:
    head = data[:4096]
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start > len(head) - 4  # only a character cut at the 4096-byte edge
    return True


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB" if n % (1024 * 1024) else f"{n // (1024 * 1024)} MB"


def _reason(exc: object) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text or type(exc).__name__
