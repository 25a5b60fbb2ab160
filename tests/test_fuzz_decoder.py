"""The record decoder against a second one written from docs/FORMAT.md alone: a few seconds of the
differential fuzz target (tests/fuzz/fuzz_decoder.py; the README's "Fuzzing" says how to run it longer)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from fuzz.fuzz_decoder import apply, check, corpus, fix_crc, hypothesis_target
from fuzz.spec_decoder import SpecError, spec_decode

from relabel_shards.labelmap import decode_label_map


def test_both_decoders_read_every_seed_alike():
    assert len(corpus()) >= 20
    for rec in corpus():
        assert check(rec) == "ok"
        assert spec_decode(rec).values.dtype == decode_label_map(rec).values.dtype


def test_differential_fuzz_briefly():
    hypothesis_target(300)()  # about 1.5 s; tests/fuzz/fuzz_decoder.py --seconds N for longer runs


def test_the_harness_catches_a_disagreement(monkeypatch):
    """The oracle has teeth: with the step bound taken out of the reference decoder, a record whose step
    would decode to infinity is accepted by it and refused by the spec, and check() says so."""
    from relabel_shards.labelmap import _header

    seed = next(r for r in corpus() if r[5] == 3 and r[4] == 1)  # a quantized version-1 record
    huge = fix_crc(seed[:20] + struct.pack("<f", 3e38) + seed[24:])
    with pytest.raises(SpecError, match="step"):
        spec_decode(huge)
    assert check(huge) == "refused"
    monkeypatch.setattr(_header, "MAX_STEP", float("inf"))
    with pytest.raises(AssertionError, match="reference accepted a record the spec refuses"):
        with np.errstate(over="ignore"):
            check(huge)


def test_mutations_reach_the_content_checks():
    """Payload edits are re-framed and the CRC fixed, so the content rules are exercised, not only the CRC."""
    seed = corpus()[4]  # compact 2x3x4, 10 classes
    assert decode_label_map(seed).values.shape == (2, 3, 4)
    edits = [(6, pos, value, b"") for pos in range(0, 40, 3) for value in (0, 255)]
    results = {check(apply(seed, [edit], True)) for edit in edits}
    assert results == {"ok", "refused"}
