"""The one image loader of the processor, the command line and batch inference.

:func:`load_image` accepts every source form transformers' ``load_image`` accepts (a local path, an http(s)
URL, a ``data:image/...;base64,`` URI, a raw base64 string, a PIL image) and returns the same pixels: the image
is EXIF-transposed, then converted with ``convert("RGB")`` (so transparency is dropped, not composited; a PIL
image given to the *processor* directly is composited on white instead, as transformers' image processor does).
Sources are tried in transformers' order: URL, existing file, base64.

Decompression bombs: an image with more pixels than the limit is refused before it is decoded. The limit is,
in order of precedence, the ``max_pixels`` argument, the ``OV_JAX_MAX_IMAGE_PIXELS`` environment variable (an
integer, or ``none`` for no limit), then PIL's ``Image.MAX_IMAGE_PIXELS`` (89,478,485 by default). Unlike PIL,
which only warns between the limit and twice the limit, every image over the limit is an error.

Errors name the input: :class:`MediaNotFoundError` (a ``FileNotFoundError`` and a ``ValueError``) for a
missing local file, :class:`ImageTooLargeError` for a bomb, :class:`MediaError` (a ``ValueError``) for
everything else (a directory, a symlink loop, an unreadable or undecodable file, bad base64, a failed download).
:func:`check_local_file` gives videos the same checks of a local path.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import pathlib
import threading
import urllib.request
from typing import Any

from PIL import Image, ImageOps

from ov_jax.paths import BROKEN_SYMLINK, NOT_THERE, file_problem

MAX_PIXELS_ENV = "OV_JAX_MAX_IMAGE_PIXELS"
URL_PREFIXES = ("http://", "https://")
DATA_URI_PREFIX = "data:image/"
_BASE64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n\r\t ")
_pil_limit_lock = threading.Lock()


class MediaError(ValueError):
    """An image or video source that cannot be loaded; the message names the source and the reason."""


class MediaNotFoundError(MediaError, FileNotFoundError):
    """A local image or video path that does not exist."""


class ImageTooLargeError(MediaError):
    """An image with more pixels than the decompression-bomb limit (see :func:`max_image_pixels`)."""


def describe_source(source: Any) -> str:
    """A short printable name of an image source for error messages (long strings are cut)."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, bytes):
            text = os.fsdecode(text)
        if text.startswith(DATA_URI_PREFIX) or len(text) > 120:
            return repr(text[:60] + f"... ({len(text)} characters)")
        return repr(text)
    return f"<{type(source).__name__}>"


def max_image_pixels(max_pixels: int | None | str = "default") -> int | None:
    """The pixel limit in force: ``max_pixels`` when given (``None``: no limit), else the environment variable
    ``OV_JAX_MAX_IMAGE_PIXELS`` (an integer or ``none``), else PIL's ``Image.MAX_IMAGE_PIXELS``."""
    if max_pixels != "default":
        value: Any = max_pixels
    elif os.environ.get(MAX_PIXELS_ENV, "").strip():
        text = os.environ[MAX_PIXELS_ENV].strip()
        if text.lower() == "none":
            return None
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{MAX_PIXELS_ENV} must be a positive integer or 'none', got {text!r}") from None
    else:
        value = Image.MAX_IMAGE_PIXELS
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"the image pixel limit must be a positive integer or None, got {value!r}")
    return value


def is_url(source: str) -> bool:
    return source.startswith(URL_PREFIXES)


def _looks_like_base64(text: str) -> bool:
    return bool(text) and all(ord(c) < 128 and ord(c) in _BASE64_ALPHABET for c in text)


def resolve_image_source(source: Any, root: str | os.PathLike | None) -> Any:
    """``source`` with a relative local path joined to ``root``; URLs, data URIs, base64 strings, absolute paths
    and non-strings are returned unchanged. A relative string names a file under ``root`` when something exists
    there or when it is not base64 (then the error for the missing file names the full path)."""
    if root is None or not isinstance(source, (str, os.PathLike)):
        return source
    text = os.fspath(source)
    if is_url(text) or text.startswith(DATA_URI_PREFIX) or os.path.isabs(text):
        return source
    joined = str(pathlib.Path(root) / text)
    if os.path.lexists(joined) or not _looks_like_base64(text):
        return joined
    return source


def local_path_problem(path: str, what: str = "image") -> MediaError | None:
    """Why ``path`` is not a readable regular file (a symlink loop, a broken symlink, a directory, a device...),
    or None when it is one or is simply not there; ``what`` ("image", "video") starts the message."""
    problem = file_problem(path)
    if problem is None or problem in NOT_THERE:
        return None
    error = MediaNotFoundError if problem.startswith(BROKEN_SYMLINK) else MediaError
    return error(f"{what} {describe_source(path)} {problem}")


