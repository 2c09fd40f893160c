"""The benchmark's harnesses stay correct: Flower's SecAgg+ driven in-process and ours agree with the plain sum."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "secagg.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("secagg_benchmark", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_all_three_paths_agree_on_small_inputs(bench):
    pytest.importorskip("flwr")
    inputs = bench.make_inputs(4, 500)
    t_plain, exact = bench.run_plaintext(inputs)
    _, res = bench.run_masking(inputs, None, 1)
    assert np.max(np.abs(res.total - exact)) < 4 * 2.0**-24
    _, flower_total = bench.run_flower(inputs, threshold=3)
    assert np.max(np.abs(flower_total - exact)) < 1e-3  # Flower: 22-bit stochastic quantisation
    assert t_plain.wall >= 0 and t_plain.cpu >= 0 and 0 <= t_plain.system <= t_plain.cpu + 0.01


def test_server_scaling_runs_on_the_neighbour_graph(bench):
    r = bench.server_scaling(40, 50)
    assert r["degree"] == 16 and r["threshold"] == 12 and r["dropped"] == 2 and r["server_s"] > 0
    assert r["ring_bits"] == 32 and r["upload_ratio_for_adapter"] < 1.01


def test_keystream_rate_probes_measure_the_mask_paths_and_aes_ctr(bench):
    assert bench.aes_ctr_gb_per_s(0.01) > 0
    rate = bench.kernel_gb_per_s(0.01)
    assert (rate is None) == (bench.MASK_KERNEL is None)
    assert rate is None or rate > 0
    assert bench.mask_kernel_name().startswith("aegis128x2-")


def test_the_benchmark_names_the_cpu_its_ratios_belong_to(bench):
    assert bench.cpu_model().strip()


def test_the_stall_breakdown_times_every_part_of_a_masking_round():
    import json
    import subprocess
    import sys

    script = _PATH.parent / "secagg_stalls.py"
    out = subprocess.run([sys.executable, str(script), "--rounds", "2", "--clients", "3", "--params", "1000", "--json"],
                         capture_output=True, text=True, check=True, timeout=120)
    rounds = json.loads(out.stdout.splitlines()[-1])["rounds"]
    assert len(rounds) == 2
    for r in rounds:
        assert set(r) == {"cpu_s", "system_s", "client_masking", "server_tag_and_sum", "server_unmask"}
        assert all(v["user_s"] >= 0 and v["system_s"] >= 0 and v["minor_faults"] >= 0
                   for v in r.values() if isinstance(v, dict))
