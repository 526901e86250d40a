"""Why a local path cannot be used, in words: missing, a symlink loop, a broken symlink, a directory, unreadable.

Every entry point that takes a file or directory from the user (the CLI's ``--image`` / ``--video`` /
``--input`` / ``--prompt-file``, checkpoint directories, batch outputs) names the problem through these
helpers, so "does not exist" is only ever said of a path that does not exist.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

MISSING = "does not exist"
# path_problem's words for a path that is simply not there (nothing to follow, nothing in the way).
NOT_THERE = (MISSING, "does not exist (a component of it is a file, not a directory)",
             "is too long a name for this file system")
BROKEN_SYMLINK = "is a broken symlink"
DIRECTORY = "is a directory, not a file"
UNREADABLE = "is not readable (permission denied)"


class NotUTF8Error(ValueError):
    """Text input (a prompt file, a requests line) that is not valid UTF-8."""


class PromptError(ValueError):
    """A prompt that cannot be used: empty, or command-line text that is not UTF-8."""


def path_problem(path: str | os.PathLike) -> str | None:
    """``None`` when ``path`` exists (following symlinks), else what is wrong with it, e.g. ``"is a symlink loop"``.

    The text completes a sentence that starts with the path: ``f"image {path!r} {problem}"``; it is one of
    :data:`NOT_THERE` when the path is simply not there.
    """
    try:
        os.stat(path)
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symlink loop (or goes through one)"
        if err.errno == errno.ENOTDIR:
            return NOT_THERE[1]
        if err.errno == errno.EACCES:
            return "cannot be reached (permission denied on a directory on the way)"
        if err.errno == errno.ENAMETOOLONG:
            return NOT_THERE[2]
        if os.path.islink(path):
            return f"{BROKEN_SYMLINK} (it points to {os.readlink(path)!r}, which does not exist)"
        if err.errno == errno.ENOENT:
            return MISSING
        return f"cannot be accessed: {err.strerror}"


def file_problem(path: str | os.PathLike) -> str | None:
    """``None`` when ``path`` is a readable regular file, else what is wrong with it: :func:`path_problem`'s
    words, :data:`DIRECTORY`, ``"is not a regular file"`` (a device, a pipe) or :data:`UNREADABLE`."""
    problem = path_problem(path)
    if problem is not None:
        return problem
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        return DIRECTORY
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    if not os.access(path, os.R_OK):
        return UNREADABLE
    return None


def check_file(path: str | os.PathLike, what: str) -> str:
    """``path`` (as a string) if it is a readable regular file, else an ``OSError`` subclass naming ``what`` it
    should have been and why it is not (missing, symlink loop, directory, device, unreadable)."""
    path = os.fspath(path)
    problem = file_problem(path)
    if problem is None:
        return path
    error = {DIRECTORY: IsADirectoryError, UNREADABLE: PermissionError}.get(problem, FileNotFoundError)
    raise error(f"{what} {path!r} {problem}")


def check_directory(path: str | os.PathLike, what: str) -> str:
    """``path`` if it is an existing directory, else an ``OSError`` subclass naming ``what`` and the problem."""
    path = os.fspath(path)
    problem = path_problem(path)
    if problem is not None:
        raise FileNotFoundError(f"{what} {path!r} {problem}")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{what} {path!r} is a file, not a directory")
    return path


def read_text(path: str | os.PathLike, what: str) -> str:
    """The whole of a UTF-8 text file (checked with :func:`check_file`); invalid UTF-8 is a :class:`NotUTF8Error`."""
    with open(check_file(path, what), "rb") as f:
        return decode_utf8(f.read(), f"{what} {os.fspath(path)!r}")


def decode_utf8(data: bytes, where: str) -> str:
    """``data`` as text; invalid UTF-8 is a :class:`NotUTF8Error` naming ``where`` and the offending byte's offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise NotUTF8Error(f"{where} is not valid UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}: "
                           f"{err.reason})") from None


def read_prompt(prompt: str | None, prompt_file: str | None) -> str | None:
    """The prompt given as ``--prompt TEXT`` or ``--prompt-file PATH`` (``-`` = stdin; one final newline is
    dropped), or None when neither is given. Text that is not valid UTF-8 (:class:`NotUTF8Error`, or a
    :class:`PromptError` for argv text) or only whitespace (:class:`PromptError`) is an error naming where it
    came from; a file that cannot be read is an ``OSError`` (:func:`check_file`)."""
    if prompt_file is None:
        if prompt is None:
            return None
        text, where = prompt, "--prompt"
        try:
            text.encode("utf-8")  # argv bytes that are not UTF-8 arrive as lone surrogates
        except UnicodeEncodeError:
            raise PromptError("--prompt is not valid UTF-8 text") from None
    else:
        if prompt_file == "-":
            text, where = decode_utf8(sys.stdin.buffer.read(), "the prompt on stdin"), "the prompt on stdin"
        else:
            text, where = read_text(prompt_file, "prompt file"), f"prompt file {prompt_file!r}"
        text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    if not text.strip():
        raise PromptError(f"{where} is empty")
    return text
