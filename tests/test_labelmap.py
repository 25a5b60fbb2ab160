"""The label-map record: round trips, the bytes of docs/FORMAT.md, every corruption, real-map accuracy."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from fuzz.spec_decoder import planes_le as _planes_le
from fuzz.spec_decoder import quantized_values as _oracle_values
from fuzz.spec_decoder import resolve_palette_refs, spec_decode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relabel_shards.labelmap import (
    HEADER_SIZE,
    MAGIC,
    ImageBinding,
    LabelMap,
    LabelMapError,
    decode_label_map,
    encode_label_map,
    read_header,
)

ENCODINGS = ("compact", "float16", "lossless")


def _random_map(rng, k=5, h=15, w=15, num_classes=1000, scale=6.0):
    """Descending top-k logits with distinct classes per cell, like the annotator's."""
    values = -np.sort(-rng.normal(3.0, scale, size=(k, h, w)).astype(np.float32), axis=0)
    indices = np.stack([rng.choice(num_classes, size=k, replace=False) for _ in range(h * w)], axis=1)
    return values, indices.reshape(k, h, w)


def _with_crc(record: bytes | bytearray) -> bytes:
    """Recompute the CRC-32 at bytes 28..31 (docs/FORMAT.md), so only the other checks can reject it."""
    b = bytearray(record)
    b[28:32] = struct.pack("<I", zlib.crc32(bytes(b[HEADER_SIZE:]), zlib.crc32(bytes(b[:28]))))
    return bytes(b)


def _craft(
    fields: dict, payload: bytes, *, frame: bytes | None = None, image: ImageBinding | None = None
) -> bytes:
    """A record with the given header fields and payload, CRC correct: for content-level checks. With
    ``image``, a version-2 record whose flags bit 7 is set and whose image binding follows the header."""
    if image is not None:
        fields = {"version": 2} | fields
        fields["flags"] = fields.get("flags", 0) | 0x80
    f = {
        "magic": MAGIC,
        "version": 1,
        "vc": 1,
        "ic": 2,
        "flags": 0,
        "k": 1,
        "h": 1,
        "w": 1,
        "m": 1,
        "num_classes": 10,
        "step": 0.0,
        "size": len(payload),
    } | fields
    head = struct.pack(
        "<4sBBBBHHHHIfI",
        f["magic"],
        f["version"],
        f["vc"],
        f["ic"],
        f["flags"],
        f["k"],
        f["h"],
        f["w"],
        f["m"],
        f["num_classes"],
        f["step"],
        f["size"],
    )
    frame = frame if frame is not None else zstandard.ZstdCompressor(level=3).compress(payload)
    binding = (
        b"" if image is None else struct.pack("<Q32sII", image.size, image.sha256, image.width, image.height)
    )
    return _with_crc(head + b"\0\0\0\0" + binding + frame)


# ------------------------------------------------------------------------------------------ round trips

_VALUE_DTYPES = [np.float16, np.float32, np.float64, "torch.bfloat16", "torch.float32"]
_INDEX_DTYPES = [np.int16, np.int32, np.int64, np.uint16, "torch.int16", "torch.int64"]


@st.composite
def _label_maps(draw):
    k = draw(st.integers(1, 6))
    h, w = draw(st.integers(1, 17)), draw(st.integers(1, 17))
    num_classes = draw(
        st.sampled_from([k, 255, 1000, 32767, 32768, 21841, 65536, 65537]) | st.integers(k, 21841)
    )
    num_classes = max(num_classes, k)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    cls_hi = num_classes if draw(st.booleans()) else min(num_classes, draw(st.integers(1, 300)))
    vdt, idt = draw(st.sampled_from(_VALUE_DTYPES)), draw(st.sampled_from(_INDEX_DTYPES))
    if idt == np.uint16 or (idt in (np.int16, "torch.int16")):
        cls_hi = min(cls_hi, 32767)
    values = rng.normal(0, draw(st.sampled_from([0.01, 1.0, 20.0])), size=(k, h, w))
    if draw(st.booleans()):
        values = -np.sort(-values, axis=0)
    indices = rng.integers(0, cls_hi, size=(k, h, w))
    return values, indices, num_classes, vdt, idt


def _as(x, dt):
    if isinstance(dt, str):
        return torch.from_numpy(np.asarray(x, np.float64 if "float" in dt else np.int64)).to(
            getattr(torch, dt[6:])
        )
    return np.asarray(x).astype(dt)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_label_maps(), st.sampled_from(ENCODINGS))
def test_round_trip(case, encoding):
    values, indices, num_classes, vdt, idt = case
    v_in, i_in = _as(values, vdt), _as(indices, idt)
    lm = decode_label_map(encode_label_map(v_in, i_in, num_classes, encoding=encoding))
    assert isinstance(lm, LabelMap) and lm.num_classes == num_classes
    assert (lm.k, lm.height, lm.width) == values.shape
    assert lm.indices.dtype == (np.int16 if num_classes <= 32767 else np.int32)
    ref_i = i_in.numpy() if isinstance(i_in, torch.Tensor) else i_in
    np.testing.assert_array_equal(lm.indices.astype(np.int64), ref_i.astype(np.int64))
    ref = (v_in.float().numpy() if isinstance(v_in, torch.Tensor) else v_in).astype(np.float64)
    if encoding == "lossless":
        assert lm.values.dtype == np.float32
        np.testing.assert_array_equal(lm.values, ref.astype(np.float32))
    elif encoding == "float16":
        assert lm.values.dtype == np.float16
        np.testing.assert_array_equal(lm.values, ref.astype(np.float16))
    else:
        assert lm.values.dtype == np.float32
        step = float(np.float32(0.01))
        assert np.abs(lm.values - ref).max() <= step / 2 + 1e-6 * max(1.0, np.abs(ref).max())