def check_local_file(path: str | os.PathLike, what: str = "image") -> str:
    """``path`` as a string if it is a readable regular file; else the :class:`MediaError` naming the problem
    (:class:`MediaNotFoundError` when nothing is there)."""
    text = os.fspath(path)
    problem = local_path_problem(text, what)
    if problem is not None:
        raise problem
    if not os.path.isfile(text):
        raise MediaNotFoundError(f"{what} {describe_source(text)} does not exist")
    return text


def _download(url: str, timeout_s: float | None) -> io.BytesIO:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (an http(s) URL the user gave)
            return io.BytesIO(response.read())
    except (OSError, ValueError) as err:
        raise MediaError(f"cannot download image {describe_source(url)}: {err}") from None


def _decode_base64(text: str, what: str) -> io.BytesIO:
    """transformers' reading: strip a data-URI header, then ``base64.decodebytes`` (line breaks allowed)."""
    body = text.split(",", 1)[1] if text.startswith(DATA_URI_PREFIX) and "," in text else text
    try:
        return io.BytesIO(base64.decodebytes(body.encode("ascii")))
    except (binascii.Error, UnicodeEncodeError) as err:
        raise MediaError(f"image {describe_source(text)} {what}: {err}") from None


def _open_within_limit(data: Any, shown: str, limit: int | None) -> Image.Image:
    """``Image.open`` with our pixel limit in place of PIL's (checked on the header, before decoding)."""
    with _pil_limit_lock:  # PIL's limit is a module global: swap it for the header read only
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            image = Image.open(data)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    width, height = image.size
    if limit is not None and width * height > limit:
        image.close()
        raise ImageTooLargeError(
            f"image {shown} has {width}x{height} = {width * height:,} pixels, over the limit of {limit:,} "
            f"(a decompression-bomb guard; raise it with max_pixels= or {MAX_PIXELS_ENV}=N, or 'none')")
    return image


def load_image(source: Any, *, timeout_s: float | None = 60.0, max_pixels: int | None | str = "default"
               ) -> Image.Image:
    """An RGB PIL image from a path, an http(s) URL, a data URI, a base64 string or a PIL image.

    Pixels are those of transformers' ``load_image``: EXIF orientation applied, then ``convert("RGB")``.
    ``timeout_s`` bounds a download; ``max_pixels`` overrides the decompression-bomb limit (module docstring).
    Raises :class:`MediaNotFoundError`, :class:`ImageTooLargeError` or :class:`MediaError` naming the
    source; ``TypeError`` for a source that is neither a string, a path nor a PIL image.
    """
    limit = max_image_pixels(max_pixels)
    if isinstance(source, Image.Image):
        width, height = source.size
        if limit is not None and width * height > limit:
            raise ImageTooLargeError(f"image <PIL.Image {width}x{height}> has {width * height:,} pixels, over the "
                                     f"limit of {limit:,} (raise it with max_pixels= or {MAX_PIXELS_ENV})")
        return _to_rgb(source, "<PIL.Image>")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"an image source must be a path, an http(s) URL, base64 data or a PIL image, got "
                        f"{type(source).__name__}")
    text = os.fspath(source)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    shown = describe_source(text)
    if is_url(text):
        data: Any = _download(text, timeout_s)
    elif os.path.isfile(text):
        data = text
    elif text.startswith(DATA_URI_PREFIX):
        data = _decode_base64(text, "is not a valid base64 data URI")
    elif text.startswith("data:") and not os.path.lexists(text):
        media_type = text[len("data:"):].split(",", 1)[0].split(";", 1)[0] or "none"
        raise MediaError(f"image {shown} is a data URI of type {media_type!r}, not an image "
                         f"({DATA_URI_PREFIX}...)")
    else:
        problem = local_path_problem(text)
        if problem is not None:
            raise problem
        if not _looks_like_base64(text):
            raise MediaNotFoundError(f"image {shown} does not exist (and it is not an http(s) URL or base64 data)")
        data = _decode_base64(text, "does not exist as a file and is not valid base64 data either")
    try:
        with _open_within_limit(data, shown, limit) as image:
            return _to_rgb(image, shown)
    except MediaError:
        raise
    except Image.DecompressionBombError as err:  # a frame or tile past PIL's own limit while decoding
        raise ImageTooLargeError(f"image {shown} is too large to decode: {err}") from None
    except Image.UnidentifiedImageError:
        raise MediaError(f"cannot read image {shown}: not an image file in a format PIL can read") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # PIL's errors for unreadable data
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err) or type(err).__name__
        raise MediaError(f"cannot read image {shown}: {reason}") from None


def _to_rgb(image: Image.Image, shown: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise MediaError(f"cannot read image {shown}: {err or type(err).__name__}") from None
