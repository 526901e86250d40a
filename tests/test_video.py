"""Video decoding (decord / PyAV / fallbacks), frame sampling and frame preprocessing.

Videos are written by the tests with PyAV; frame ``i`` carries its index as a flat colour in the top
half (red = 8*i) and gradients plus sharp stripes in the bottom half. The reference for sampling is
transformers' ``default_sample_indices_fn``. The reference for frame resizing is the exact torch
call transformers' video processor reaches through torchvision's ``resize_image`` on CPU uint8
input: ``torch.nn.functional.interpolate(uint8 [F,3,H,W], size, mode="bicubic", align_corners=False,
antialias=True)`` (torchvision itself is not installable here; the call is reproduced from
torchvision/transforms/v2/functional/_geometry.py), then torchvision's normalize with
mean*255 and std*255.
"""

import math
import os
import sys
import time

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers.video_utils import VideoMetadata as HFVideoMetadata
from transformers.video_utils import default_sample_indices_fn

from ov_jax.processing import video

NUM_FRAMES, HEIGHT, WIDTH, FPS = 30, 96, 160, 10


def make_frame(index, height=HEIGHT, width=WIDTH):
    y, x = np.mgrid[0:height, 0:width]
    frame = np.empty((height, width, 3), np.uint8)
    frame[: height // 2] = (8 * index, 255 - 8 * index, 128)
    bottom = slice(height // 2, height)
    frame[bottom, :, 0] = (x[bottom] * 255 // (width - 1)).astype(np.uint8)
    frame[bottom, :, 1] = np.where((x[bottom] // 3 + index) % 2 == 0, 230, 20)
    frame[bottom, :, 2] = (y[bottom] * 2).astype(np.uint8)
    return frame


def frame_index(frame):
    """The index a decoded test frame carries (robust to a few levels of compression error)."""
    red = frame[8 : HEIGHT // 2 - 8, 8:-8, 0].astype(np.float64).mean()
    return int(round(red / 8))


def write_video(path, codec, num_frames=NUM_FRAMES, options=None, pix_fmt="yuv420p"):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, pix_fmt
        stream.options = options or {}
        stream.bit_rate = 4_000_000  # high enough that the index colour survives every codec
        for index in range(num_frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(make_frame(index), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def has_encoder(name):
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:
        return False


CODECS = {  # file name -> (encoder, pixel format); decord and PyAV must agree on all of these
    "h264.mp4": ("libx264", "yuv420p"),
    "mpeg4.mp4": ("mpeg4", "yuv420p"),
    "vp9.webm": ("libvpx-vp9", "yuv420p"),
    "mjpeg.avi": ("mjpeg", "yuvj420p"),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    paths = {name: write_video(folder / name, codec, pix_fmt=fmt) for name, (codec, fmt) in CODECS.items() if has_encoder(codec)}
    if has_encoder("libsvtav1"):
        paths["av1.mkv"] = write_video(folder / "av1.mkv", "libsvtav1")
    yield paths
    video.shutdown_decord_workers()


# ---------------------------------------------------------------------------------------------
# Sampling


def reference_indices(total, num_frames=None, fps=None, video_fps=None):
    return default_sample_indices_fn(HFVideoMetadata(total_num_frames=total, fps=video_fps), num_frames=num_frames, fps=fps)


def test_uniform_sampling_matches_transformers():
    checked = 0
    for total in list(range(1, 130)) + [299, 300, 301, 1000, 1799, 10007]:
        for num_frames in sorted({1, 2, 3, 7, 8, 16, 31, 32, 64, total // 2, total - 1, total} - {0}):
            if num_frames > total:
                continue
            ours = video.sample_frame_indices(total, num_frames=num_frames)
            np.testing.assert_array_equal(ours, reference_indices(total, num_frames=num_frames))
            assert ours.dtype == np.int64 and len(ours) == num_frames
            checked += 1
        np.testing.assert_array_equal(video.sample_frame_indices(total), reference_indices(total))
    assert checked > 1000


def test_fps_sampling_matches_transformers_including_its_errors():
    agreed = raised = 0
    for total in [1, 2, 5, 29, 30, 31, 100, 241, 1000, 4321]:
        for video_fps in [0.5, 1.0, 7.5, 10.0, 23.976, 24.0, 25.0, 29.97, 30.0, 59.94, 60.0, 120.0]:
            for fps in [0.1, 0.25, 0.5, 1, 1.0, 2, 3.3, 8, 24, 30, 60]:
                try:
                    expected = reference_indices(total, fps=fps, video_fps=video_fps)
                except ValueError:
                    with pytest.raises(ValueError, match="total_frames"):
                        video.sample_frame_indices(total, fps=fps, video_fps=video_fps)
                    raised += 1
                    continue
                ours = video.sample_frame_indices(total, fps=fps, video_fps=video_fps)
                np.testing.assert_array_equal(ours, expected)
                agreed += 1
    assert agreed > 500 and raised > 50


def test_sampling_errors():
    with pytest.raises(ValueError, match="mutually exclusive"):
        video.sample_frame_indices(30, num_frames=4, fps=1.0, video_fps=10.0)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="num_frames must be >= 1"):
            video.sample_frame_indices(30, num_frames=bad)
    for bad in (2.5, True, "8"):
        with pytest.raises(TypeError, match="num_frames must be an integer"):
            video.sample_frame_indices(30, num_frames=bad)
    for bad in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="fps must be a positive"):
            video.sample_frame_indices(30, fps=bad, video_fps=10.0)
    with pytest.raises(ValueError, match="no frames"):
        video.sample_frame_indices(0)
    with pytest.raises(ValueError, match="video_fps"):
        video.sample_frame_indices(30, fps=1.0)
    with pytest.raises(ValueError, match="only total_frames=30"):
        video.sample_frame_indices(30, num_frames=31)
    assert video.sample_frame_indices(np.int64(10), num_frames=np.int32(5)).tolist() == [0, 2, 4, 6, 8]


# ---------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("name", sorted(CODECS))
def test_decord_and_pyav_decode_identical_frames(videos, name):
    if name not in videos:
        pytest.skip(f"PyAV here has no {CODECS[name][0]} encoder")
    for num_frames in (8, None):
        by_decord, meta_decord = video.load_video(videos[name], num_frames=num_frames, backend="decord")
        by_pyav, meta_pyav = video.load_video(videos[name], num_frames=num_frames, backend="pyav")
        assert (meta_decord.video_backend, meta_pyav.video_backend) == ("decord", "pyav")
        expected_indices = reference_indices(NUM_FRAMES, num_frames=num_frames, video_fps=float(FPS))
        for meta in (meta_decord, meta_pyav):
            np.testing.assert_array_equal(meta.frames_indices, expected_indices)
            assert (meta.total_num_frames, meta.fps, meta.duration) == (NUM_FRAMES, FPS, NUM_FRAMES / FPS)
            assert (meta.height, meta.width) == (HEIGHT, WIDTH)
        assert by_decord.shape == (len(expected_indices), HEIGHT, WIDTH, 3) and by_decord.dtype == np.uint8
        np.testing.assert_array_equal(by_decord, by_pyav)
        assert [frame_index(frame) for frame in by_pyav] == expected_indices.tolist()


def test_default_backend_is_decord_and_fps_sampling(videos):
    frames, meta = video.load_video(videos["h264.mp4"], fps=2)
    assert meta.video_backend == "decord"
    expected = reference_indices(NUM_FRAMES, fps=2, video_fps=float(FPS))
    assert meta.frames_indices.tolist() == expected.tolist() == [0, 5, 10, 15, 20, 25]
    assert [frame_index(frame) for frame in frames] == expected.tolist()


def test_av1_which_decord_cannot_open_falls_back_to_pyav(videos, caplog):
    if "av1.mkv" not in videos:
        pytest.skip("PyAV here has no AV1 encoder")
    frames, meta = video.load_video(videos["av1.mkv"], num_frames=6)
    assert meta.video_backend == "pyav" and meta.total_num_frames == NUM_FRAMES  # counted from packets: mkv has no count
    assert [frame_index(frame) for frame in frames] == meta.frames_indices.tolist() == [0, 5, 10, 15, 20, 25]
    assert "decord could not decode" in caplog.text
    with pytest.raises(video.DecordUnusable, match="cannot open"):
        video.load_video(videos["av1.mkv"], num_frames=6, backend="decord")


def test_falls_back_to_pyav_when_decord_is_not_installed(videos, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # blocks the import, as if decord were absent
    frames, meta = video.load_video(videos["h264.mp4"], num_frames=4)
    assert meta.video_backend == "pyav"
    assert [frame_index(frame) for frame in frames] == [0, 7, 15, 22]
    with pytest.raises(ImportError, match="decord is not installed"):
        video.load_video(videos["h264.mp4"], num_frames=4, backend="decord")


FAKE_DECORD = """
import os, time
def cpu(index):
    return index
class VideoReader:
    def __init__(self, path, ctx=None):
        pass
    def __len__(self):
        return 30
    def get_avg_fps(self):
        return 10.0
    def get_batch(self, indices):
        with open({pid_file!r}, "w") as handle:
            handle.write(str(os.getpid()))
        {action}
"""


@pytest.fixture
def fake_decord(tmp_path, monkeypatch):
    """Install a decord look-alike for the worker processes (they inherit PYTHONPATH)."""

    def install(action):
        package = tmp_path / "fake" / "decord"
        package.mkdir(parents=True)
        pid_file = tmp_path / "worker.pid"
        (package / "__init__.py").write_text(FAKE_DECORD.format(pid_file=str(pid_file), action=action))
        monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
        video.shutdown_decord_workers()  # idle workers hold the real decord
        return pid_file

    yield install
    video.shutdown_decord_workers()


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_hanging_decord_is_abandoned_after_the_timeout(videos, fake_decord, caplog):
    pid_file = fake_decord("time.sleep(3600)")
    started = time.monotonic()
    frames, meta = video.load_video(videos["h264.mp4"], num_frames=4, timeout_s=3.0)
    elapsed = time.monotonic() - started
    assert meta.video_backend == "pyav" and [frame_index(frame) for frame in frames] == [0, 7, 15, 22]
    assert 3.0 <= elapsed < 20.0
    assert "took longer than timeout_s=3.0" in caplog.text
    assert not process_exists(int(pid_file.read_text()))  # the hung worker was killed and reaped
    with pytest.raises(video.DecordUnusable, match="took longer"):
        video.load_video(videos["h264.mp4"], num_frames=4, timeout_s=2.0, backend="decord")


def test_crashing_decord_falls_back_to_pyav(videos, fake_decord, caplog):
    fake_decord("os._exit(3)")
    frames, meta = video.load_video(videos["h264.mp4"], num_frames=4, timeout_s=30.0)
    assert meta.video_backend == "pyav" and [frame_index(frame) for frame in frames] == [0, 7, 15, 22]
    assert "exited unexpectedly (exit code 3)" in caplog.text


def test_decord_workers_are_reused(videos):
    video.shutdown_decord_workers()
    video.load_video(videos["h264.mp4"], num_frames=2)
    assert len(video._idle_workers) == 1
    first = video._idle_workers[0].process.pid
    video.load_video(videos["mpeg4.mp4"], num_frames=2)
    assert [worker.process.pid for worker in video._idle_workers] == [first]


def test_file_announcing_more_frames_than_it_holds(tmp_path):
    """A truncated AVI whose header still announces 30 frames: PyAV samples from the frames that decode."""
    full = write_video(tmp_path / "full.avi", "mpeg4")
    data = open(full, "rb").read()
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(data[: int(len(data) * 0.8)])
    with av.open(str(truncated)) as container:
        announced = container.streams.video[0].frames
        decodable = sum(1 for _ in container.decode(video=0))
    assert announced == NUM_FRAMES and 0 < decodable < NUM_FRAMES
    frames, meta = video.load_video(truncated, backend="pyav")
    assert meta.total_num_frames == decodable == len(frames)
    assert [frame_index(frame) for frame in frames] == list(range(decodable))


def test_file_errors(tmp_path, videos):
    with pytest.raises(FileNotFoundError, match="missing.mp4' does not exist"):
        video.load_video(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="is a directory"):
        video.load_video(str(tmp_path))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all " * 100)
    with pytest.raises(ValueError, match="cannot read video .*junk.mp4"):
        video.load_video(junk)
    empty = tmp_path / "empty.avi"
    with av.open(str(empty), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    with pytest.raises(ValueError, match="has no video frames"):
        video.load_video(empty)
    audio_only = tmp_path / "audio.m4a"
    with av.open(str(audio_only), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for index in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, index * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(ValueError, match="no video stream"):
        video.load_video(audio_only)
    with pytest.raises(ValueError, match="URLs are not supported"):
        video.load_video("https://example.com/video.mp4")
    for backend in ("pyav", "decord"):  # the error names the video (a batch holds many)
        with pytest.raises(ValueError, match=r"video '.*h264.mp4': asked for 31 frames .*only total_frames=30"):
            video.load_video(videos["h264.mp4"], num_frames=31, backend=backend)
    with pytest.raises(ValueError, match="mutually exclusive"):
        video.load_video(videos["h264.mp4"], num_frames=4, fps=1)
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        video.load_video(videos["h264.mp4"], num_frames=0)
    with pytest.raises(ValueError, match="backend must be"):
        video.load_video(videos["h264.mp4"], backend="opencv")
    with pytest.raises(ValueError, match="timeout_s"):
        video.load_video(videos["h264.mp4"], timeout_s=0)


# ---------------------------------------------------------------------------------------------
# Frames given directly


def test_frame_arrays_and_pil_lists_are_accepted():
    frames = np.stack([make_frame(index) for index in range(10)])
    as_given, meta = video.load_video(frames)
    np.testing.assert_array_equal(as_given, frames)
    assert (meta.video_backend, meta.total_num_frames, meta.fps) == ("frames", 10, None)
    sampled, meta = video.load_video(frames, num_frames=4)
    np.testing.assert_array_equal(sampled, frames[[0, 2, 5, 7]])
    assert meta.frames_indices.tolist() == [0, 2, 5, 7] and meta.total_num_frames == 10
    from_pil, _ = video.load_video([Image.fromarray(frame) for frame in frames], num_frames=4)
    np.testing.assert_array_equal(from_pil, sampled)
    from_list, _ = video.load_video(list(frames))
    np.testing.assert_array_equal(from_list, frames)


def test_frame_conversions():
    gray = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
    converted, _ = video.load_video(gray)
    np.testing.assert_array_equal(converted, np.repeat(gray[..., None], 3, axis=-1))
    rgba = np.zeros((1, 2, 2, 4), np.uint8)
    rgba[..., :3] = 100
    rgba[0, 0, 0, 3], rgba[0, 0, 1, 3], rgba[0, 1, :, 3] = 0, 255, 128
    converted, _ = video.load_video(rgba)
    assert converted[0, 0, 0].tolist() == [255] * 3 and converted[0, 0, 1].tolist() == [100] * 3
    assert converted[0, 1, 0].tolist() == [round(127 / 255 * 255 + 128 / 255 * 100)] * 3
    pil_rgba = Image.fromarray(rgba[0], "RGBA")
    via_pil, _ = video.load_video([pil_rgba, Image.fromarray(gray[0], "L").resize((2, 2))])
    assert via_pil[0, 0, 0].tolist() == [255] * 3 and via_pil.shape == (2, 2, 2, 3)


def test_frame_errors():
    with pytest.raises(ValueError, match="empty frame list"):
        video.load_video([])
    with pytest.raises(ValueError, match="same size"):
        video.load_video([make_frame(0), make_frame(0, height=50)])
    with pytest.raises(TypeError, match="uint8"):
        video.load_video(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="channels-last"):
        video.load_video(np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"\[F, H, W, C\]"):
        video.load_video(np.zeros((8, 8), np.uint8))
    with pytest.raises(TypeError, match="a video must be"):
        video.load_video(42)
    with pytest.raises(ValueError, match="no frame rate"):
        video.load_video(np.zeros((4, 8, 8, 3), np.uint8), fps=1)
    with pytest.raises(ValueError, match="only total_frames=4"):
        video.load_video(np.zeros((4, 8, 8, 3), np.uint8), num_frames=5)


# ---------------------------------------------------------------------------------------------
# Frame preprocessing against transformers' torch path

SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def content(kind, height, width, seed=0):
    """Test pictures: smooth gradients, pure noise, dark text on white, and smooth texture plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    if kind == "gradient":
        picture = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), (x + y) / (height + width)], -1) * 255
    elif kind == "noise":
        picture = rng.integers(0, 256, (height, width, 3))
    elif kind == "text":
        image = Image.new("RGB", (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        for row in range(0, height, 12):
            draw.text((2 + row % 7, row), "The quick brown fox 0123456789 jumps over" * 3, fill=(0, 0, 0))
        draw.rectangle([width // 4, height // 4, width // 2, height // 2], outline=(255, 0, 0), width=1)
        picture = np.asarray(image)
    else:
        waves = np.sin(x / 17.0) * np.cos(y / 23.0)
        picture = 127 + 60 * waves[..., None] + rng.normal(0, 8, (height, width, 3))
    return np.clip(np.round(picture), 0, 255).astype(np.uint8)


def transformers_video_path(frames, mean, std, size=384):
    """transformers' LlavaOnevisionVideoProcessor on CPU: uint8 antialiased bicubic, then fused normalize."""
    tensor = torch.from_numpy(frames).contiguous().permute(0, 3, 1, 2).contiguous()
    if tensor.shape[-2:] != (size, size):  # torchvision returns the input untouched at the target size
        tensor = torch.nn.functional.interpolate(tensor, size=[size, size], mode="bicubic", align_corners=False, antialias=True)
    resized = tensor.permute(0, 2, 3, 1).numpy()
    mean = (torch.tensor(mean) * (1.0 / (1 / 255))).view(-1, 1, 1)
    std = (torch.tensor(std) * (1.0 / (1 / 255))).view(-1, 1, 1)
    return resized, tensor.to(torch.float32).sub_(mean).div_(std).numpy()


SOURCE_SIZES = [(64, 96), (240, 320), (300, 1000), (384, 384), (480, 640), (720, 1280), (1080, 1920)]
KINDS = ["gradient", "noise", "text", "natural"]


def resize_differences():
    """Per (size, kind): our PIL-resized uint8 frame against transformers' torch-resized one."""
    rows = []
    for height, width in SOURCE_SIZES:
        for kind in KINDS:
            frames = content(kind, height, width)[None]
            ours = video.preprocess_video_frames(frames, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
            ours_uint8 = np.stack([np.asarray(Image.fromarray(f).resize((384, 384), Image.BICUBIC)) for f in frames])
            reference_uint8, reference = transformers_video_path(frames, SIGLIP_MEAN, SIGLIP_STD)
            levels = np.abs(ours_uint8.astype(np.int16) - reference_uint8)
            rows.append(
                dict(size=(height, width), kind=kind, max_levels=int(levels.max()), mean_levels=float(levels.mean()),
                     fraction=float((levels > 0).mean()), max_normalized=float(np.abs(ours - reference).max()),
                     mean_normalized=float(np.abs(ours - reference).mean()))
            )
    return rows


def test_resize_difference_from_transformers_torch_path_is_bounded(capsys):
    rows = resize_differences()
    with capsys.disabled():
        print("\nsize        kind      max_lv  mean_lv  frac_px   max_norm  mean_norm")
        for row in rows:
            print(f"{str(row['size']):11s} {row['kind']:9s} {row['max_levels']:6d}  {row['mean_levels']:.5f}  "
                  f"{row['fraction']:.5f}  {row['max_normalized']:.5f}   {row['mean_normalized']:.6f}")
    for row in rows:
        # one uint8 level is 1/127.5 in normalized units with std 0.5; float32 rounding adds ~1e-7
        assert row["max_levels"] <= 2 and row["fraction"] < 0.01, row
        assert row["max_normalized"] <= row["max_levels"] / 127.5 + 1e-6, row
        if row["size"] == (384, 384):
            assert row["max_normalized"] == 0.0, row  # no resize: identical to the last bit
    assert any(row["max_levels"] > 0 for row in rows)  # the comparison can see a difference


@pytest.mark.parametrize("mean,std", [(SIGLIP_MEAN, SIGLIP_STD), (CLIP_MEAN, CLIP_STD)])
def test_normalization_is_bitwise_transformers_fused_path(mean, std):
    frames = np.stack([content(kind, 384, 384, seed) for seed, kind in enumerate(KINDS)])
    frames[0, 0, :256, 0] = np.arange(256)  # every uint8 value
    ours = video.preprocess_video_frames(frames, image_mean=mean, image_std=std)
    _, reference = transformers_video_path(frames, mean, std)
    assert ours.dtype == np.float32 and ours.shape == (4, 3, 384, 384)
    np.testing.assert_array_equal(ours, reference)
    # The unfused order of the image processor (float32(u8 * 1/255 in float64), then (x - mean) / std)
    # differs from the fused one only by float32 rounding.
    rescaled = (frames.transpose(0, 3, 1, 2).astype(np.float64) * (1 / 255)).astype(np.float32)
    unfused = (rescaled - np.float32(mean)[:, None, None]) / np.float32(std)[:, None, None]
    assert 0 < np.abs(unfused - ours).max() <= 5e-7


def test_preprocess_resizes_each_frame_with_pil():
    frames = np.stack([content("natural", 90, 200, seed) for seed in range(3)])
    out = video.preprocess_video_frames(frames, size=(64, 48), image_mean=0.5, image_std=0.5, resample=3)
    expected = np.stack([np.asarray(Image.fromarray(frame).resize((48, 64), Image.BICUBIC)) for frame in frames])
    np.testing.assert_array_equal(out, (expected.transpose(0, 3, 1, 2).astype(np.float32) - 127.5) / 127.5)
    bilinear = video.preprocess_video_frames(frames, size=64, image_mean=0.5, image_std=0.5, resample="bilinear")
    assert bilinear.shape == (3, 3, 64, 64) and not np.array_equal(bilinear[:, :, :, :48], out)


def test_preprocess_errors():
    frames = np.zeros((1, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="resample"):
        video.preprocess_video_frames(frames, image_mean=0.5, image_std=0.5, resample="cubic-ish")
    with pytest.raises(ValueError, match="image_mean"):
        video.preprocess_video_frames(frames, image_mean=[0.5, 0.5], image_std=0.5)
    with pytest.raises(ValueError, match="zeros"):
        video.preprocess_video_frames(frames, image_mean=0.5, image_std=[0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match="size"):
        video.preprocess_video_frames(frames, size=0, image_mean=0.5, image_std=0.5)
    with pytest.raises(TypeError):
        video.preprocess_video_frames(frames)  # mean/std have no defaults: the class defaults are a known pitfall
