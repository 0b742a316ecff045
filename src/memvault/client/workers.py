"""Derivatives made in worker processes, so decoding never stalls the event loop (lane A).

Workers are ``derive_worker`` child processes, started on first use and kept for the
client's life (a start plus Pillow's import costs ~0.3 s, paid once per client, not per
file). Each decode has a wall-clock limit, enforced by killing its process, and each worker's
address space is capped, so a hostile or broken image costs that one call, never the upload
or the client. Cancelling a call kills its worker too (a C decoder cannot be interrupted).
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import sys
from collections import deque

from memvault.client.derive_worker import _HEADER, frame
from memvault.derivatives import DerivativeSet


class WorkerDied(RuntimeError):
    """The worker process exited mid-decode (killed for its memory, or a decoder crash)."""


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stderr: deque[bytes] = deque(maxlen=20)
        self.drain = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.stderr.append(line)

    async def call(self, path: str) -> object:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(frame(path))
        await self.proc.stdin.drain()
        header = await self.proc.stdout.readexactly(_HEADER.size)
        (length,) = _HEADER.unpack(header)
        return pickle.loads(await self.proc.stdout.readexactly(length))

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()
        await asyncio.gather(self.drain, return_exceptions=True)

    def why(self) -> str:
        code = self.proc.returncode
        how = f"was killed by signal {-code}" if code is not None and code < 0 \
            else f"exited with {code}"
        tail = b"".join(self.stderr).decode("utf-8", "replace").strip()
        return f"the derivative worker {how}" + (f": {tail[-800:]}" if tail else "")


class DerivativeWorkers:
    def __init__(self, *, workers: int = 1, timeout: float = 120.0,
                 memory_limit: int = 2 * 1024**3) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.timeout = timeout
        self.memory_limit = memory_limit
        self._slots = asyncio.Semaphore(workers)
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()

    async def _start(self) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "memvault.client.derive_worker", str(self.memory_limit),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        worker = _Worker(proc)
        self._all.add(worker)
        return worker

    async def make(self, path: str) -> DerivativeSet:
        """``make_derivatives(path)`` in a worker; raises what it raises (``Unsupported``,
        ``OSError``), ``TimeoutError`` past ``timeout``, ``WorkerDied`` if the process
        died."""
        async with self._slots:
            worker = self._idle.pop() if self._idle else await self._start()
            keep = False
            try:
                async with asyncio.timeout(self.timeout):
                    answer = await worker.call(path)
                keep = True
            except TimeoutError:
                raise TimeoutError(
                    f"making derivatives of {path} took longer than {self.timeout:g} s; "
                    "its worker was stopped") from None
            except (asyncio.IncompleteReadError, BrokenPipeError, ConnectionResetError) as exc:
                await worker.kill()
                raise WorkerDied(worker.why()) from exc
            finally:
                if keep:
                    self._idle.append(worker)
                else:
                    await asyncio.shield(self._retire(worker))
        status, value = answer if isinstance(answer, tuple) and len(answer) == 2 \
            else ("?", None)
        if status == "ok" and isinstance(value, DerivativeSet):
            return value
        if status == "error" and isinstance(value, Exception):
            raise value
        raise WorkerDied(f"the derivative worker answered {answer!r:.200}")

    async def _retire(self, worker: _Worker) -> None:
        self._all.discard(worker)
        await worker.kill()

    async def close(self) -> None:
        workers, self._all, self._idle = list(self._all), set(), []
        for worker in workers:
            if worker.proc.stdin is not None:
                worker.proc.stdin.close()
        for worker in workers:
            try:
                async with asyncio.timeout(5):
                    await worker.proc.wait()
            except TimeoutError:
                pass
            await worker.kill()