def test_decode_accepts_bytearray_and_memoryviews():
    rng = np.random.default_rng(5)
    values, indices = _random_map(rng, 3, 4, 5, 100)
    rec = encode_label_map(values, indices, 100, encoding="lossless")
    strided = memoryview(bytes(b for c in rec for b in (c, 0)))[::2]  # non-contiguous view of the same bytes
    for data in (bytearray(rec), memoryview(rec), strided):
        lm = decode_label_map(data)
        np.testing.assert_array_equal(lm.values, values)
        np.testing.assert_array_equal(lm.indices, indices)


def test_many_classes_use_raw_indices_and_int32():
    rng = np.random.default_rng(0)
    k, h, w, c = 4, 130, 130, 2**31 - 1  # 67,600 distinct classes: more than a palette holds
    indices = rng.choice(c, size=k * h * w, replace=False).reshape(k, h, w)
    values = rng.normal(size=(k, h, w)).astype(np.float32)
    rec = encode_label_map(values, indices, c, encoding="lossless")
    hd = read_header(rec)
    assert hd.index_codec == "raw" and hd.palette_size == 0 and hd.num_classes == c
    lm = decode_label_map(rec)
    assert lm.indices.dtype == np.int32
    np.testing.assert_array_equal(lm.indices, indices)
    np.testing.assert_array_equal(lm.values, values)


def test_widest_reference_symbols():
    rng = np.random.default_rng(2)
    k, h, w, c = 2, 182, 182, 100000  # 66,248 elements over exactly 65,535 classes: k + m > 65536
    classes = rng.choice(c, size=65535, replace=False)
    indices = np.concatenate([classes, rng.choice(classes, size=k * h * w - classes.size)])
    indices = rng.permutation(indices).reshape(k, h, w)
    values = rng.normal(size=(k, h, w))
    rec = encode_label_map(values, indices, c)
    hd = read_header(rec)
    assert hd.index_codec == "palette" and hd.palette_size == 65535
    width = {0: 1, 1: 2, 2: 4}
    values_size = h * w * width[hd.flags & 3] + (k - 1) * h * w * width[hd.flags >> 2 & 3]
    assert hd.payload_size == 65535 * 4 + k * h * w * 4 + values_size  # 4-byte palette gaps and symbols
    np.testing.assert_array_equal(decode_label_map(rec).indices, indices)


def test_reference_symbols_large_k_sorting_path_agrees():
    from relabel_shards.labelmap import _codec as labelmap

    rng = np.random.default_rng(3)
    for k, h, w, c in [(12, 5, 7, 40), (9, 1, 9, 9), (20, 3, 3, 25), (5, 6, 6, 12)]:
        indices = np.stack([rng.choice(c, size=k, replace=False) for _ in range(h * w)], 1).reshape(k, h, w)
        _, pos = np.unique(indices, return_inverse=True)
        pos = pos.reshape(k, h, w)
        direct = labelmap._neighbour_refs(pos) if k <= labelmap._SMALL_K else None
        old, labelmap._SMALL_K = labelmap._SMALL_K, 0  # force the sorting path
        try:
            sorted_path = labelmap._neighbour_refs(pos)
        finally:
            labelmap._SMALL_K = old
        if direct is not None:
            np.testing.assert_array_equal(direct, sorted_path)
        np.testing.assert_array_equal(
            labelmap._resolve_refs(sorted_path, int(pos.max()) + 1), pos.reshape(-1)
        )
        rec = encode_label_map(rng.normal(size=(k, h, w)), indices, c)
        np.testing.assert_array_equal(decode_label_map(rec).indices, indices)


