import hashlib
import random
from collections.abc import Callable

import pytest

from memvault import hashing
from memvault.hashing import BACKEND, Sha256State, _BackendName, new_sha256

BACKENDS = [
    pytest.param(
        "openssl",
        marks=pytest.mark.skipif(
            "openssl" not in hashing._AVAILABLE, reason="libcrypto not loadable here"
        ),
    ),
    "rehashes",
]

Make = Callable[[], Sha256State]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> _BackendName:
    name: _BackendName = request.param
    return name


@pytest.fixture
def make(backend: _BackendName) -> Make:
    return lambda: Sha256State(_backend=backend)


def _payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _pieces(data: bytes, rng: random.Random, max_piece: int) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = rng.randint(0, max_piece)
        out.append(data[i : i + n])
        i += n
    return out


def test_default_backend_is_reported() -> None:
    assert BACKEND in {"openssl", "rehashes"}
    assert new_sha256().backend == BACKEND


@pytest.mark.parametrize("n", [0, 1, 55, 56, 63, 64, 65, 119, 120, 127, 128, 129, 1000])
def test_matches_hashlib_at_block_boundaries(make: Make, n: int) -> None:
    data = _payload(n, seed=n)
    s = make()
    s.update(data)
    assert s.digest() == hashlib.sha256(data).digest()
    assert s.hexdigest() == hashlib.sha256(data).hexdigest()
    assert s.length == n


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_pieces_of_a_few_mib(make: Make, seed: int) -> None:
    rng = random.Random(seed)
    data = _payload(3 * 1024 * 1024 + rng.randint(0, 4096), seed=seed)
    s = make()
    for piece in _pieces(data, rng, max_piece=rng.choice([7, 200, 70_000, 1_500_000])):
        s.update(piece)
    assert s.digest() == hashlib.sha256(data).digest()
    assert s.length == len(data)


def test_save_and_restore_at_many_split_points(make: Make) -> None:
    rng = random.Random(42)
    data = _payload(20_000, seed=42)
    expected = hashlib.sha256(data).digest()
    splits = sorted(
        {0, 1, 63, 64, 65, 128, len(data)} | {rng.randrange(len(data)) for _ in range(200)}
    )
    for split in splits:
        s = make()
        s.update(data[:split])
        restored = Sha256State.from_bytes(s.to_bytes())
        assert restored.length == split
        restored.update(data[split:])
        assert restored.digest() == expected, split


def test_restore_keeps_the_backend_layout(make: Make) -> None:
    s = make()
    s.update(b"x" * 100)
    blob = s.to_bytes()
    assert Sha256State.from_bytes(blob, _backend=s.backend).to_bytes() == blob
    # Some database drivers hand bytea columns back as memoryview.
    assert Sha256State.from_bytes(memoryview(blob), _backend=s.backend).to_bytes() == blob


def test_digest_does_not_disturb_state(make: Make) -> None:
    s = make()
    s.update(b"hello ")
    assert s.digest() == hashlib.sha256(b"hello ").digest()
    before = s.to_bytes()
    s.hexdigest()
    assert s.to_bytes() == before
    s.update(b"world")
    assert s.digest() == hashlib.sha256(b"hello world").digest()


def test_copy_is_independent(make: Make) -> None:
    s = make()
    s.update(b"a" * 70)
    c = s.copy()
    c.update(b"c")
    s.update(b"s")
    assert s.digest() == hashlib.sha256(b"a" * 70 + b"s").digest()
    assert c.digest() == hashlib.sha256(b"a" * 70 + b"c").digest()
    assert (s.length, c.length) == (71, 71)


def test_buffer_types(make: Make) -> None:
    data = _payload(300_000, seed=7)
    backing = bytearray(b"\0" * 5 + data + b"\0" * 5)
    inputs: list[bytes | bytearray | memoryview] = [
        data,
        bytearray(data),
        memoryview(data),
        memoryview(b"..." + data + b"...")[3:-3],  # read-only slice at an offset
        memoryview(backing)[5:-5],  # writable slice at an offset
        memoryview(bytearray(data)).cast("I"),  # non-byte format: hashed as raw bytes
    ]
    for buf in inputs:
        s = make()
        s.update(buf)
        assert s.digest() == hashlib.sha256(data).digest(), type(buf)
        assert s.length == len(data)
    # Once our own views are gone, update() must not have left an export behind, or the
    # bytearray could no longer be resized.
    del inputs, buf
    backing.extend(b"!")


