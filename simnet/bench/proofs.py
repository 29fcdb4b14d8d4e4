"""Prove and verify times (p50) and sizes of the four proofs, each beside its primitive.

For each proof: the time to make it (work: one puzzle at the default difficulty; time: the
default T squarings; space: answering a beacon's challenges from a plot on disk; stake:
signing), the time to verify it (p50 over many), and its encoded size. Each verify time is
printed beside the primitive it is built on, measured in the same run (one SHA-256, one
2048-bit modular exponentiation by a 128-bit exponent, one scrypt label, one Ed25519
verification), because these machines are shared and noisy. Floor: every verify <= 5 ms p50.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hmnode.consensus.space import DEFAULT_SPACE, Plot, compute_label, verify_space
from hmnode.consensus.stake import LockedCredits, prove_stake, verify_stake
from hmnode.consensus.vdf import DEFAULT_VDF, RSA_2048, prove_time, squarings_per_second, verify_time
from hmnode.consensus.work import prove_work, verify_work
from hmnode.identity import NodeKey, verify

STEPS_PER_RUN = 4
DEFAULT_RUNS = 1
VERIFY_SAMPLES = 50
PLOT_LABELS = 1 << 12
FLOOR_MS = 5.0


def _p50(fn: Callable[[], Any], samples: int = VERIFY_SAMPLES) -> float:
    """Median seconds of `fn` over `samples` calls."""
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def _one_run(workdir: Path) -> dict[str, float]:
    key = NodeKey.generate()
    node = key.node_id.key
    figures: dict[str, float] = {}

    work, took = _timed(lambda: prove_work("admission", node, b"bench"))
    figures["work_prove_ms"] = took * 1000
    figures["work_verify_us"] = _p50(lambda: verify_work(work, "admission", node, b"bench")) * 1e6
    figures["work_bytes"] = len(work.encode())
    data = os.urandom(64)
    figures["sha256_us"] = _p50(lambda: hashlib.sha256(data).digest()) * 1e6

    challenge = os.urandom(32)
    proof, took = _timed(lambda: prove_time(challenge))
    figures["time_prove_ms"] = took * 1000
    figures["time_verify_ms"] = _p50(lambda: verify_time(proof, challenge)) * 1000
    figures["time_bytes"] = len(proof.encode())
    base, exponent = int.from_bytes(os.urandom(255), "big"), int.from_bytes(os.urandom(16), "big")
    figures["modexp_ms"] = _p50(lambda: pow(base, exponent, RSA_2048)) * 1000
    figures["time_t"] = DEFAULT_VDF.t
    figures["squarings_per_s"] = squarings_per_second()

    plot, took = _timed(lambda: Plot.create(workdir / "plot", node, PLOT_LABELS))
    figures["space_plot_labels_per_s"] = PLOT_LABELS / took
    beacon = os.urandom(32)
    space, took = _timed(lambda: plot.prove(beacon))
    figures["space_prove_ms"] = took * 1000
    figures["space_verify_ms"] = _p50(lambda: verify_space(space, node, beacon)) * 1000
    figures["space_bytes"] = len(space.encode())
    commitment = plot.commitment()
    figures["scrypt_label_ms"] = _p50(lambda: compute_label(DEFAULT_SPACE, node, commitment.plot_id, 0)) * 1000
    figures["space_challenges"] = DEFAULT_SPACE.challenges

    ledger = LockedCredits()
    ledger.lock(10, node, 1000)
    stake, took = _timed(lambda: prove_stake(key, 500, 10, b"bench"))
    figures["stake_prove_ms"] = took * 1000
    figures["stake_verify_us"] = _p50(lambda: verify_stake(stake, ledger, b"bench")) * 1e6
    figures["stake_bytes"] = len(stake.encode())
    message = stake.signed_bytes()
    figures["ed25519_verify_us"] = _p50(lambda: verify(key.node_id, message, stake.signature)) * 1e6
    return figures


def run(runs: int, progress: Callable[[int], None]) -> dict[str, Any]:
    """Measure every proof `runs` times; medians of the runs, with ratios to the primitives."""
    results = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="hmnode-bench-proofs-") as tmp:
            results.append(_one_run(Path(tmp)))
        progress(STEPS_PER_RUN)
    figures: dict[str, Any] = {k: round(statistics.median(r[k] for r in results), 3) for k in results[0]}
    figures["runs"] = runs
    figures["work_verify_ratio"] = round(figures["work_verify_us"] / figures["sha256_us"], 2)
    figures["time_verify_ratio"] = round(figures["time_verify_ms"] / figures["modexp_ms"], 2)
    figures["space_verify_ratio"] = round(figures["space_verify_ms"] / figures["scrypt_label_ms"], 2)
    figures["stake_verify_ratio"] = round(figures["stake_verify_us"] / figures["ed25519_verify_us"], 2)
    verify_ms = [figures["work_verify_us"] / 1000, figures["time_verify_ms"],
                 figures["space_verify_ms"], figures["stake_verify_us"] / 1000]
    figures["verify_floor_ms"] = FLOOR_MS
    figures["verify_floor_ok"] = all(ms <= FLOOR_MS for ms in verify_ms)
    return figures


def report(figures: dict[str, Any]) -> list[str]:
    """Lines for people: one per proof, with its primitive beside it."""
    f = figures
    return [
        f"work   prove {f['work_prove_ms']:9.1f} ms  verify {f['work_verify_us']:8.1f} us  "
        f"{f['work_bytes']:5.0f} B   (one SHA-256 {f['sha256_us']:.2f} us: x{f['work_verify_ratio']})",
        f"time   prove {f['time_prove_ms']:9.1f} ms  verify {f['time_verify_ms']:8.2f} ms  "
        f"{f['time_bytes']:5.0f} B   (one modexp {f['modexp_ms']:.2f} ms: x{f['time_verify_ratio']}; "
        f"T={f['time_t']:.0f} at {f['squarings_per_s']:.0f} squarings/s)",
        f"space  prove {f['space_prove_ms']:9.1f} ms  verify {f['space_verify_ms']:8.2f} ms  "
        f"{f['space_bytes']:5.0f} B   (one label {f['scrypt_label_ms']:.3f} ms: x{f['space_verify_ratio']}; "
        f"{f['space_challenges']:.0f} challenges; plotting {f['space_plot_labels_per_s']:.0f} labels/s)",
        f"stake  prove {f['stake_prove_ms']:9.3f} ms  verify {f['stake_verify_us']:8.1f} us  "
        f"{f['stake_bytes']:5.0f} B   (one Ed25519 verify {f['ed25519_verify_us']:.1f} us: "
        f"x{f['stake_verify_ratio']})",
        f"every verify <= {f['verify_floor_ms']:g} ms p50: {'yes' if f['verify_floor_ok'] else 'NO'}",
    ]