def test_compact_step_option_and_unsorted_values():
    rng = np.random.default_rng(1)
    values = rng.normal(0, 5, size=(3, 4, 5))  # not descending along k: signed gaps
    indices = rng.integers(0, 50, size=(3, 4, 5))
    rec = encode_label_map(values, indices, 50, step=0.25)
    assert read_header(rec).step == 0.25 and read_header(rec).flags & 0x10
    lm = decode_label_map(rec)
    np.testing.assert_array_equal(lm.values, (np.rint(values / 0.25) * 0.25).astype(np.float32))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (
            {"encoding": "zip"},
            ValueError,
            r"encoding must be one of \['compact', 'float16', 'lossless'\], got 'zip'",
        ),
        ({"level": 0}, ValueError, r"level must be an int in \[1, 22\], got 0"),
        ({"step": 0.1, "encoding": "lossless"}, ValueError, "step applies to encoding='compact' only"),
        ({"step": -1.0}, ValueError, r"step must be a finite float in \(0, 2\*\*99\], got -1.0"),
        ({"step": 2.0**100}, ValueError, r"step must be a finite float in \(0, 2\*\*99\]"),
        ({"image": b"abc"}, TypeError, "image must be an ImageBinding or None, got bytes"),
        ({"num_classes": 0}, ValueError, r"num_classes must be an int in \[1, 2147483647\], got 0"),
        ({"num_classes": 2**31}, ValueError, r"num_classes must be an int in \[1, 2147483647\]"),
        ({"num_classes": 3}, ValueError, r"k must be in \[1, num_classes=3\], got 5"),
        (
            {"indices": np.full((5, 2, 2), 10)},
            ValueError,
            r"indices must be in \[0, num_classes=10\), got values in \[10, 10\]",
        ),
        (
            {"indices": np.full((5, 2, 2), -1)},
            ValueError,
            r"indices must be in \[0, num_classes=10\), got values in \[-1, -1\]",
        ),
        (
            {"indices": np.zeros((5, 2, 3), int)},
            ValueError,
            r"same shape \[k, h, w\], got \[5, 2, 2\] and \[5, 2, 3\]",
        ),
        (
            {"values": np.zeros((5, 4)), "indices": np.zeros((5, 4), int)},
            ValueError,
            r"same shape \[k, h, w\]",
        ),
        ({"values": np.zeros((5, 2, 2), int)}, TypeError, "values must have a floating dtype, got int64"),
        ({"indices": np.zeros((5, 2, 2))}, TypeError, "indices must have an integer dtype, got float64"),
        (
            {"values": np.full((5, 2, 2), np.nan)},
            ValueError,
            r"values must be finite, got 20 NaN/inf entries",
        ),
        ({"values": [[[1.0]]]}, TypeError, "values must be a numpy array or torch tensor"),
        ({"values": np.full((5, 2, 2), 1e6), "encoding": "float16"}, ValueError, "float16 range"),
        ({"values": np.full((5, 2, 2), 1e7)}, ValueError, r"values / step must be within"),
    ],
)
def test_encode_rejects_bad_input(kwargs, exc, match):
    args = {
        "values": np.zeros((5, 2, 2), np.float32),
        "indices": np.arange(20).reshape(5, 2, 2) % 10,
        "num_classes": 10,
    } | kwargs
    with pytest.raises(exc, match=match):
        encode_label_map(args.pop("values"), args.pop("indices"), args.pop("num_classes"), **args)


# ----------------------------------------------------------------------------------- bytes against spec


def test_header_and_payload_bytes_follow_the_spec():
    values = np.array([[[2.5, 1.0]], [[0.5, -0.25]]], np.float32)  # k=2, h=1, w=2
    indices = np.array([[[7, 3]], [[3, 300]]])
    rec = encode_label_map(values, indices, 1000, encoding="lossless")
    magic, ver, vc, ic, flags, k, h, w, m, c, step, size, crc = struct.unpack("<4sBBBBHHHHIfII", rec[:32])
    assert (magic, ver, vc, ic, flags, k, h, w, m, c, step) == (b"\x89RLM", 1, 1, 2, 0, 2, 1, 2, 3, 1000, 0.0)
    assert crc == zlib.crc32(rec[32:], zlib.crc32(rec[:28]))
    payload = zstandard.ZstdDecompressor().decompress(rec[32:])
    # palette [3, 7, 300] as gaps [3, 3, 292] in u16 byte planes; reference symbols (k-major) as u8:
    # cell (0, 0) writes out positions 1 and 0 as k + p = 3, 2; cell (0, 1) has class 3 = rank 1 of
    # cell (0, 0) -> 1, and class 300 (position 2) is new -> 4; then the 4 float32 values as 4 byte planes.
    pal = bytes([3, 3, 292 & 255, 0, 0, 292 >> 8])
    pos = bytes([3, 1, 2, 4])
    f32 = np.array([2.5, 1.0, 0.5, -0.25], "<f4").view(np.uint8).reshape(4, 4).T.tobytes()
    assert payload == pal + pos + f32 and size == len(payload) == 6 + 4 + 16

    q = encode_label_map(values, indices, 1000, step=0.25)
    magic, ver, vc, ic, flags, *_rest, step, size, crc = struct.unpack("<4sBBBBHHHHIfII", q[:32])
    assert (vc, ic, flags, step) == (3, 2, 0, 0.25)
    payload = zstandard.ZstdDecompressor().decompress(q[32:])
    # q = [[10, 4]], [[2, -1]]: top residuals (2-D predictor) [10, -6] zigzagged [20, 11]; gaps [8, 5]
    assert payload[10:] == bytes([20, 11, 8, 5])


def _doc_example(marker: str) -> bytes:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md").read_text()
    block = doc.split(marker)[1].split("```")[1]
    return bytes.fromhex("".join(line.split("|")[0] for line in block.strip().splitlines()))


_EXAMPLE = (np.array([[[2.5, 1.0]], [[0.5, -0.25]]], np.float32), np.array([[[7, 3]], [[3, 300]]]))


@pytest.mark.parametrize("marker", ["<!-- example-record -->", "<!-- example-record-v2 -->"])
def test_worked_examples_in_format_md_decode_and_are_what_the_encoder_writes(marker):
    rec = _doc_example(marker)
    lm = decode_label_map(rec)
    np.testing.assert_array_equal(lm.indices, _EXAMPLE[1])
    np.testing.assert_array_equal(lm.values, _EXAMPLE[0])
    image = None if marker == "<!-- example-record -->" else ImageBinding.of(b"abc", 64, 32)
    assert lm.image == image and read_header(rec).image == image
    assert read_header(rec).version == (1 if image is None else 2)
    # byte for byte: records without a binding are still exactly what the version-1 writer wrote
    assert encode_label_map(*_EXAMPLE, 1000, encoding="lossless", image=image) == rec


