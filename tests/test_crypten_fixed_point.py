"""CrypTen backend, single process: exact fixed-point encode/decode, input checks, install errors.

None of these start a party; the multi-process tests are in test_crypten_parties.py.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fedse_secure.secagg.backends.crypten import CryptenBackend, CryptenSettings
from fedse_secure.secagg.base import InvalidUpdateError, SecureAggregationError
from fedse_secure.secagg.crypten_backend import CryptenParties, CryptenUnavailableError, compat, fixed_point
from fedse_secure.secagg.driver import aggregate

try:
    compat.check_crypten_installed()
    _MISSING = ""
except CryptenUnavailableError as err:  # the suite still runs the checks that need no CrypTen
    _MISSING = str(err)
needs_crypten = pytest.mark.skipif(bool(_MISSING), reason=_MISSING)


def _crypten_encoder(bits: int):
    crypten = compat.import_crypten()
    return crypten.encoder.FixedPointEncoder(precision_bits=bits)


def _bug_cases(bits: int) -> np.ndarray:
    # Ring values -k*2^f + r with 0 < r < k: a negative number just above the integer -k. CrypTen floor-
    # divides these by (2^f - 1) and lands one integer lower.
    scale = 2**bits
    return np.array([-k * scale + r for k in (2, 3, 30, 1000) for r in (1, k - 1)] + [-30 * scale + 29], dtype=np.int64)


@needs_crypten
@pytest.mark.parametrize("bits", [16, 24])
def test_crypten_decoder_is_off_by_one_and_ours_is_exact(bits):
    ring = _bug_cases(bits)
    exact = ring.astype(np.float64) / 2.0**bits  # dyadic rationals: float64 holds them exactly
    ours = fixed_point.decode(ring, bits)
    np.testing.assert_array_equal(ours, exact)
    # The bug this backend exists to avoid: CrypTen 0.4.1's own decoder is 1.0 too low on every case.
    import torch

    theirs = _crypten_encoder(bits).decode(torch.from_numpy(ring)).double().numpy()
    np.testing.assert_allclose(exact - theirs, 1.0, atol=2.0**-bits * 2 + 1e-6 * np.abs(exact).max())


@needs_crypten
def test_documented_example_minus_29_99999():
    ring = fixed_point.encode(np.array([-29.99999]), clip_range=64.0, fractional_bits=16)
    assert ring.tolist() == [-1966079]
    assert abs(fixed_point.decode(ring, 16)[0] - -29.99999) <= 2.0**-17
    import torch

    assert abs(_crypten_encoder(16).decode(torch.from_numpy(ring)).item() - -30.99998) < 1e-4


def test_decode_of_large_and_random_values_is_correctly_rounded():
    rng = np.random.default_rng(1)
    ring = rng.integers(-(2**62), 2**62, size=10_000, dtype=np.int64)
    for bits in (8, 16, 24, 40):
        got = fixed_point.decode(ring, bits)
        # Python ints and Fraction-free check: float(int) is correctly rounded, and / 2**bits is exact.
        want = np.array([float(int(v)) / 2.0**bits for v in ring[:200]])
        np.testing.assert_array_equal(got[:200], want)
    with pytest.raises(TypeError, match="int64"):
        fixed_point.decode(ring.astype(np.float64), 16)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_encode_rounds_half_to_even_and_clips(dtype):
    bits = 4
    x = np.array([0.5 / 16, 1.5 / 16, -0.5 / 16, -2.5 / 16, 100.0, -100.0, 7.97], dtype=dtype)
    np.testing.assert_array_equal(fixed_point.encode(x, 8.0, bits), [0, 2, 0, -2, 128, -128, 128])
    x = np.random.default_rng(2).normal(0, 3, 5000).astype(dtype)
    err = np.abs(fixed_point.decode(fixed_point.encode(x, 64.0, 16), 16) - x.astype(np.float64))
    assert err.max() <= 2.0**-17


def test_encoding_matches_the_masking_backend_bit_for_bit():
    quantize = pytest.importorskip("fedse_secure.secagg.masking.quantize")
    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float64):
        x = (rng.normal(0, 4, 20_000)).astype(dtype)
        ours = fixed_point.encode(x, 8.0, 24)
        theirs = quantize.signed_integers(quantize.quantise(x, 8.0, 24, 64))
        np.testing.assert_array_equal(ours, theirs)


def test_headroom_and_error_bound():
    fixed_point.check_headroom(2**35, 8.0, 24)
    with pytest.raises(SecureAggregationError, match="overflows CrypTen's 64-bit ring; lower"):
        fixed_point.check_headroom(2**36, 8.0, 24)
    assert fixed_point.error_bound(3, 16) == 3 * 2.0**-17


# -- input checks: all happen before any process starts --------------------------------------------------


@pytest.fixture
def agg():
    if _MISSING:
        pytest.skip(_MISSING)
    return _Crypten(CryptenSettings(stage_timeout_s=5))


class _Crypten:
    def __init__(self, settings):
        self.backend = CryptenBackend(settings)

    def aggregate(self, round_id, contributions):
        return aggregate(self.backend, round_id, contributions)


def test_rejects_nan_and_inf(agg):
    bad = np.ones(10)
    bad[3] = np.nan
    with pytest.raises(InvalidUpdateError, match=r"b's update contains 1 NaN/Inf value\(s\); fix the training"):
        agg.aggregate(4, {"a": np.ones(10), "b": bad, "c": np.ones(10)})
    bad[3] = -np.inf
    with pytest.raises(InvalidUpdateError, match="NaN/Inf"):
        agg.aggregate(4, {"a": np.ones(10), "b": bad, "c": np.ones(10)})


@needs_crypten
def test_refuses_out_of_range_when_configured():
    agg = _Crypten(CryptenSettings(clip_range=1.0, on_out_of_range="refuse"))
    with pytest.raises(InvalidUpdateError, match=r"c's update has 2 value\(s\) outside \+-1 .* raise federation.secure_aggregation.clip_range"):
        agg.aggregate(0, {"a": np.zeros(4), "b": np.zeros(4), "c": np.array([0.0, 1.5, -3.0, 1.0])})


def test_rejects_bad_shapes_and_too_few_institutions(agg):
    with pytest.raises(InvalidUpdateError, match="b: the update has 5 values but the round aggregates 4"):
        agg.aggregate(1, {"a": np.zeros(4), "b": np.zeros(5), "c": np.zeros(4)})
    with pytest.raises(InvalidUpdateError, match="a: the update must be one flat vector.*flatten it"):
        agg.aggregate(1, {"a": np.zeros((2, 2)), "b": np.zeros(4)})
    with pytest.raises(SecureAggregationError, match="needs at least 3 distinct institutions"):
        agg.aggregate(1, {"a": np.zeros(4), "b": np.zeros(4)})


def test_missing_crypten_says_how_to_install(monkeypatch):
    real = compat._find_spec
    monkeypatch.setattr(compat, "_find_spec", lambda name: None if name in ("crypten", "onnx") else real(name))
    with pytest.raises(CryptenUnavailableError) as err:
        CryptenParties(CryptenSettings())
    msg = str(err.value)
    assert "crypten, onnx" in msg and "make" in msg and "pip install --no-deps crypten==0.4.1" in msg


@needs_crypten
def test_wrong_crypten_version_is_refused(monkeypatch):
    monkeypatch.setattr(compat.importlib.metadata, "version", lambda name: "0.4.0")
    with pytest.raises(CryptenUnavailableError, match="crypten 0.4.0 is installed but .* 0.4.1"):
        compat.check_crypten_installed()


def test_failed_import_is_reported_with_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "crypten", None)
    with pytest.raises(CryptenUnavailableError, match=r"`import crypten` failed .* --no-deps"):
        compat.import_crypten()


@needs_crypten
def test_the_coordinator_process_never_imports_crypten():
    # Building the backend must not import CrypTen nor install the torch shim in the process that holds the
    # model; only the parties do.
    code = (
        "import sys\n"
        "from fedse_secure.secagg.backends.crypten import CryptenBackend\n"
        "CryptenBackend().server(1, ['a', 'b', 'c'], 4)\n"
        "import fedse_secure.secagg\n"
        "bad = [m for m in ('crypten', 'torch.onnx._internal.registration') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
