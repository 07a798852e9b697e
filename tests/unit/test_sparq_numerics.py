"""SPARQ reference (calib/sparq.py) against the authors' kernel, a brute-force table and hand-worked cases.

The kernel port below transcribes ``find_{4bits_2op,4bits_3op,4bits_5op,6bits_3op,3bits_6op,2bits_7op}`` and
the masks of ``slices_{2,3,4,6}bits_macros.h`` (GitHub gilshm/sparq, cu_gemm_2x48) literally, so the
reference's window arithmetic is checked against the paper's own code on every UINT8 value.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from calib.errors import ConfigError
from calib.quant import dequantize, quantize
from calib.schema import decode_json, to_json
from calib.sparq import (
    Rounding,
    SparqConfig,
    ZeroPairCounts,
    allowed_placements,
    bsparq,
    pair_has_zero,
    sparq_fake_quant,
    sparq_int8,
    trim_magnitude,
    vsparq,
    zero_pair_counts,
)

# --- the authors' kernel, transcribed: (SET masks, window masks, RND bits, IS_RND masks, OVRFLW) per option ---
KERNEL_TABLES: dict[tuple[int, int], tuple[list[int], list[int], list[int], list[int], list[int]]] = {
    (4, 2): ([0xF0], [0xF0, 0x0F], [0x8], [0x18], [0x100]),
    (4, 3): ([0xC0, 0x30], [0xF0, 0x3C, 0x0F], [0x8, 0x2], [0x18, 0x6], [0x100, 0x40]),
    (4, 5): ([0x80, 0x40, 0x20, 0x10], [0xF0, 0x78, 0x3C, 0x1E, 0x0F], [0x8, 0x4, 0x2, 0x1],
             [0x18, 0xC, 0x6, 0x3], [0x100, 0x80, 0x40, 0x20]),
    (6, 3): ([0x80, 0x40], [0xFC, 0x7E, 0x3F], [0x2, 0x1], [0x6, 0x3], [0x100, 0x80]),
    (3, 6): ([0x80, 0x40, 0x20, 0x10, 0x8], [0xE0, 0x70, 0x38, 0x1C, 0xE, 0x7], [0x10, 0x8, 0x4, 0x2, 0x1],
             [0x30, 0x18, 0xC, 0x6, 0x3], [0x100, 0x80, 0x40, 0x20, 0x10]),
    (2, 7): ([0x80, 0x40, 0x20, 0x10, 0x8, 0x4], [0xC0, 0x60, 0x30, 0x18, 0xC, 0x6, 0x3],
             [0x20, 0x10, 0x8, 0x4, 0x2, 0x1], [0x60, 0x30, 0x18, 0xC, 0x6, 0x3],
             [0x100, 0x80, 0x40, 0x20, 0x10, 0x8]),
}


def _is_round_up(a: int, is_rnd: int, rnd_bit: int) -> bool:
    # IS_ROUND_UP(a, is_rnd, rnd_bit) of gemm_mt_kernel.cu
    return (a & is_rnd) == is_rnd or (a & ((a & rnd_bit) - int((a & rnd_bit) != 0))) != 0


def kernel_find_bits_slice(a: int, is_round: bool, slice_size: int, num_slices: int) -> int:
    sets, masks, rnd_bits, is_rnds, ovrflws = KERNEL_TABLES[(slice_size, num_slices)]
    h = [a & mask for mask in masks]
    if is_round:
        for k in range(len(rnd_bits)):
            if _is_round_up(a, is_rnds[k], rnd_bits[k]):
                h[k] += (a & rnd_bits[k]) << 1
            if h[k] == ovrflws[k]:
                h[k] = masks[k]
    for k, s in enumerate(sets):
        if a & s:
            return h[k]
    return h[-1]


# --- an independent brute force: enumerate windows, pick by the leading one, round with exact fractions ----


def brute_windows(n: int, p: int) -> list[tuple[int, int]]:
    """(msb, lsb) from the top: p windows spread evenly from [7 : 8-n] to [n-1 : 0]."""
    step = (8 - n) // (p - 1)
    return [(7 - k * step, 8 - n - k * step) for k in range(p)]


def brute_trim(m: int, n: int, p: int, nearest: bool, ceiling: int = 255) -> int:
    lead = m.bit_length() - 1
    msb, lsb = min((w for w in brute_windows(n, p) if w[0] >= lead), key=lambda w: w[0])
    unit = 1 << lsb
    kept = round(Fraction(m, unit)) if nearest else m // unit  # round(Fraction) rounds half to even
    largest = ((1 << (msb + 1)) - 1) & ~(unit - 1)
    value = min(kept * unit, largest)
    while value > ceiling:  # the sign's range: the largest window value within it
        value -= unit
    return value


def brute_int8(q: int, n: int, p: int, nearest: bool) -> int:
    if q < 0:
        return -brute_trim(-q, n, p, nearest, ceiling=128)
    return brute_trim(q, n, p, nearest, ceiling=127)


ALL_OPTIONS = [(n, p) for n in range(2, 8) for p in allowed_placements(n)]
INT8 = np.arange(-128, 128, dtype=np.int8)


@pytest.mark.parametrize(("n", "p"), sorted(KERNEL_TABLES))
@pytest.mark.parametrize("rounding", list(Rounding))
def test_unsigned_windows_equal_the_authors_kernel(n: int, p: int, rounding: Rounding) -> None:
    values = np.arange(256)
    got = trim_magnitude(values, window_bits=n, placements=p, rounding=rounding)
    want = [kernel_find_bits_slice(int(a), rounding is Rounding.NEAREST_EVEN, n, p) for a in values]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("n", "p"), ALL_OPTIONS)
@pytest.mark.parametrize("rounding", list(Rounding))
def test_int8_codes_equal_the_brute_force_table(n: int, p: int, rounding: Rounding) -> None:
    config = SparqConfig(window_bits=n, placements=p, rounding=rounding)
    want = [brute_int8(int(q), n, p, rounding is Rounding.NEAREST_EVEN) for q in INT8]
    got = bsparq(INT8, config)
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, want)
    assert (got != INT8).any() == (n < 7)  # a 7-bit window holds every INT8 magnitude (and -128's one bit)


def test_brute_force_reproduces_the_kernel_where_both_apply() -> None:
    for (n, p) in KERNEL_TABLES:
        for nearest in (False, True):
            assert [brute_trim(a, n, p, nearest) for a in range(256)] == [
                kernel_find_bits_slice(a, nearest, n, p) for a in range(256)]


@pytest.mark.parametrize(("n", "p"), ALL_OPTIONS)
@pytest.mark.parametrize("rounding", list(Rounding))
def test_int8_structure_sign_monotone_and_window(n: int, p: int, rounding: Rounding) -> None:
    got = bsparq(INT8, SparqConfig(window_bits=n, placements=p, rounding=rounding)).astype(np.int32)
    assert got[0] == -128  # -128 (0b1000_0000, one set bit) is always kept exactly
    assert np.all(np.diff(got) >= 0)  # monotone over -128..127
    assert np.all(np.sign(got) == np.sign(INT8))  # zero stays zero, signs never flip
    magnitude = np.abs(got)
    lsb = np.array([(int(v) & -int(v)).bit_length() - 1 if v else 0 for v in magnitude])
    assert np.all(magnitude >> lsb < (1 << n))  # every code is an n-bit integer times a power of two
    negated = bsparq(-INT8[1:], SparqConfig(window_bits=n, placements=p, rounding=rounding)).astype(np.int32)
    below = (negated > -128) & (got[1:] > -128)  # f(-q) = -f(q) unless one side reaches -128 (+128 is no code)
    np.testing.assert_array_equal(negated[below], -got[1:][below])
    if rounding is Rounding.TRUNCATE:
        assert np.all(magnitude <= np.abs(INT8.astype(np.int32)))


@pytest.mark.parametrize(("q", "config", "want"), [
    (45, SparqConfig(), 44),                                    # [5:2] = 1011, dropped 01
    (-45, SparqConfig(), -44),
    (45, SparqConfig(placements=2, rounding=Rounding.TRUNCATE), 32),   # 2opt: [7:4]
    (45, SparqConfig(placements=2), 48),
    (31, SparqConfig(), 30),                                    # [4:1] 1111|1 rounds past the window: saturate
    (127, SparqConfig(placements=3), 112),                      # 3opt: +128 is not INT8: largest [7:4] value <= 127
    (-127, SparqConfig(placements=3), -128),
    (-120, SparqConfig(placements=3), -128),
    (119, SparqConfig(placements=3), 112),
    (15, SparqConfig(placements=2), 15),                        # below 16: exact in [3:0]
    (-128, SparqConfig(window_bits=2), -128),
    (127, SparqConfig(window_bits=2), 96),                      # [6:5] 11|11111 -> saturate at 0b0110_0000
    (127, SparqConfig(window_bits=6), 126),                     # [6:1] 111111|1 -> saturate
    (77, SparqConfig(window_bits=3, rounding=Rounding.TRUNCATE), 64),  # [6:4] of 0b0100_1101
    (77, SparqConfig(window_bits=3), 80),                              # dropped 1101 > half: up
])
def test_hand_worked_codes(q: int, config: SparqConfig, want: int) -> None:
    assert int(bsparq(np.array([q], np.int8), config)[0]) == want


@pytest.mark.parametrize("n", range(2, 8))
@pytest.mark.parametrize("rounding", list(Rounding))
def test_vsparq_on_every_pair(n: int, rounding: Rounding) -> None:
    config = SparqConfig(window_bits=n, rounding=rounding, vsparq=True)
    a, b = np.meshgrid(INT8, INT8, indexing="ij")
    pairs = np.stack([a, b], axis=-1).reshape(256, 512)  # row i: (i, every partner)
    got = vsparq(pairs, config).reshape(256, 256, 2)
    nearest = rounding is Rounding.NEAREST_EVEN
    narrow = {int(q): brute_int8(int(q), n, 9 - n, nearest) for q in INT8}
    wide = {int(q): int(q) if 2 * n >= 8 else brute_int8(int(q), 2 * n, 9 - 2 * n, nearest) for q in INT8}
    for first, second, pair in ((a, b, got[..., 0]), (b, a, got[..., 1])):
        want = np.vectorize(lambda x, y: (wide if x == 0 or y == 0 else narrow)[int(x)])(first, second)
        np.testing.assert_array_equal(pair, want)
    np.testing.assert_array_equal(got[128, :, 1], [wide[int(q)] for q in INT8])  # partner 0: 2n bits


def test_vsparq_pairs_stay_in_their_row_and_pad_odd_rows_with_zero() -> None:
    config = SparqConfig(window_bits=2, vsparq=True, rounding=Rounding.TRUNCATE)
    q = np.array([[[77, 77, 0, 77, 77]], [[77, 0, 77, 77, 0]]], dtype=np.int8)
    narrow, wide = 64, 72  # 77 = 0b0100_1101; 2 bits: [6:5] -> 0b0100_0000; 4 bits (5opt): [6:3] -> 0b0100_1000
    np.testing.assert_array_equal(vsparq(q, config), [[[narrow, narrow, 0, wide, wide]],
                                                      [[wide, 0, narrow, narrow, 0]]])
    np.testing.assert_array_equal(pair_has_zero(q[0]), [[False, False, True, True, True]])
    np.testing.assert_array_equal(sparq_int8(q, config), vsparq(q, config))
    np.testing.assert_array_equal(sparq_int8(q, SparqConfig(window_bits=2)), bsparq(q, SparqConfig(window_bits=2)))


@given(hnp.arrays(np.int8, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9),
                  elements=st.sampled_from([0, 0, 0, 1, -1, 5, 77, -128, 127])))
def test_zero_pair_counts_match_a_loop_and_merge_exactly(q: np.ndarray) -> None:
    rows = q.reshape(-1, q.shape[-1])
    pairs = with_zero = both = 0
    for row in rows:
        padded = list(row) + [0] * (len(row) % 2)
        for i in range(0, len(padded), 2):
            pairs += 1
            with_zero += int(padded[i] == 0 or padded[i + 1] == 0)
            both += int(padded[i] == 0 and padded[i + 1] == 0)
    counts = zero_pair_counts(q)
    assert counts == ZeroPairCounts(pairs=pairs, with_zero=with_zero, both_zero=both)
    assert counts.zero_share == (with_zero / pairs if pairs else 0.0)
    if rows.shape[0] >= 2:
        half = rows.shape[0] // 2
        assert zero_pair_counts(rows[:half]).merge(zero_pair_counts(rows[half:])) == zero_pair_counts(rows)


def test_zero_pair_counts_leave_out_unselected_rows() -> None:
    q = np.array([[[0, 3, 4, 5], [0, 0, 0, 0]]], dtype=np.int8)  # batch 1, 2 tokens; the second is padding
    mask = np.array([[1, 0]])
    assert zero_pair_counts(q, mask) == ZeroPairCounts(pairs=2, with_zero=1, both_zero=0)
    assert zero_pair_counts(q) == ZeroPairCounts(pairs=4, with_zero=3, both_zero=2)
    with pytest.raises(ConfigError, match=r"\(2,\)"):
        zero_pair_counts(q, np.ones(2))


def test_fake_quant_is_dequantized_trimmed_codes() -> None:
    x = np.array([[0.0, 0.9, -0.9, 1.27, -2.0, 0.451]], dtype=np.float32)
    config = SparqConfig(window_bits=2, rounding=Rounding.TRUNCATE)
    # 2-bit windows, truncated: 90 = 0b0101_1010 -> [6:5] 10 -> 64; 127 -> 11 -> 96; 45 -> [5:4] 10 -> 32
    codes = quantize(x, np.float32(0.01))
    np.testing.assert_array_equal(codes, [[0, 90, -90, 127, -128, 45]])
    want = dequantize(np.array([[0, 64, -64, 96, -128, 32]], np.int8), np.float32(0.01))
    np.testing.assert_array_equal(sparq_fake_quant(x, 0.01, config), want)


@pytest.mark.parametrize("bits", [0, 1, 8, 9, -4, 4.0, "4", True])
def test_window_bits_outside_2_to_7_are_config_errors(bits: object) -> None:
    with pytest.raises(ConfigError, match=r"window_bits .* 2\.\.7") as info:
        SparqConfig(window_bits=bits)  # type: ignore[arg-type]
    assert repr(bits) in str(info.value)


@pytest.mark.parametrize(("bits", "placements", "allowed"), [
    (4, 4, "5 (5opt), 3 (3opt), 2 (2opt)"), (4, 1, "5 (5opt)"), (3, 2, "6 (6opt)"), (2, 3, "7 (7opt), 4 (4opt)"),
    (5, 3, "4 (4opt), 2 (2opt)"), (7, 3, "2 (2opt)"), (6, 0, "3 (3opt), 2 (2opt)"),
])
def test_unknown_placement_options_name_the_allowed_set(bits: int, placements: int, allowed: str) -> None:
    with pytest.raises(ConfigError, match=rf"placements {placements} .*{bits}-bit window; allowed: ") as info:
        SparqConfig(window_bits=bits, placements=placements)
    assert str(info.value).split("allowed: ")[1].startswith(allowed)


def test_config_rounding_and_decoding() -> None:
    with pytest.raises(ConfigError, match="did you mean 'nearest_even'"):
        SparqConfig(rounding="nearest")  # type: ignore[arg-type]
    assert SparqConfig(rounding="truncate").rounding is Rounding.TRUNCATE  # type: ignore[arg-type]
    config = SparqConfig(window_bits=4, placements=3, rounding=Rounding.TRUNCATE, vsparq=True)
    assert decode_json(to_json(config), SparqConfig, "sparq") == config
    assert config.positions == 3 and SparqConfig(window_bits=3).positions == 6
    with pytest.raises(ConfigError, match="unknown key 'window'"):
        decode_json('{"window": 4}', SparqConfig, "sparq")
    with pytest.raises(ConfigError, match="placements 4"):
        decode_json('{"window_bits": 4, "placements": 4}', SparqConfig, "sparq")
    with pytest.raises(ConfigError, match="INT8 codes"):
        bsparq(np.array([1, 2], np.int32), config)
