"""The fp8 encoder against ml_dtypes' float8_e4m3fn on every in-range float32, and the binding
of the quantization reference against a numpy model of DeepEP's cast."""
import ml_dtypes
import numpy as np
import pytest

import epmoe

CHUNK = 1 << 24
MAX_BITS = 0x43E00000  # 448.0f: every |x| <= 448 is in range for ml_dtypes (above, it gives NaN)


def test_fp8_encoder_matches_ml_dtypes_on_all_in_range_floats():
    bad = 0
    for start in range(0, MAX_BITS + 1, CHUNK):
        bits = np.arange(start, min(start + CHUNK, MAX_BITS + 1), dtype=np.uint32)
        for sign in (0, 0x80000000):
            f = (bits | np.uint32(sign)).view(np.float32)
            ours = epmoe.fp8_from_float(f)
            theirs = f.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
            bad += int(np.count_nonzero(ours != theirs))
    assert bad == 0


def test_fp8_out_of_range_saturates_where_ml_dtypes_overflows():
    f = np.array([464.0, 1e6, np.inf, -np.inf, -500.0], dtype=np.float32)
    assert list(epmoe.fp8_from_float(f)) == [0x7E, 0x7E, 0x7E, 0xFE, 0xFE]
    theirs = f.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert theirs[0] == 448.0  # 464 is the tie between 448 and 480 (NaN's code): even wins, for both
    assert np.isnan(theirs[1:]).all()  # ml_dtypes overflows to NaN where we saturate: documented difference
    assert epmoe.fp8_from_float(np.array([np.nan], dtype=np.float32))[0] == 0x7F


def test_fp8_decoder_matches_ml_dtypes():
    codes = np.arange(256, dtype=np.uint8)
    ours = epmoe.fp8_to_float(codes)
    theirs = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    same = (ours == theirs) | (np.isnan(ours) & np.isnan(theirs))
    assert same.all()


def test_bf16_matches_ml_dtypes():
    rng = np.random.default_rng(0)
    f = (rng.standard_normal(1 << 20) * np.exp(rng.standard_normal(1 << 20) * 8)).astype(np.float32)
    assert (epmoe.bf16_from_float(f) == f.astype(ml_dtypes.bfloat16).view(np.uint16)).all()


@pytest.mark.parametrize("M,K", [(1, 128), (3, 384), (129, 7168)])
def test_cast_group_matches_numpy_model(M, K):
    rng = np.random.default_rng(M * K)
    x = (rng.standard_normal((M, K)) * np.exp(rng.standard_normal((M, 1)))).astype(np.float32)
    xb = epmoe.bf16_from_float(x)
    q, s = epmoe.cast_group_fp8(xb)
    xf = epmoe.bf16_to_float(xb).reshape(M, K // 128, 128)
    amax = np.maximum(np.abs(xf).max(-1), np.float32(1e-4)).astype(np.float32)
    mul = (np.float32(448.0) / amax).astype(np.float32)
    want = (xf * mul[..., None]).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    assert (q == want.reshape(M, K)).all()
    scales = s.view(np.float32)[: M * (K // 128)].reshape(M, K // 128)
    assert (scales == (amax * np.float32(1.0 / 448.0)).astype(np.float32)).all()


def test_errors_raise_with_message():
    x = np.zeros((1, 100), dtype=np.uint16)
    with pytest.raises(epmoe.Error, match="multiple of 128"):
        epmoe.cast_group_fp8(x)
