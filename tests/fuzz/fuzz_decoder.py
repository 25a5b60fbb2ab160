"""Differential fuzz target: ``decode_label_map`` against the decoder written from docs/FORMAT.md alone.

For any bytes both decoders must agree: both refuse (the reference with ``LabelMapError`` and nothing else),
or both return the same arrays (bit for bit, same dtypes), ``num_classes`` and image binding.

Inputs are valid records (every codec, both versions, crafted layouts the writer never makes) with a few
mutations: bit flips, byte edits, truncation, insertion, deletion, header fields rewritten, payload bytes
edited and re-framed (so that content checks are reached past the zstd frame), and, mostly, the CRC-32
recomputed (else nearly every mutation stops at the CRC).

CI runs it for a few seconds through hypothesis (tests/test_fuzz_decoder.py). Longer runs, from the
repository root::

    PYTHONPATH=.:tests python tests/fuzz/fuzz_decoder.py --seconds 600                  # atheris if installed
    PYTHONPATH=.:tests python tests/fuzz/fuzz_decoder.py --seconds 600 --engine hypothesis

A disagreement raises ``AssertionError`` with the input's hex (atheris also writes it to ``crash-*``).
"""

from __future__ import annotations

import argparse
import functools
import struct
import sys
import time
import zlib

import numpy as np
import zstandard

from fuzz.spec_decoder import SpecError, planes_le, spec_decode
from relabel_shards.labelmap import ImageBinding, LabelMapError, decode_label_map, encode_label_map

# A mutation: (kind, a, b, data); its meaning depends on kind (see apply).
Op = tuple[int, int, int, bytes]
N_KINDS = 8
_HEADER_FIELDS = [
    (4, "B"),
    (5, "B"),
    (6, "B"),
    (7, "B"),
    (8, "H"),
    (10, "H"),
    (12, "H"),
    (14, "H"),
    (16, "I"),
    (20, "I"),
    (24, "I"),
    (32, "Q"),
    (72, "I"),
    (76, "I"),
]


def _craft(
    fields: tuple[int, int, int, int, int, int, int, int, float], payload: bytes, version: int = 1
) -> bytes:
    """A record with header fields (vc, ic, flags, k, h, w, m, C, step) and this payload, CRC correct."""
    head = struct.pack("<4sBBBBHHHHIfI", b"\x89RLM", version, *fields, len(payload))
    return fix_crc(head + b"\0\0\0\0" + zstandard.ZstdCompressor(level=3).compress(payload))


@functools.cache
def corpus() -> tuple[bytes, ...]:
    """Seed records: every encoding, both versions, and layouts only a hand-made record has."""
    rng = np.random.default_rng(0)
    out = []
    for k, h, w, c in [(1, 1, 1, 1), (2, 3, 4, 10), (5, 4, 4, 1000), (3, 2, 5, 70000), (4, 1, 7, 300)]:
        values = -np.sort(-rng.normal(0, 5, size=(k, h, w)), axis=0)
        indices = np.stack([rng.choice(c, size=k, replace=False) for _ in range(h * w)], 1).reshape(k, h, w)
        for encoding in ("compact", "float16", "lossless"):
            out.append(encode_label_map(values, indices, c, encoding=encoding))
        image = ImageBinding.of(bytes(rng.integers(0, 256, 50, dtype=np.uint8)), 32, 24)
        out.append(encode_label_map(values, indices, c, image=image))
    out.append(encode_label_map(rng.normal(0, 900, (3, 4, 4)), rng.integers(0, 9, (3, 4, 4)), 9, step=0.001))
    # raw index codec (the writer uses it past 65,535 classes present only), float32 values
    raw = planes_le([3, 1, 4, 1, 5, 9], 2) + planes_le(np.float32([1, 2, 3, -1, 0.5, 7]).view(np.uint32), 4)
    out.append(_craft((1, 1, 0, 2, 1, 3, 0, 10, 0.0), raw))
    # quantized with 4-byte top residuals and signed 2-byte gaps, version 2 without a binding
    q = planes_le([2**20, 7], 4) + planes_le([5, 2**15], 2)
    flags = 2 | 1 << 2 | 1 << 4
    out.append(
        _craft((3, 2, flags, 2, 1, 2, 1, 5, 0.5), planes_le([4], 2) + bytes([2, 0, 2, 1]) + q, version=2)
    )
    return tuple(out)


def fix_crc(rec: bytes | bytearray) -> bytes:
    b = bytearray(rec)
    if len(b) >= 32:
        b[28:32] = struct.pack("<I", zlib.crc32(bytes(b[32:]), zlib.crc32(bytes(b[:28]))))
    return bytes(b)


def _reframe(rec: bytes, pos: int, value: int) -> bytes:
    """Edit one byte of the decompressed payload and put it back in a fresh frame (and fix payload_size)."""
    start = 80 if len(rec) >= 80 and rec[4] == 2 and rec[7] & 0x80 else 32
    try:  # python-zstandard allocates the declared content size: refuse large ones first
        if not 0 < zstandard.frame_content_size(rec[start:]) <= 1 << 20:
            return rec
        payload = bytearray(zstandard.ZstdDecompressor().decompress(rec[start:]))
    except zstandard.ZstdError:
        return rec
    if payload:
        payload[pos % len(payload)] = value & 255
    return rec[:start] + zstandard.ZstdCompressor(level=1).compress(bytes(payload))


