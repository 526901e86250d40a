"""Video frames do not depend on the decoder (dmlc/decord #108), and Ctrl-C while decoding prints no worker
traceback. The reference is transformers' own video reader (``transformers.video_utils.load_video``, PyAV)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import av
import numpy as np
import pytest
from transformers.video_utils import load_video as reference_load_video

from ov_jax.processing import video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_video(path, height, width, codec="mpeg4", pix_fmt="yuv420p", num_frames=12):
    rng = np.random.default_rng(height * 1000 + width)
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for index in range(num_frames):
            frame = np.stack([(x * 255 // width + 20 * index) % 256, y * 255 // height, (x + y + 7 * index) % 256], -1)
            frame = np.clip(frame + rng.integers(-30, 31, frame.shape), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def _stop_workers():
    yield
    video.shutdown_decord_workers()


@pytest.mark.parametrize("height, width", [(63, 81), (65, 80), (64, 81), (64, 80)])
@pytest.mark.parametrize("num_frames", [None, 5])
def test_frames_equal_transformers_whatever_the_height(tmp_path, height, width, num_frames):
    path = write_video(tmp_path / f"clip_{height}x{width}.mp4", height, width)
    expected, _ = reference_load_video(path, num_frames=num_frames, backend="pyav")
    frames, meta = video.load_video(path, num_frames=num_frames)
    assert frames.shape == expected.shape == (num_frames or 12, height, width, 3)
    np.testing.assert_array_equal(frames, expected)
    assert meta.video_backend == ("decord" if height % 2 == 0 else "pyav")
    assert video.decord_matches_pyav(path) == (height % 2 == 0)


def test_decord_differs_on_odd_heights_which_is_why_it_is_not_used_there(tmp_path):
    """The measurement behind decord_matches_pyav: decord's own frames of the odd-height file are far off."""
    odd = write_video(tmp_path / "odd.mp4", 63, 81)
    by_decord, _ = video.load_video(odd, backend="decord")
    by_pyav, _ = video.load_video(odd, backend="pyav")
    difference = np.abs(by_decord.astype(int) - by_pyav).max()
    assert difference > 20, difference
    full_chroma = write_video(tmp_path / "yuv444.mp4", 63, 81, codec="libx264", pix_fmt="yuv444p")
    assert video.decord_matches_pyav(full_chroma)
    np.testing.assert_array_equal(video.load_video(full_chroma, backend="decord")[0],
                                  video.load_video(full_chroma, backend="pyav")[0])


INTERRUPTED_SCRIPT = textwrap.dedent("""
    import faulthandler, signal, sys, time
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for the stacks if it hangs
    from ov_jax.processing import video
    handler, blocked = signal.getsignal(signal.SIGINT), signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    if handler is not signal.default_int_handler or blocked:  # inherited from the test process: Ctrl-C cannot work
        sys.exit(f"SIGINT cannot reach this process: handler {handler!r}, blocked {blocked}")
    try:
        print("decoding", flush=True)
        while True:  # decoding, then a pause with the decord worker idle: Ctrl-C lands in either
            video.load_video(sys.argv[1], backend=sys.argv[2])
            print("decoded", flush=True)
            time.sleep(0.1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
""")


def test_decord_worker_is_out_of_reach_of_the_terminals_ctrl_c(tmp_path):
    """The worker runs in its own process group, so a terminal's SIGINT (sent to the foreground group) reaches
    only the parent, which then kills the worker."""
    video.load_video(write_video(tmp_path / "clip.mp4", 64, 80), backend="decord")
    worker_pids = [worker.process.pid for worker in video._idle_workers]
    assert worker_pids and all(os.getpgid(pid) != os.getpgid(0) for pid in worker_pids)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_ctrl_c_while_decoding_prints_no_traceback(tmp_path, backend):
    """SIGINT to the whole process group (what a terminal's Ctrl-C does) while frames are being decoded."""
    path = write_video(tmp_path / "long.mp4", 240, 320, num_frames=150)
    process = subprocess.Popen([sys.executable, "-c", INTERRUPTED_SCRIPT, path, backend], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO},
                               process_group=0)
    try:
        assert process.stdout.readline() == "decoding\n", process.communicate(timeout=60)
        time.sleep(1.5)  # several decodes in, the worker (decord) busy
        os.killpg(process.pid, signal.SIGINT)
        try:
            _, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGUSR1)  # faulthandler: every thread's Python stack to stderr
            time.sleep(2)
            process.kill()
            stdout, stderr = process.communicate(timeout=30)
            pytest.fail(f"still running 60 s after SIGINT ({stdout.count('decoded')} decodes done; a number that "
                        f"kept growing means the interrupt was lost); its stderr and stacks:\n{stderr}")
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.strip() == "interrupted", stderr


LOST_INTERRUPT_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from ov_jax.processing import video

    def ctrl_c_in_import_callback(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "cb" and "importlib" in frame.f_code.co_filename:
            sys.settrace(None)
            print("sent", flush=True)
            os.kill(os.getpid(), signal.SIGINT)

    sys.settrace(ctrl_c_in_import_callback)
    try:
        video.load_video(sys.argv[1], backend="pyav")
        print("decoded", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
""")


def test_ctrl_c_during_the_pyav_import_is_not_lost(tmp_path):
    """The first PyAV decode imports av; a SIGINT handled inside the import machinery's weakref callback (where
    CPython prints "Exception ignored" and drops the KeyboardInterrupt) used to be lost, so the decode went on.
    Here it lands there every time: the trace hook sends it when ``_get_module_lock``'s callback starts."""
    path = write_video(tmp_path / "clip.mp4", 64, 80)
    result = subprocess.run([sys.executable, "-c", LOST_INTERRUPT_SCRIPT, path], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert result.stdout.splitlines() == ["sent", "interrupted"], (result.stdout, result.stderr)
    assert "KeyboardInterrupt" not in result.stderr, result.stderr