# ------------------------------------------------------------------------------------------ image binding


def test_image_binding_of_and_its_checks():
    b = ImageBinding.of(memoryview(b"abc"), np.int64(64), 32)
    assert b.size == 3 and b.sha256.hex().startswith("ba7816bf") and (b.width, b.height) == (64, 32)
    assert type(b.width) is int and eval(repr(b), {"ImageBinding": ImageBinding}) == b
    assert ImageBinding.of(bytearray(b"abc"), 64, 32) == b
    with pytest.raises(
        ValueError, match=r"ImageBinding.size must be an int in \[1, 9223372036854775807\], got 0"
    ):
        ImageBinding(0, bytes(32), 1, 1)
    with pytest.raises(ValueError, match=r"ImageBinding.width must be an int in \[1, 4294967295\], got 0"):
        ImageBinding.of(b"x", 0, 1)
    with pytest.raises(ValueError, match=r"ImageBinding.height must be an int .*got 1.5"):
        ImageBinding(1, bytes(32), 1, 1.5)
    with pytest.raises(ValueError, match=r"ImageBinding.sha256 must be 32 bytes"):
        ImageBinding(1, bytes(31), 1, 1)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_image_binding_round_trip(encoding):
    rng = np.random.default_rng(11)
    values, indices = _random_map(rng, 5, 15, 15, 1000)
    image = ImageBinding(2**40 + 7, bytes(range(32)), 4000, 3000)
    plain = encode_label_map(values, indices, 1000, encoding=encoding)
    rec = encode_label_map(values, indices, 1000, encoding=encoding, image=image)
    assert len(rec) == len(plain) + 48 and rec[80:] == plain[32:]  # the same frame, after the binding
    hd = read_header(rec)
    assert (hd.version, hd.flags & 0x80, hd.image) == (2, 0x80, image)
    assert read_header(rec[:80]).image == image  # the header and binding alone: nothing decompressed
    lm, ref = decode_label_map(rec), decode_label_map(plain)
    assert lm.image == image and ref.image is None and read_header(plain).version == 1
    np.testing.assert_array_equal(lm.values, ref.values)
    np.testing.assert_array_equal(lm.indices, ref.indices)


def test_image_binding_truncated_or_invalid():
    image = ImageBinding.of(b"jpeg bytes", 20, 10)
    rec = encode_label_map(*_EXAMPLE, 1000, encoding="lossless", image=image)
    for n in range(32, 80):  # inside the block
        with pytest.raises(
            LabelMapError, match=rf"truncated, {n} bytes, the header and its image binding need 80"
        ):
            read_header(rec[:n])
        with pytest.raises(LabelMapError, match="truncated"):
            decode_label_map(rec[:n])
    for offset, fmt, value in [(32, "<Q", 0), (32, "<Q", 2**63), (72, "<I", 0), (76, "<I", 0)]:
        bad = bytearray(rec)
        struct.pack_into(fmt, bad, offset, value)
        with pytest.raises(LabelMapError, match=r"image binding of \d+ bytes at \d+x\d+ px is invalid"):
            decode_label_map(_with_crc(bad))
    for pos in range(32, 80):  # any flipped bit in the binding: the CRC covers it
        bad = bytearray(rec)
        bad[pos] ^= 0x01
        with pytest.raises(LabelMapError, match="CRC-32 mismatch"):
            decode_label_map(bytes(bad))


def test_version_2_without_binding_and_version_1_compatibility():
    v1 = encode_label_map(*_EXAMPLE, 1000, encoding="lossless")
    assert v1[4] == 1 and v1 == _doc_example("<!-- example-record -->")
    v2 = bytearray(v1)
    v2[4] = 2  # version 2, flags bit 7 clear: no binding, the frame at byte 32
    lm = decode_label_map(_with_crc(v2))
    assert lm.image is None and read_header(_with_crc(v2)).version == 2
    np.testing.assert_array_equal(lm.values, _EXAMPLE[0])
    # the same binding bytes behind a version-1 header are not a binding: the frame must start at byte 32
    image = ImageBinding.of(b"abc", 64, 32)
    rec = bytearray(encode_label_map(*_EXAMPLE, 1000, encoding="lossless", image=image))
    rec[4] = 1
    with pytest.raises(LabelMapError, match="flags 0x80 and step 0.0 must be 0"):
        decode_label_map(_with_crc(rec))


def test_quantization_step_that_would_overflow_is_refused_with_a_valid_crc():
    # k = h = w = 1, compact: palette [5], symbol 1, top residual zigzag 2 -> q = 1. With step 3e38 the
    # decoder used to return float32(3e38 * 1) and inf for q = 2; the step is now bounded by the header check.
    for step, q_zigzag in [(3e38, 4), (3e38, 2), (2.0**100, 2)]:
        rec = _craft({"vc": 3, "step": step}, bytes([5, 0, 1, q_zigzag]))
        with pytest.raises(LabelMapError, match=r"quantization step .* is not finite and in \(0, 2\*\*99\]"):
            decode_label_map(rec)
    # the largest step and the largest |q| still decode to finite values
    # (a 4-byte top residual, zigzag 2**29 - 1 = -2**28; one element, so its 4 planes are its 4 bytes)
    rec = _craft({"vc": 3, "step": 2.0**99, "flags": 2}, bytes([5, 0, 1]) + struct.pack("<I", 2**29 - 1))
    lm = decode_label_map(rec)
    assert np.isfinite(lm.values).all() and float(lm.values[0, 0, 0]) == -(2.0**28) * 2.0**99