def test_non_contiguous_buffer_is_rejected(make: Make) -> None:
    s = make()
    with pytest.raises((BufferError, TypeError)):
        s.update(memoryview(b"abcdef")[::2])


def test_empty_updates(make: Make) -> None:
    s = make()
    s.update(b"")
    s.update(bytearray())
    s.update(memoryview(b""))
    assert s.digest() == hashlib.sha256().digest()


@pytest.mark.parametrize("source", ["openssl", "rehashes"])
def test_state_is_translated_between_backends(make: Make, source: _BackendName) -> None:
    """A state saved by either backend resumes on either: the layouts are translated."""
    if source not in hashing._AVAILABLE:
        pytest.skip(f"{source} not available")
    data = _payload(10_000, seed=9)
    for split in (0, 1, 64, 100, 4095, 9999):
        s = Sha256State(_backend=source)
        s.update(data[:split])
        target = make().backend
        restored = Sha256State.from_bytes(s.to_bytes(), _backend=target)
        assert restored.backend == target
        assert restored.length == split
        restored.update(data[split:])
        assert restored.digest() == hashlib.sha256(data).digest()


def _valid_blob(backend: _BackendName) -> bytes:
    s = Sha256State(_backend=backend)
    s.update(b"q" * 70)
    return s.to_bytes()


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b[:1], id="tag-only"),
        pytest.param(lambda b: b[:-1], id="truncated"),
        pytest.param(lambda b: b + b"\0", id="too-long"),
        pytest.param(lambda b: b"\x00" + b[1:], id="tag-zero"),
        pytest.param(lambda b: b"\x7f" + b[1:], id="unknown-tag"),
        pytest.param(
            lambda b: bytes(b[0:1]) + random.Random(5).randbytes(len(b) - 1), id="garbage"
        ),
    ],
)
def test_from_bytes_rejects_bad_blobs(
    backend: _BackendName, mangle: Callable[[bytes], bytes]
) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the messages vary by cause
        Sha256State.from_bytes(mangle(_valid_blob(backend)))


def test_from_bytes_rejects_wrong_tag_for_layout() -> None:
    # Each tag names a layout of a fixed size; a body of the other layout's size is refused.
    with pytest.raises(ValueError, match="must be"):
        Sha256State.from_bytes(b"\x01" + b"\0" * hashing._REHASHES_FMT.size)
    with pytest.raises(ValueError, match="must be"):
        Sha256State.from_bytes(b"\x02" + b"\0" * hashing._OPENSSL_FMT.size)


def test_from_bytes_rejects_inconsistent_openssl_state() -> None:
    fmt = hashing._OPENSSL_FMT
    h = [0] * 8
    # 70 bytes hashed: one block compressed, 6 bytes buffered.
    restored = Sha256State.from_bytes(b"\x01" + fmt.pack(*h, 70 * 8, 0, b"q" * 64, 6, 32))
    assert restored.length == 70
    for nl, num, md_len in (
        (70 * 8, 6, 20),  # md_len is not 32
        (70 * 8, 64, 32),  # num past the block
        (70 * 8, 5, 32),  # num disagrees with the bit count
        (70 * 8 + 3, 6, 32),  # bit count is not a whole number of bytes
    ):
        with pytest.raises(ValueError, match="inconsistent"):
            Sha256State.from_bytes(b"\x01" + fmt.pack(*h, nl, 0, b"q" * 64, num, md_len))


def test_from_bytes_rejects_inconsistent_rehashes_state() -> None:
    fmt = hashing._REHASHES_FMT
    with pytest.raises(ValueError, match="inconsistent"):
        Sha256State.from_bytes(b"\x02" + fmt.pack(*([0] * 8), 1, 64, b""))  # pos >= 64
    with pytest.raises(ValueError, match="inconsistent"):
        Sha256State.from_bytes(b"\x02" + fmt.pack(*([0] * 8), 1, 2, b"ab!"))  # junk past pos
    with pytest.raises(ValueError, match="out of range"):
        Sha256State.from_bytes(b"\x02" + fmt.pack(*([0] * 8), 1 << 60, 0, b""))


def test_forcing_an_unavailable_backend_fails() -> None:
    with pytest.raises(RuntimeError, match="not available"):
        Sha256State(_backend="nope")  # type: ignore[arg-type]
