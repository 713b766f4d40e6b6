"""Image sources (path, URL on a loopback server, data: URL, bytes, stdin) and every bad input -> one-line ImageError."""

import base64
import io
import socket
import struct
import sys
import threading
import time
import warnings
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from runtime.errors import AriaError, ImageError
from runtime.image_sources import data_url_bytes, fetch_url, load_image, read_stdin


def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _picture(width=40, height=30, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _same_pixels(a, b):
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def _png_header_only(width, height):
    """A PNG that declares a size but carries no pixel data (enough for Pillow's size checks)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _error(source, **kwargs):
    with pytest.raises(ImageError) as info:
        load_image(source, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, AriaError) and "\n" not in message and message
    return message


# ---------------------------------------------------------------- good sources


def test_path_bytes_and_stdin_give_the_same_picture(tmp_path, monkeypatch):
    picture = _picture()
    path = tmp_path / "photo.png"
    path.write_bytes(_png_bytes(picture))
    assert _same_pixels(load_image(path), picture)
    assert _same_pixels(load_image(str(path)), picture)
    assert _same_pixels(load_image(_png_bytes(picture)), picture)

    class FakeStdin:
        buffer = io.BytesIO(_png_bytes(picture))

    monkeypatch.setattr(sys, "stdin", FakeStdin)
    assert _same_pixels(load_image("-"), picture)


def test_exif_orientation_is_applied():
    picture = _picture(8, 4, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF "rotate 90 degrees clockwise to display"
    buffer = io.BytesIO()
    picture.save(buffer, "PNG", exif=exif)
    loaded = load_image(buffer.getvalue())
    assert loaded.size == (4, 8)
    # Clockwise by hand: the displayed top row is the stored left column, read bottom-up.
    stored = np.asarray(picture)
    assert np.array_equal(np.asarray(loaded)[0], stored[::-1, 0])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "1", "I;16", "CMYK"])
def test_modes_load(mode):
    picture = _picture(20, 10).convert("RGBA" if mode in ("RGBA", "LA") else "RGB").convert(
        "L" if mode == "I;16" else mode
    )
    if mode == "I;16":
        picture = Image.fromarray(np.asarray(picture).astype(np.uint16) * 257)
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "I;16" else "PNG"
    buffer = io.BytesIO()
    picture.save(buffer, fmt)
    loaded = load_image(buffer.getvalue())
    assert loaded.mode == picture.mode and loaded.size == (20, 10)


# ---------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope.jpg")


def test_directory(tmp_path):
    assert "is a directory" in _error(tmp_path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("just some words\nand more\n")
    assert _error(path) == f"{path} is a text file, not an image; give a JPEG, PNG, WebP, GIF or TIFF picture"


def test_unknown_binary(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 4)
    assert "not an image" in _error(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert _error(path) == f"image {path} is empty (0 bytes); give a JPEG, PNG, WebP, GIF or TIFF picture"


def test_truncated_jpeg(tmp_path):
    buffer = io.BytesIO()
    _picture(200, 150).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    message = _error(path)
    assert "truncated" in message and "cut.jpg" in message


def test_decompression_bomb():
    message = _error(_png_header_only(100_000, 100_000))
    assert "too many pixels" in message and "decompression bomb" in message


def test_large_picture_under_the_bomb_limit_loads_without_pillows_warning(monkeypatch):
    # Pillow warns past MAX_IMAGE_PIXELS (a 12000x12000 photo prints two lines on stderr before the
    # answer) and refuses past twice that; only the refusal is ours to report.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    picture = _picture(40, 30)  # 1200 pixels: over the warning line, under the refusal
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _same_pixels(load_image(_png_bytes(picture)), picture)
    assert "too many pixels" in _error(_png_bytes(_picture(60, 40)))


def test_zero_size_file_is_rejected():
    # Pillow refuses to identify a 0-wide picture; it still ends as one clear line.
    assert "not an image" in _error(_png_header_only(0, 10))


def test_absurd_aspect_ratio():
    message = _error(_png_header_only(20000, 10))
    assert "aspect ratio of 2000:1" in message


def test_unsupported_scheme():
    assert "only http:// and https://" in _error("ftp://example.com/a.png")


def test_empty_stdin():
    with pytest.raises(ImageError, match="standard input is empty"):
        read_stdin(io.BytesIO(b""))


def test_stdin_over_cap():
    with pytest.raises(ImageError, match="larger than"):
        read_stdin(io.BytesIO(b"x" * 101), max_bytes=100)


# ---------------------------------------------------------------- data: URLs


def _data_url(data, header="data:image/png;base64,"):
    return header + base64.b64encode(data).decode("ascii")


def test_data_url_gives_the_same_picture_as_the_file(tmp_path):
    picture = _picture(seed=4)
    path = tmp_path / "photo.png"
    path.write_bytes(_png_bytes(picture))
    from_file = load_image(path)
    assert _same_pixels(load_image(_data_url(path.read_bytes())), from_file)
    # Any media type or none, the scheme and ";base64" in any case, base64 wrapped over lines;
    # offline too: nothing is downloaded.
    wrapped = "DATA:;BASE64," + base64.encodebytes(path.read_bytes()).decode("ascii")
    assert "\n" in wrapped and _same_pixels(load_image(wrapped, offline=True), from_file)


@pytest.mark.parametrize("url", [
    "data:image/png,%89PNG%0D%0A",  # percent-encoded, not base64
    "data:text/plain;charset=utf-8,hello",
    "data:image/png;base64",  # no comma: no data at all
])
def test_a_data_url_that_is_not_base64(url):
    assert _error(url) == "a data: URL must be base64, like data:image/png;base64,iVBORw0..."


@pytest.mark.parametrize("payload", ["iVBORw0KGgo*AAAA", "iVBORw0KGgoAA", "====", "aGVsbG8=aGVsbG8="])
def test_a_data_url_that_is_not_valid_base64(payload):
    assert _error("data:image/png;base64," + payload) == (
        "the data: URL is not valid base64; encode the picture's file with base64")


def test_a_data_url_of_something_else_is_not_an_image():
    assert "<data: URL> is a text file, not an image" in _error(_data_url(b"just some words\n"))
    assert "<data: URL> is empty" in _error("data:image/png;base64,")


def test_data_url_over_the_byte_cap():
    png = _png_bytes(_picture(seed=5))
    assert _same_pixels(load_image(_data_url(png), max_bytes=len(png)), _picture(seed=5))
    message = _error(_data_url(png), max_bytes=len(png) - 1)
    assert "over the" in message and "limit" in message
    # The cap is on the decoded bytes, exactly as for files, URLs and stdin, whatever the
    # base64 padding: max_bytes bytes pass, one more does not.
    for cap in (99, 100, 101):
        assert len(data_url_bytes(_data_url(bytes(cap)), max_bytes=cap)) == cap
        for extra in (1, 2):
            with pytest.raises(ImageError, match="over the .* limit"):
                data_url_bytes(_data_url(bytes(cap + extra)), max_bytes=cap)


# ---------------------------------------------------------------- URLs (loopback only)


class _Handler(BaseHTTPRequestHandler):
    picture = _png_bytes(_picture(32, 24, seed=9))
    requests: ClassVar[list[str]] = []

    def do_GET(self):
        type(self).requests.append(self.path)
        if self.path == "/photo.png":
            self._send(200, self.picture, length=True)
        elif self.path == "/no-length.png":
            self._send(200, self.picture, length=False)
        elif self.path == "/trickle.png":  # one byte every 50 ms: each read is quick, the whole is not
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.picture)))
            self.end_headers()
            try:
                for i in range(len(self.picture)):
                    self.wfile.write(self.picture[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:  # the client gave up
                pass
        else:
            self._send(404, b"not here", length=True)

    def _send(self, code, body, length):
        self.send_response(code)
        self.send_header("Content-Type", "image/png")
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url(server):
    loaded = load_image(f"{server}/photo.png")
    assert _same_pixels(loaded, Image.open(io.BytesIO(_Handler.picture)))


def test_url_http_error(server):
    message = _error(f"{server}/missing.png")
    assert "HTTP 404" in message


def test_url_over_byte_cap(server):
    assert "limit" in _error(f"{server}/photo.png", max_bytes=100)  # Content-Length says too big
    assert "limit" in _error(f"{server}/no-length.png", max_bytes=100)  # counted while reading


def test_a_trickling_server_hits_the_deadline_for_the_whole_download(server):
    with pytest.raises(ImageError) as caught:
        fetch_url(f"{server}/trickle.png", timeout=5, deadline=0.5)
    assert str(caught.value) == (f"cannot fetch {server}/trickle.png: the download took over 0.5 s; "
                                 "check your connection")
    assert fetch_url(f"{server}/no-length.png", deadline=5) == _Handler.picture  # read to the end in chunks


def test_offline_makes_no_request(server):
    before = len(_Handler.requests)
    message = _error(f"{server}/photo.png", offline=True)
    assert "offline" in message and len(_Handler.requests) == before


def test_unreachable_url():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    message = _error(f"http://127.0.0.1:{port}/a.png", timeout=5)
    assert "cannot fetch" in message and "connection" in message


def test_silent_server_times_out():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts the connection in the backlog, never answers
    try:
        message = _error(f"http://127.0.0.1:{silent.getsockname()[1]}/a.png", timeout=0.3)
    finally:
        silent.close()
    assert "no answer within 0.3 s" in message


def test_a_server_that_does_not_speak_http_and_malformed_urls_are_image_errors():
    # http.client's own exceptions (BadStatusLine, ...) and a malformed port or host are bad
    # addresses or servers, not bugs: each is one ImageError naming the URL.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def garbage():
        connection, _ = listener.accept()
        connection.recv(4096)
        connection.sendall(b"GARBAGE NOT HTTP\r\n\r\n")
        connection.close()

    thread = threading.Thread(target=garbage, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.png"
    assert _error(url).startswith(f"cannot fetch {url}: ")
    thread.join(5)
    listener.close()
    for url in ("http://127.0.0.1:abc/x.png", "http://[::1/x.png"):
        assert _error(url).startswith("cannot fetch "), url
