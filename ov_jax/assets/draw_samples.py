"""Draws the demo media in this folder with PIL only (no downloads): run once, the outputs are committed.

    python ov_jax/assets/draw_samples.py

sample.jpg  a 512x384 landscape (sky, sun, hills, a house, a tree), < 100 KB
sample.mp4  2 s at 8 fps, 192x144: the same scene while the sun sets (mpeg4, written with PyAV)
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = pathlib.Path(__file__).parent


def draw_scene(width: int, height: int, sun_height: float = 0.22) -> Image.Image:
    """The landscape; ``sun_height`` is the sun's centre as a fraction of the image height."""
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    dusk = min(1.0, max(0.0, (sun_height - 0.22) / 0.5))
    top = np.array([70, 130, 220]) * (1 - dusk) + np.array([40, 30, 90]) * dusk
    bottom = np.array([190, 225, 250]) * (1 - dusk) + np.array([250, 150, 80]) * dusk
    sky = (top * (1 - y) + bottom * y) * np.ones((1, width, 1))
    image = Image.fromarray(sky.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    w, h = width / 640, height / 480  # drawn on a 640x480 grid, scaled
    sun_x, sun_y, r = 500 * w, sun_height * height, 38 * w
    draw.ellipse([sun_x - r, sun_y - r, sun_x + r, sun_y + r], fill=(255, 215, 90))
    for base, amplitude, colour in ((300, 40, (90, 150, 80)), (340, 30, (60, 125, 55))):
        ridge = [(x * w, (base + amplitude * math.sin(x / 90 + base)) * h) for x in range(0, 641, 8)]
        draw.polygon(ridge + [(width, height), (0, height)], fill=colour)
    draw.rectangle([150 * w, 280 * h, 290 * w, 380 * h], fill=(200, 70, 60))  # house
    draw.polygon([(135 * w, 285 * h), (220 * w, 215 * h), (305 * w, 285 * h)], fill=(110, 50, 40))  # roof
    draw.rectangle([205 * w, 325 * h, 235 * w, 380 * h], fill=(90, 60, 40))  # door
    draw.rectangle([165 * w, 300 * h, 195 * w, 325 * h], fill=(170, 210, 240))  # window
    draw.rectangle([445 * w, 290 * h, 465 * w, 390 * h], fill=(100, 70, 40))  # trunk
    draw.ellipse([405 * w, 200 * h, 505 * w, 310 * h], fill=(40, 110, 45))  # crown
    return image.filter(ImageFilter.SMOOTH)


def write_video(path: pathlib.Path, frames: list[Image.Image], fps: int) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 300_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())


if __name__ == "__main__":
    draw_scene(512, 384).save(HERE / "sample.jpg", quality=85)
    write_video(HERE / "sample.mp4", [draw_scene(192, 144, 0.22 + 0.04 * i) for i in range(16)], fps=8)