def apply(rec: bytes, ops: list[Op], fix: bool) -> bytes:
    """The mutated record."""
    b = bytearray(rec)
    for kind, a, v, data in ops:
        n = max(len(b), 1)
        if kind == 0:  # flip bits
            if b:
                b[a % n] ^= (v % 255) + 1
        elif kind == 1:  # set a byte
            if b:
                b[a % n] = v & 255
        elif kind == 2:  # truncate
            del b[a % n :]
        elif kind == 3:  # insert bytes
            b[a % (n + 1) : a % (n + 1)] = data
        elif kind == 4:  # delete a run
            del b[a % n : a % n + 1 + v % 8]
        elif kind == 5:  # rewrite a header (or binding) field
            off, fmt = _HEADER_FIELDS[a % len(_HEADER_FIELDS)]
            size = struct.calcsize("<" + fmt)
            if off + size <= len(b):
                struct.pack_into("<" + fmt, b, off, v % (1 << (8 * size)))
        elif kind == 6:  # edit the payload, re-framed
            b = bytearray(_reframe(bytes(b), a, v))
        else:  # a step value that matters: -0.0, 0, huge, NaN, the bound and just past it
            steps = [0x80000000, 0, 0x7F7FFFFF, 0x7FC00000, 0x71000000, 0x71000001, 0x3C23D70A]
            if len(b) >= 24:
                struct.pack_into("<I", b, 20, steps[a % len(steps)])
    return fix_crc(b) if fix else bytes(b)


def check(data: bytes) -> str:
    """Decode ``data`` with both decoders; AssertionError if they disagree, else "ok" or "refused"."""
    try:
        want = spec_decode(data)
    except SpecError as e:
        want, why = None, e
    try:
        got = decode_label_map(data)
    except LabelMapError as e:
        if want is not None:
            raise AssertionError(f"reference refused a record the spec accepts ({e}): {data.hex()}") from None
        return "refused"
    except Exception as e:  # noqa: BLE001 - anything but LabelMapError is a bug
        raise AssertionError(f"reference raised {type(e).__name__}: {e}: {data.hex()}") from e
    if want is None:
        raise AssertionError(f"reference accepted a record the spec refuses ({why}): {data.hex()}")
    for name in ("values", "indices"):
        a, b = getattr(got, name), getattr(want, name)
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            raise AssertionError(f"{name} differ ({a.dtype}{a.shape} vs {b.dtype}{b.shape}): {data.hex()}")
    b = got.image
    image = None if b is None else (b.size, b.sha256, b.width, b.height)
    if got.num_classes != want.num_classes or image != want.image:
        raise AssertionError(f"num_classes or image binding differ: {data.hex()}")
    if not np.isfinite(got.values.astype(np.float64)).all():
        raise AssertionError(f"non-finite decoded values: {data.hex()}")
    return "ok"


# ------------------------------------------------------------------------------------------- engines


def hypothesis_target(max_examples: int):
    """A hypothesis test function (call it to run): seed record, mutations, CRC fixed or not."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    op = st.tuples(
        st.integers(0, N_KINDS - 1), st.integers(0, 2**16), st.integers(0, 2**32 - 1), st.binary(max_size=8)
    )

    @settings(
        max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(st.integers(0, len(corpus()) - 1), st.lists(op, max_size=4), st.integers(0, 9))
    def target(seed, ops, fix):
        check(apply(corpus()[seed], ops, fix != 0))  # the CRC fixed 9 times in 10

    return target


def _atheris_one(data: bytes) -> None:
    import atheris

    fdp = atheris.FuzzedDataProvider(data)
    seed = corpus()[fdp.ConsumeIntInRange(0, len(corpus()) - 1)]
    fix = fdp.ConsumeIntInRange(0, 9) != 0
    ops = [
        (
            fdp.ConsumeIntInRange(0, N_KINDS - 1),
            fdp.ConsumeIntInRange(0, 2**16),
            fdp.ConsumeUInt(4),
            fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8)),
        )
        for _ in range(fdp.ConsumeIntInRange(0, 4))
    ]
    check(apply(seed, ops, fix))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="how long to run (default 60)")
    p.add_argument(
        "--engine",
        choices=["auto", "atheris", "hypothesis"],
        default="auto",
        help="atheris (coverage-guided) if installed, else hypothesis (default auto)",
    )
    args, rest = p.parse_known_args(argv)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
        except ImportError:
            engine = "hypothesis"
        else:
            engine = "atheris"
    if engine == "atheris":
        import atheris

        corpus()  # build the seeds before instrumentation
        atheris.instrument_all()
        atheris.Setup([sys.argv[0], f"-max_total_time={int(args.seconds)}", *rest], _atheris_one)
        atheris.Fuzz()
        return
    target = hypothesis_target(2000)
    end, runs = time.monotonic() + args.seconds, 0
    while time.monotonic() < end:
        target()
        runs += 2000
    print(f"hypothesis: about {runs} inputs, no disagreement")


if __name__ == "__main__":
    main()
