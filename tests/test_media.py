"""One image loader (ov_jax.processing.media) for the processor, the CLI and batch inference: every source form
transformers' ``load_image`` accepts, with its pixels; clear errors naming the input; the decompression-bomb limit.
URLs are served by a local ``http.server`` on 127.0.0.1 (no network)."""

import base64
import functools
import http.server
import io
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image
from transformers.image_utils import load_image as reference_load_image

from ov_jax import cli
from ov_jax.batch_inference import request_conversation
from ov_jax.processing import LlavaOnevisionProcessor
from ov_jax.processing.media import (ImageTooLargeError, MediaError, MediaNotFoundError, load_image,
                                     resolve_image_source)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pattern(height, width, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Image files in the modes and containers that need conversion, keyed by name."""
    folder = tmp_path_factory.mktemp("images")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    paths = {}

    def save(name, image, **kwargs):
        paths[name] = str(folder / name)
        image.save(paths[name], **kwargs)

    save("rotated.jpg", Image.fromarray(pattern(40, 90)), exif=exif, quality=95)
    save("rgba.png", Image.fromarray(pattern(30, 50, 4), "RGBA"))
    palette = Image.fromarray(pattern(30, 41)).quantize(colors=16)
    save("palette.png", palette, transparency=3)
    save("gray.png", Image.fromarray(pattern(33, 21)[..., 0], "L"))
    save("cmyk.jpg", Image.fromarray(pattern(25, 35, 4), "CMYK"), quality=95)
    save("i16.png", Image.fromarray(pattern(20, 30)[..., 0].astype(np.uint16) * 250))
    save("la.png", Image.fromarray(pattern(20, 30, 4)[..., [0, 3]], "LA"))
    return paths


@pytest.fixture(scope="module")
def server(files):
    """A local http server over the images' folder; yields its base URL."""
    folder = os.path.dirname(next(iter(files.values())))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=folder)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def same_pixels(a, b):
    return a.mode == b.mode == "RGB" and a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


NAMES = ["rotated.jpg", "rgba.png", "palette.png", "gray.png", "cmyk.jpg", "i16.png", "la.png"]


@pytest.mark.parametrize("name", NAMES)
def test_every_source_form_gives_transformers_pixels(files, server, name):
    path = files[name]
    expected = reference_load_image(path)
    raw = open(path, "rb").read()
    encoded = base64.b64encode(raw).decode()
    sources = {
        "path": path,
        "pathlib": __import__("pathlib").Path(path),
        "url": f"{server}/{name}",
        "data_uri": f"data:image/{name.rsplit('.', 1)[1]};base64,{encoded}",
        "base64": encoded,
        "base64_with_line_breaks": base64.encodebytes(raw).decode(),  # transformers' decodebytes accepts these
        "pil": Image.open(path),
    }
    for form, source in sources.items():
        assert same_pixels(load_image(source), expected), form
    assert same_pixels(reference_load_image(sources["base64_with_line_breaks"]), expected)
    assert same_pixels(reference_load_image(sources["pil"]), expected)


def test_rotated_image_is_upright_everywhere(files, tiny_ckpt):
    """The CLI, the processor given a path, and batch requests all see the EXIF-transposed image (the CLI
    used to open it without the transpose: 40x90 instead of 90x40)."""
    path = files["rotated.jpg"]
    processor = LlavaOnevisionProcessor.from_pretrained(tiny_ckpt)
    expected = processor.preprocess_images(path)
    assert expected["image_sizes"].tolist() == [[90, 40]]
    (from_cli,) = cli.load_images([path])
    got = processor.preprocess_images(from_cli)
    assert np.array_equal(got["pixel_values"], expected["pixel_values"])
    assert got["image_sizes"].tolist() == [[90, 40]]
    batch = request_conversation({"id": 0, "prompt": "Hi", "images": [os.path.basename(path)]},
                                 media_root=os.path.dirname(path))
    inputs = processor.apply_chat_template(batch, tokenize=True, return_dict=True)
    assert np.array_equal(inputs["pixel_values"], expected["pixel_values"])


