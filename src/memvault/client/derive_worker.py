"""The derivative worker process: ``python -m memvault.client.derive_worker LIMIT``.

Reads requests from stdin and answers on stdout, each a 4-byte big-endian length and a
pickle: a request is the path of an original; an answer is ``("ok", DerivativeSet)`` or
``("error", exception)``. It is a plain child process rather than a multiprocessing one so
that starting it never re-imports the caller's ``__main__`` (a script without an
``if __name__ == "__main__"`` guard would otherwise start itself again). Only the SDK starts
it, and the pickles come from it.
"""

from __future__ import annotations

import os
import pickle
import resource
import signal
import struct
import sys
from typing import BinaryIO

_HEADER = struct.Struct(">I")


def read_message(stream: BinaryIO) -> object | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (length,) = _HEADER.unpack(header)
    body = stream.read(length)
    if len(body) < length:
        return None
    message: object = pickle.loads(body)  # from the SDK process that started this one
    return message


def frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def main() -> None:
    # Ctrl-C reaches the whole process group; the SDK decides what an interrupt means (an
    # app may well carry on) and ends this worker itself, by closing its stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    if limit > 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    requests = sys.stdin.buffer
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # nothing a library prints may corrupt the answers

    from memvault.derivatives import make_derivatives

    while True:
        path = read_message(requests)
        if path is None:
            return
        try:
            answer: tuple[str, object] = ("ok", make_derivatives(str(path)))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the SDK, typed
            try:
                pickle.dumps(exc)
            except (pickle.PicklingError, TypeError, AttributeError):
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            answer = ("error", exc)
        answers.write(frame(answer))
        answers.flush()


if __name__ == "__main__":
    main()