# ------------------------------------------------------------- decoder against docs/FORMAT.md, read literally


def _oracle_indices(sym, palette, k, h, w):
    """The index section's rule applied cell by cell in raster order, as the spec states it."""
    return resolve_palette_refs(np.asarray(sym).tolist(), palette, k, h, w, len(palette))


@st.composite
def _symbol_streams(draw):
    """Any valid palette + symbol stream, including ones the encoder never writes: references to a later
    rank than the smallest match, repeated classes in a cell, unused palette entries, wide symbols."""
    k, h, w = draw(st.integers(1, 5)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
    n = k * h * w
    m = draw(st.integers(1, n) | st.just(min(n, 300)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    gaps = rng.integers(0, draw(st.sampled_from([1, 3, 70000])), size=m)
    palette = np.cumsum(gaps) + np.arange(m)
    num_classes = max(k, int(palette[-1]) + 1 + draw(st.integers(0, 5)))
    sym = k + rng.integers(0, m, size=(k, h, w))
    refs = rng.random((k, h, w)) < draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    refs[:, 0, 0] = False  # cell (0, 0) has no previous cell
    sym[refs] = rng.integers(0, k, size=int(refs.sum()))
    return k, h, w, m, gaps, palette, num_classes, sym, rng


@settings(max_examples=120, deadline=None)
@given(_symbol_streams(), st.sampled_from(["lossless", "float16", "quantized"]), st.data())
def test_decoder_matches_the_spec_read_literally(case, codec, data):
    _check_against_spec(case, codec, data)


# The decoder's other paths, taken by maps too large to test quickly: pointers computed without the
# per-shape table; values summed without the matrix product; values summed in int64 rather than float64.
_OTHER_PATHS = {
    "no pointer table, accumulate": {"_TABLE_MAX": 0, "_TABLES": {}, "_BLAS_MAX": 0},
    "int64 sums": {"_FLOAT_EXACT": 0},
}


@pytest.mark.parametrize("patch", list(_OTHER_PATHS))
def test_decoder_paths_for_large_maps_match_the_spec(patch):
    from relabel_shards.labelmap import _codec as labelmap

    @settings(max_examples=40, deadline=None)
    @given(_symbol_streams(), st.sampled_from(["lossless", "quantized"]), st.data())
    def check(case, codec, data):
        _check_against_spec(case, codec, data)

    with pytest.MonkeyPatch.context() as mp:
        for name, value in _OTHER_PATHS[patch].items():
            mp.setattr(labelmap, name, value)
        check()


def _check_against_spec(case, codec, data):
    k, h, w, m, gaps, palette, num_classes, sym, rng = case
    cw = 2 if num_classes <= 65536 else 4
    rw = 1 if k + m <= 256 else 2 if k + m <= 65536 else 4
    payload = _planes_le(gaps, cw) + _planes_le(sym, rw)
    fields = {"k": k, "h": h, "w": w, "m": m, "num_classes": num_classes}
    if codec == "lossless":
        values = rng.normal(0, 10, size=(k, h, w)).astype(np.float32)
        payload += _planes_le(values.view(np.uint32), 4)
    elif codec == "float16":
        values = rng.normal(0, 10, size=(k, h, w)).astype(np.float16)
        payload += _planes_le(values.view(np.uint16), 2)
        fields |= {"vc": 2}
    else:  # any widths, signed or not, residuals as large as each width holds
        tw, gw = data.draw(st.sampled_from([0, 1, 2])), data.draw(st.sampled_from([0, 1, 2]))
        signed = data.draw(st.booleans())
        z = rng.integers(0, [256, 65536, 2**32][tw], size=(h, w), dtype=np.int64)
        if data.draw(st.booleans()):  # mostly small, so that the sums stay in range
            z = z % 64
        g = rng.integers(0, [256, 65536, 2**32][gw], size=(k - 1, h, w), dtype=np.int64) % data.draw(
            st.sampled_from([2, 256, 2**32])
        )
        top_res = np.where(z & 1, -((z + 1) >> 1), z >> 1)
        gap_val = np.where(g & 1, -((g + 1) >> 1), g >> 1) if signed else g
        step = data.draw(st.sampled_from([0.01, 0.25, 3.0]))
        payload += _planes_le(z, [1, 2, 4][tw]) + _planes_le(g, [1, 2, 4][gw])
        fields |= {"vc": 3, "flags": tw | gw << 2 | int(signed) << 4, "step": step}
        q, values = _oracle_values(top_res, gap_val, step)
        too_big = np.abs(top_res).max() > 2**30 or (gap_val.size and np.abs(gap_val).max() > 2**29)
        if too_big or np.abs(q).max() > 2**28:
            with pytest.raises(LabelMapError, match="quantized (residuals exceed|values exceed)"):
                decode_label_map(_craft(fields, payload))
            return
    rec = _craft(fields, payload)
    lm = decode_label_map(rec)
    np.testing.assert_array_equal(lm.indices, _oracle_indices(sym, palette, k, h, w))
    spec = spec_decode(rec)  # the whole record, read by the decoder written from FORMAT.md alone
    assert spec.values.tobytes() == lm.values.tobytes() and spec.indices.tobytes() == lm.indices.tobytes()
    assert lm.indices.dtype == (np.int16 if num_classes <= 32767 else np.int32)
    np.testing.assert_array_equal(lm.values, values)
    assert lm.values.dtype == values.dtype and lm.values.flags.writeable and lm.indices.flags.writeable


# ------------------------------------------------------------------------------------------ corruption


@pytest.fixture(scope="module")
def records():
    rng = np.random.default_rng(7)
    v, i = _random_map(rng, 5, 6, 7, 1000)
    big_v, big_i = _random_map(rng, 3, 4, 4, 100000)
    image = ImageBinding.of(b"\xff\xd8 an image", 640, 480)
    return [encode_label_map(v, i, 1000, encoding=e) for e in ENCODINGS] + [
        encode_label_map(big_v, big_i, 100000, encoding="compact"),
        encode_label_map(v, i, 1000, encoding="lossless", image=image),
    ]


def test_truncation_at_every_byte_raises(records):
    for rec in records:
        for n in range(len(rec)):
            with pytest.raises(LabelMapError, match="bad label-map record"):
                decode_label_map(rec[:n])


def test_every_flipped_byte_raises(records):
    for rec in records:
        for pos in range(len(rec)):
            for mask in (0x01, 0x80, 0xFF):
                bad = bytearray(rec)
                bad[pos] ^= mask
                with pytest.raises(LabelMapError):
                    decode_label_map(bytes(bad))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.data())
def test_random_bytes_and_splices_raise_only_labelmaperror(junk, data):
    with pytest.raises(LabelMapError):
        decode_label_map(junk)
    rec = encode_label_map(np.ones((2, 3, 3)), np.arange(18).reshape(2, 3, 3), 20)
    at = data.draw(st.integers(0, len(rec)))
    spliced = rec[:at] + junk + rec[at + data.draw(st.integers(0, 8)) :]
    if spliced != rec:
        with pytest.raises(LabelMapError):
            decode_label_map(spliced)
    # With a matching CRC the splice may even be a valid record; any failure must still be a LabelMapError.
    fixed = _with_crc(spliced) if len(spliced) >= HEADER_SIZE else spliced
    try:
        lm = decode_label_map(fixed)
    except LabelMapError:
        return
    assert lm.values.shape == lm.indices.shape and lm.indices.max() < lm.num_classes
    assert np.isfinite(lm.values.astype(np.float64)).all()


def test_header_errors_are_named(records):
    rec = records[0]

    def patched(offset, fmt, value, base=rec):
        b = bytearray(base)
        struct.pack_into(fmt, b, offset, value)
        return _with_crc(b)

    cases = [
        (patched(0, "4s", b"RLM\x89"), r"wrong magic b'RLM\\x89', expected b'\\x89RLM'"),
        (patched(4, "B", 3), "unknown format version 3 \\(this reader knows 1, 2\\)"),
        (patched(4, "B", 0), "unknown format version 0"),
        (patched(5, "B", 9), "unknown value codec 9"),
        (patched(6, "B", 0), "index codec 0"),
        (patched(8, "H", 0), r"k, h, w = 0, 6, 7 out of range"),
        (patched(16, "I", 4), r"k, h, w = 5, 6, 7 out of range .*k <= num_classes=4"),
        (patched(16, "I", 2**31), r"num_classes 2147483648 outside"),
        (patched(14, "H", 0), "palette size 0 invalid"),
        (patched(24, "I", 12345), "header says the payload is 12345 bytes, its fields imply"),
        (patched(10, "H", 7), "header says the payload is"),  # h changed: the sizes disagree
        (patched(20, "f", float("nan")), r"quantization step nan is not finite and in \(0, 2\*\*99\]"),
        (patched(20, "f", 3e38), r"quantization step 3\.\d+e\+38 is not finite and in \(0, 2\*\*99\]"),
        (
            patched(20, "f", 1.0, records[2]),
            r"flags 0x00 and step 1.0 must be 0 \(step \+0.0\) for the float32",
        ),
        (patched(20, "<I", 0x80000000, records[2]), r"flags 0x00 and step -0.0 must be 0 \(step \+0.0\)"),
        (patched(20, "<I", 0x80000000, records[1]), r"step -0.0 must be 0 \(step \+0.0\) for the float16"),
        (patched(7, "B", 0x20), "invalid flags 0x20"),
        (patched(7, "B", 0x80 | rec[7]), r"invalid flags 0x8"),  # bit 7 means nothing in version 1
        (patched(7, "B", 0x80, records[2]), r"flags 0x80 and step 0.0 must be 0"),
        (rec[:28] + b"\0\0\0\0" + rec[32:], "CRC-32 mismatch"),
        (b"", "truncated, 0 bytes, the header alone needs 32"),
        (_with_crc(rec + b"\0" * 5), r"the zstd frame ends at byte \d+ of \d+"),
    ]
    for data, match in cases:
        with pytest.raises(LabelMapError, match=match):
            decode_label_map(data)
    with pytest.raises(LabelMapError, match="expected bytes, got str"):
        decode_label_map("RLM")


def test_sizes_that_disagree_with_the_payload():
    # k = h = w = 1: palette [5] (u16 planes 05 00), symbol k + 0 = 1, value 1.5 (f32; one element, 4 planes)
    payload = bytes([5, 0, 1]) + np.array([1.5], "<f4").view(np.uint8).tobytes()
    ok = _craft({}, payload)
    assert decode_label_map(ok).values.tolist() == [[[1.5]]]
    # the frame declares more than the header allows (a decompression bomb is refused before it inflates)
    bomb = zstandard.ZstdCompressor(level=3).compress(payload + bytes(50_000_000))
    with pytest.raises(LabelMapError, match=r"the zstd frame declares 50000007 bytes, the header 7"):
        decode_label_map(_craft({}, payload, frame=bomb))
    # no declared size at all, content larger than the header's
    undeclared = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(payload + bytes(1000))
    with pytest.raises(LabelMapError, match=r"the zstd frame declares -1 bytes"):
        decode_label_map(_craft({}, payload, frame=undeclared))
    # declared size matches the header but the frame holds less
    short = bytearray(zstandard.ZstdCompressor(level=3).compress(payload[:-1]))
    with pytest.raises(LabelMapError):
        decode_label_map(_craft({"size": 6}, payload, frame=bytes(short)))


@pytest.mark.parametrize(
    "fields, payload, match",
    [
        ({"num_classes": 5}, bytes([5, 0, 1]) + bytes(4), r"palette class 5 >= num_classes=5"),
        ({"m": 2, "k": 2}, bytes([1, 0, 0, 0, 2, 4]) + bytes(8), r"palette position 2 >= palette size 2"),
        ({"m": 2, "k": 2}, bytes([1, 0, 0, 0, 0, 2]) + bytes(8), r"cell \(0, 0\) refers to a previous cell"),
        (
            {"ic": 2, "m": 1},
            bytes([0, 0, 1]) + np.array([np.nan], "<f4").view(np.uint8).tobytes(),
            "NaN or infinite",
        ),
        ({"ic": 1, "m": 0}, bytes([10, 0]) + bytes(4), r"class index 10 >= num_classes=10"),
        (
            {"vc": 3, "step": 1.0, "flags": 2, "k": 2},
            bytes([0, 0, 2, 2]) + bytes([0, 0, 0, 0xFF]) + bytes([0]),
            "quantized residuals exceed",
        ),
    ],
)
def test_content_errors_with_valid_crc(fields, payload, match):
    with pytest.raises(LabelMapError, match=match):
        decode_label_map(_craft(fields, payload))


# ------------------------------------------------------------------------------------ real label maps


def _pool(values, indices, boxes, num_classes):
    """Dense LabelPooling oracle in float64 (DESIGN.md): scatter, roi_align to 1x1, softmax."""
    from torchvision.ops import roi_align

    k, h, w = values.shape
    dense = torch.zeros(num_classes, h, w, dtype=torch.float64)
    dense.scatter_(0, torch.as_tensor(indices).long(), torch.as_tensor(values.astype(np.float64)))
    rois = torch.cat(
        [
            torch.zeros(len(boxes), 1, dtype=torch.float64),
            boxes.double() * torch.tensor([w, h, w, h], dtype=torch.float64) - 0.5,
        ],
        1,
    )
    return roi_align(dense[None], rois, 1, 1.0, -1, False).flatten(1).softmax(1)


def _boxes(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    area = torch.empty(n).uniform_(0.003, 1.0, generator=g)
    ratio = torch.empty(n).uniform_(np.log(3 / 4), np.log(4 / 3), generator=g).exp()
    bw, bh = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    x1, y1 = torch.rand(n, generator=g) * (1 - bw), torch.rand(n, generator=g) * (1 - bh)
    return torch.stack([x1, y1, x1 + bw, y1 + bh], 1)


@pytest.fixture(scope="module")
def real_maps(real_photos):
    """Top-5 float32 logits of the embedded annotator at 480x480 (15x15): 3 photos, whole and mirrored."""
    from relabel_shards.annotator import create_annotator

    ann = create_annotator(input_size=480, device="cpu")
    imgs = [real_photos[p] for p in ("chelsea", "coffee", "astronaut")]
    x = torch.stack([ann.preprocess(im) for im in imgs] + [ann.preprocess(im[:, ::-1].copy()) for im in imgs])
    v, i = ann.dense_logits(x).topk(5, dim=1)
    return v.numpy(), i.numpy()


def test_real_maps_compact_within_2e3_and_lossless_exact(real_maps):
    values, indices = real_maps
    assert values.shape == (6, 5, 15, 15)
    boxes = _boxes(256)
    sizes, worst = [], 0.0
    for v, i in zip(values, indices, strict=True):
        ref = _pool(v, i, boxes, 1000)
        rec = encode_label_map(v, i, 1000)
        sizes.append(len(rec))
        lm = decode_label_map(rec)
        np.testing.assert_array_equal(lm.indices, i)
        worst = max(worst, float((_pool(lm.values, lm.indices, boxes, 1000) - ref).abs().max()))
        exact = decode_label_map(encode_label_map(v, i, 1000, encoding="lossless"))
        np.testing.assert_array_equal(exact.values, v)
        assert float((_pool(exact.values, exact.indices, boxes, 1000) - ref).abs().max()) == 0.0
    assert worst <= 2e-3
    assert np.mean(sizes) <= 2500


def test_tar_fit_step_saves_a_tar_block_within_the_bound(real_maps):
    """tar_fit_step re-encodes at the coarser step only where that saves a 512-byte tar block, and the
    coarser record still pools within the record's 2e-3 bound (benchmarks/bench_label_bytes.py at scale)."""
    from relabel_shards.labelmap import TAR_FIT_STEP, read_header

    values, indices = real_maps
    boxes = _boxes(256)
    blocks = lambda rec: -(-len(rec) // 512)  # noqa: E731
    coarsened = 0
    for v, i in zip(values, indices, strict=True):
        fine = encode_label_map(v, i, 1000)
        coarse = encode_label_map(v, i, 1000, step=TAR_FIT_STEP)
        fit = encode_label_map(v, i, 1000, tar_fit_step=TAR_FIT_STEP)
        if blocks(coarse) < blocks(fine) and len(fine) - (blocks(fine) - 1) * 512 <= 0.15 * len(fine):
            assert fit == coarse and read_header(fit).step == np.float32(TAR_FIT_STEP)
            coarsened += 1
        else:
            assert fit == fine and read_header(fit).step == np.float32(0.01)
        lm = decode_label_map(fit)
        err = float((_pool(lm.values, lm.indices, boxes, 1000) - _pool(v, i, boxes, 1000)).abs().max())
        assert err <= 2e-3, err
    assert coarsened >= 1  # these photos include records just over 2,048 bytes
    with pytest.raises(ValueError, match="tar_fit_step applies to encoding='compact' only"):
        encode_label_map(values[0], indices[0], 1000, encoding="lossless", tar_fit_step=0.02)


# ------------------------------------------------------------------ a reader's bounds: expect, max_elements


def _max_size_record(k=4, h=2048, w=2048, num_classes=1000) -> bytes:
    """A valid compact record of k*h*w zeros (class 0 everywhere): about 1.1 KB that decodes to 2 * 2**24
    bytes of payload and 384 MiB of arrays, 2 s of work. The frame is compressed as a stream, so making it
    costs no large buffer either."""
    n, hw = k * h * w, h * w
    size = 2 + n + hw + (k - 1) * hw  # palette gap (u16), u8 symbols, u8 top residuals, u8 gaps
    sym = bytearray(hw)
    sym[0] = k  # cell (0, 0) writes out palette position 0; every other symbol refers to the previous cell
    c = zstandard.ZstdCompressor(level=19).compressobj(size=size)
    parts = [c.compress(b"\0\0")]
    parts += [c.compress(bytes(sym)) for _ in range(k)]
    zeros = bytes(1 << 20)
    for start in range(0, k * hw, len(zeros)):
        parts.append(c.compress(zeros[: min(len(zeros), k * hw - start)]))
    parts.append(c.flush())
    fields = {"vc": 3, "step": 0.01, "k": k, "h": h, "w": w, "m": 1, "num_classes": num_classes, "size": size}
    return _craft(fields, b"", frame=b"".join(parts))


def test_hostile_record_is_refused_from_its_header_cheaply():
    import time
    import tracemalloc

    rec = _max_size_record()
    hd = read_header(rec)
    assert len(rec) < 1500 and (hd.k, hd.height, hd.width, hd.payload_size) == (4, 2048, 2048, 2 * 2**24 + 2)
    mismatch = (
        r"geometry k, h, w, num_classes = 4, 2048, 2048, 1000 differs from the expected 5, 15, 15, 1000"
    )
    cases = [
        ({"expect": (5, 15, 15, 1000)}, mismatch),
        ({"expect": LabelMap(np.zeros((5, 15, 15)), np.zeros((5, 15, 15)), 1000)}, mismatch),
        (
            {"max_elements": 5 * 15 * 15},
            r"k\*h\*w = 4\*2048\*2048 = 16777216 elements exceeds max_elements=1125",
        ),
    ]
    for kwargs, match in cases:
        tracemalloc.start()
        try:
            t0 = time.perf_counter()
            with pytest.raises(LabelMapError, match=match):
                decode_label_map(rec, **kwargs)
            elapsed = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert elapsed < 0.05 and peak < 256 * 1024, (kwargs, elapsed, peak)  # unbounded: 2 s and 384 MiB


def test_expect_and_max_elements_accept_matching_records():
    rng = np.random.default_rng(4)
    values, indices = _random_map(rng, 5, 15, 15, 1000)
    rec = encode_label_map(values, indices, 1000, image=ImageBinding.of(b"img", 480, 480))
    for kwargs in [
        {"expect": (5, 15, 15, 1000)},
        {"expect": read_header(rec)},
        {"expect": (np.int64(5), 15, 15, 1000), "max_elements": 1125},
        {"max_elements": 10**9},
    ]:
        np.testing.assert_array_equal(decode_label_map(rec, **kwargs).indices, indices)
    with pytest.raises(
        LabelMapError, match=r"4, 2048, 2048, 1000 differs from the expected 4, 2048, 2048, 999"
    ):
        decode_label_map(_max_size_record(), expect=(4, 2048, 2048, 999))
    with pytest.raises(TypeError, match=r"expect must be \(k, h, w, num_classes\) ints .*got \(5, 15, 15\)"):
        decode_label_map(rec, expect=(5, 15, 15))
    with pytest.raises(TypeError, match=r"expect must be .*got 'abcd'"):
        decode_label_map(rec, expect="abcd")
    with pytest.raises(ValueError, match=r"max_elements must be None or an int >= 1, got 0"):
        decode_label_map(rec, max_elements=0)
    # a corrupt record is still reported as corrupt, not as a geometry mismatch
    with pytest.raises(LabelMapError, match="CRC-32 mismatch"):
        decode_label_map(rec[:-1], expect=(1, 1, 1, 1))