def test_cli_and_batch_accept_urls_and_base64(files, server, tmp_path):
    path = files["rgba.png"]
    expected = np.asarray(reference_load_image(path))
    encoded = base64.b64encode(open(path, "rb").read()).decode()
    sources = [f"{server}/rgba.png", encoded, "data:image/png;base64," + encoded]
    for image in cli.load_images(sources):
        assert np.array_equal(np.asarray(image), expected)
    conversation = request_conversation({"id": 1, "prompt": "Hi", "images": sources + ["rel.png"]},
                                        media_root=tmp_path)
    items = conversation[0]["content"]
    assert [item["path"] for item in items[:3]] == sources  # kept for the loader, not joined to the root
    assert items[3]["path"] == str(tmp_path / "rel.png")
    assert resolve_image_source("/abs/x.png", tmp_path) == "/abs/x.png"
    assert resolve_image_source("missing.png", tmp_path) == str(tmp_path / "missing.png")


def test_errors_name_the_input(tmp_path, server):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG but not really" * 10)
    truncated = tmp_path / "truncated.png"
    buffer = io.BytesIO()
    Image.fromarray(pattern(64, 64)).save(buffer, format="PNG")
    truncated.write_bytes(buffer.getvalue()[:300])
    loop = tmp_path / "loop.png"
    os.symlink(loop, loop)
    dangling = tmp_path / "dangling.png"
    os.symlink(tmp_path / "nowhere.png", dangling)
    cases = [
        (tmp_path / "missing.png", MediaNotFoundError, r"missing.png' does not exist"),
        (tmp_path, MediaError, r"is a directory"),
        (loop, MediaError, r"loop.png' is a symlink loop"),
        (dangling, MediaNotFoundError, r"dangling.png' is a broken symlink"),
        (garbage, MediaError, r"cannot read image .*garbage.png.*not an image file"),
        (truncated, MediaError, r"cannot read image .*truncated.png"),
        ("bm90IGFuIGltYWdl", MediaError, r"image 'bm90IGFuIGltYWdl' cannot be read|cannot read image 'bm90"),
        ("abc", MediaError, r"image 'abc' does not exist as a file and is not valid base64"),
        ("data:image/png;base64,###", MediaError, r"cannot read image .data:image/png;base64,###"),
        ("data:image/png;base64,a", MediaError, r"not a valid base64 data URI"),
        ("data:text/plain;base64,aGk=", MediaError, r"is a data URI of type 'text/plain', not an image"),
        ("data:,hi", MediaError, r"is a data URI of type 'none', not an image"),
        (f"{server}/absent.png", MediaError, r"cannot download image .*absent.png.*404"),
    ]
    for source, kind, message in cases:
        with pytest.raises(kind, match=message):
            load_image(source)
    assert issubclass(MediaNotFoundError, FileNotFoundError) and issubclass(MediaError, ValueError)
    with pytest.raises(TypeError, match="got int"):
        load_image(3)


def test_decompression_bomb_limit(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    with pytest.raises(ImageTooLargeError, match=r"big.png' has 100x100 = 10,000 pixels, over the limit of 5,000"):
        load_image(path, max_pixels=5000)
    assert load_image(path, max_pixels=None).size == (100, 100)
    monkeypatch.setenv("OV_JAX_MAX_IMAGE_PIXELS", "9999")
    with pytest.raises(ImageTooLargeError, match="limit of 9,999.*OV_JAX_MAX_IMAGE_PIXELS"):
        load_image(path)
    monkeypatch.setenv("OV_JAX_MAX_IMAGE_PIXELS", "none")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    assert load_image(path).size == (100, 100)  # the variable wins over PIL's limit
    monkeypatch.delenv("OV_JAX_MAX_IMAGE_PIXELS")
    # PIL only warns between its limit and twice its limit; here that band is an error too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with pytest.raises(ImageTooLargeError, match="limit of 6,000"):
        load_image(str(path))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # past twice PIL's limit: PIL's error, ours instead
    with pytest.raises(ImageTooLargeError, match="limit of 3,000"):
        load_image(str(path))
    assert Image.MAX_IMAGE_PIXELS == 3000  # PIL's own setting is left as it was
    monkeypatch.setenv("OV_JAX_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="OV_JAX_MAX_IMAGE_PIXELS must be a positive integer"):
        load_image(path)


def test_cli_reports_image_errors_in_one_line(tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(big)
    env = {**os.environ, "PYTHONPATH": REPO, "OV_JAX_MAX_IMAGE_PIXELS": "5000"}
    for image, message in ((big, "over the limit of 5,000"), (tmp_path, "is a directory")):
        result = subprocess.run([sys.executable, "-m", "ov_jax.cli", "generate", "--model", str(tmp_path / "m"),
                                 "--image", str(image), "--prompt", "hi"], capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and "internal error" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
