"""Client-level differential privacy: Flower's DP strategy wrappers chosen by ``privacy.mode``, and the privacy
accounting of a finished (or resumed) run with Google's ``dp-accounting`` (RDP accountant).

Modes (``privacy.mode``):
    none             plain strategy
    server-fixed     ``DifferentialPrivacyServerSideFixedClipping``: the server clips each update, adds noise
    server-adaptive  ``DifferentialPrivacyServerSideAdaptiveClipping``: same with a clipping norm that tracks a
                     quantile of the update norms (Andrew et al. 2021)
    client-fixed     ``DifferentialPrivacyClientSideFixedClipping`` + Flower's ``fixedclipping_mod`` on devices
    client-adaptive  ``DifferentialPrivacyClientSideAdaptiveClipping`` + Flower's ``adaptiveclipping_mod``
    local            Flower's ``LocalDpMod`` on devices (clip + Gaussian noise before upload); no server wrapper

What the wrappers need, and how this module provides it:
- Noise is calibrated as ``std = z * C / num_sampled_clients`` on the *average*, which is a valid Gaussian
  mechanism only if the average gives every client the same weight: DP runs average uniformly (the server sets
  each accepted reply's ``num-examples`` to 1 before aggregation, :func:`before_aggregate`; a client-declared
  weight could otherwise make one device's update dominate). The reported value is kept as
  ``num-examples-reported``.
- ``num_sampled_clients`` is the fixed sample size Flower's sampler draws: ``max(int(N * fraction-train),
  min-train-clients)`` with ``N = partition.num-clients``.
- Only strategies that aggregate by ``FedAvg.aggregate_train`` (FedAvg, FedProx) are allowed: the wrappers add
  noise to what the inner strategy returns, which for FedAdam/FedYogi is the result of a non-linear server step
  and for FedMedian/Krum/FedTrimmedAvg is not an average, so the noise would not be calibrated to them.

Accounting (:func:`privacy_report`): every round's release is recorded by the loop (:func:`release_record`:
sample size, number of averaged updates, clipping norm used for clipping and for the noise, noise std) and the
run is composed with ``dp_accounting.rdp.RdpAccountant``. The reported epsilon uses the event that matches
Flower's sampling, a fixed-size sample drawn uniformly without replacement from N clients:
``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z_eff / 2))`` under the replace-one relation, where
the sensitivity of the sum of clipped updates is 2C (hence z/2), and ``z_eff`` is the per-round effective noise
multiplier (:func:`effective_noise_multipliers`: fewer replies than sampled, an adaptive clipping norm that moved
between clipping and noising, and the noisy clipped-count of adaptive clipping all enter it). The common DP-FedAvg figure (Poisson sampling, add/remove-one; McMahan et al. 2018) is reported
beside it for comparison: it assumes a sampler Flower does not use.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import strategy as fs

from shared_model.config import ConfigError, RunSettings
from shared_model.records import METRICS, NUM_EXAMPLES

log = logging.getLogger(__name__)

CENTRAL_MODES = ("server-fixed", "server-adaptive", "client-fixed", "client-adaptive")
ADAPTIVE_MODES = ("server-adaptive", "client-adaptive")
# base strategies whose aggregate_train is FedAvg's weighted average (what the wrappers' noise is calibrated to)
DP_BASE_STRATEGIES = ("fedavg", "fedprox")
REPORTED_WEIGHT = "num-examples-reported"
ACCOUNTANT = "dp_accounting.rdp.RdpAccountant"


def num_sampled_clients(settings: RunSettings) -> int:
    """Clients Flower's FedAvg samples per round: ``max(int(N * fraction_train), min_train_nodes)``."""
    s = settings.strategy
    return max(int(settings.partition.num_clients * s.fraction_train), s.min_train_clients)


def check_privacy_settings(settings: RunSettings) -> None:
    """Refuse combinations whose privacy guarantee would not hold (clear errors naming the keys)."""
    p = settings.privacy
    if settings.model.personal_layers and (p.mode != "none" or settings.secagg.enabled):
        # devices then reply with the shared arrays only, while Flower's DP wrappers and mods and SecAgg+ work
        # on the whole received vs returned set of arrays
        raise ConfigError("model.personal-layers=true cannot be combined with privacy.mode other than 'none' "
                          "or with secagg.enabled=true")
    if p.mode == "none":
        return
    if p.mode in CENTRAL_MODES and settings.strategy.name.lower() not in DP_BASE_STRATEGIES:
        raise ConfigError(f"privacy.mode={p.mode!r} needs strategy.name in {DP_BASE_STRATEGIES} (the DP noise is "
                          f"calibrated to a uniform average), got {settings.strategy.name!r}")
    if p.mode in CENTRAL_MODES and settings.faults.max_update_norm > 0:
        log.warning("faults.max-update-norm rejects updates by norm before the DP wrapper clips them; the number "
                    "of averaged updates then varies and the accounting uses the per-round count")
    m = num_sampled_clients(settings)
    if m > settings.partition.num_clients:
        raise ConfigError(f"strategy.min-train-clients={m} exceeds partition.num-clients="
                          f"{settings.partition.num_clients}")
    if p.mode in ADAPTIVE_MODES and p.noise_multiplier > 0:
        stddev = p.clipped_count_stddev or m / 20
        if p.noise_multiplier >= 2 * stddev:
            raise ConfigError(f"privacy.noise-multiplier={p.noise_multiplier} must be < 2 * clipped-count stddev "
                              f"({stddev:g}; privacy.clipped-count-stddev, 0 = sampled clients / 20 = {m / 20:g}) "
                              "for adaptive clipping (Andrew et al. 2021)")
    if settings.secagg.enabled and p.mode not in ("none", "client-fixed", "local"):
        raise ConfigError(f"secagg.enabled=true works with privacy.mode none, client-fixed or local, not "
                          f"{p.mode!r}: with secure aggregation the server never sees an individual update")


def wrap_strategy(strategy: fs.Strategy, settings: RunSettings) -> fs.Strategy:
    """``strategy`` wrapped in the Flower DP wrapper that ``privacy.mode`` names (or returned as is)."""
    check_privacy_settings(settings)
    p = settings.privacy
    if p.mode not in CENTRAL_MODES:
        return strategy
    m = num_sampled_clients(settings)
    if p.mode == "server-fixed":
        return fs.DifferentialPrivacyServerSideFixedClipping(strategy, p.noise_multiplier, p.clipping_norm, m)
    if p.mode == "client-fixed":
        return fs.DifferentialPrivacyClientSideFixedClipping(strategy, p.noise_multiplier, p.clipping_norm, m)
    cls = (fs.DifferentialPrivacyServerSideAdaptiveClipping if p.mode == "server-adaptive"
           else fs.DifferentialPrivacyClientSideAdaptiveClipping)
    return cls(strategy, p.noise_multiplier, m, initial_clipping_norm=p.clipping_norm,
               target_clipped_quantile=p.target_quantile, clip_norm_lr=p.clip_lr,
               clipped_count_stddev=p.clipped_count_stddev or None)


# Flower's DP wrappers (wrap_strategy): each has .strategy, .clipping_norm, .noise_multiplier and
# .num_sampled_clients
DP_WRAPPERS = (
    fs.DifferentialPrivacyServerSideFixedClipping,
    fs.DifferentialPrivacyClientSideFixedClipping,
    fs.DifferentialPrivacyServerSideAdaptiveClipping,
    fs.DifferentialPrivacyClientSideAdaptiveClipping,
)


def is_dp_wrapper(strategy: fs.Strategy) -> bool:
    return isinstance(strategy, DP_WRAPPERS)


def _noise_multiplier_for_updates(strategy: fs.Strategy) -> float:
    # adaptive wrappers keep z_delta (the update noise, Andrew et al.'s split of z) in .noise_multiplier
    return float(strategy.noise_multiplier)  # type: ignore[attr-defined]


def before_aggregate(strategy: fs.Strategy, replies: Iterable[Message]) -> dict[str, Any] | None:
    """Prepare accepted replies for a DP wrapper's ``aggregate_train``: uniform weights, fresh noise seed.

    Returns what :func:`release_record` needs (the clipping norm in force while clipping), or None without DP.
    """
    if not is_dp_wrapper(strategy):
        return None
    for msg in replies:
        mr = msg.content.metric_records[METRICS]
        mr[REPORTED_WEIGHT] = mr[NUM_EXAMPLES]
        mr[NUM_EXAMPLES] = 1
    # Flower draws the noise from numpy's global generator: reseed it from the OS so that nobody who knows the
    # run's seeds can regenerate (and subtract) the noise. DP runs are therefore not bit-reproducible.
    np.random.seed(np.frombuffer(os.urandom(4 * 624), dtype=np.uint32))
    return {"clip": float(strategy.clipping_norm)}  # type: ignore[attr-defined]


def release_record(strategy: fs.Strategy, before: dict[str, Any] | None, num_sampled: int, num_averaged: int,
                   released: bool) -> dict[str, Any] | None:
    """What one round released, for the accountant: sample size, averaged updates, norms, noise std."""
    if before is None:
        return None
    clip_used = before["clip"]
    clip_noise = float(strategy.clipping_norm)  # type: ignore[attr-defined]  # adaptive: already updated
    z_delta = _noise_multiplier_for_updates(strategy)
    m = int(strategy.num_sampled_clients)  # type: ignore[attr-defined]
    std = z_delta * clip_noise / m
    rec: dict[str, Any] = {"released": bool(released), "sampled": num_sampled, "averaged": num_averaged,
                           "clipping_norm": clip_used, "noise_clipping_norm": clip_noise, "noise_std": std,
                           "noise_multiplier_updates": z_delta}
    if isinstance(strategy, (fs.DifferentialPrivacyServerSideAdaptiveClipping,
                             fs.DifferentialPrivacyClientSideAdaptiveClipping)):
        rec["clipped_count_stddev"] = float(strategy.clipped_count_stddev)
    rec["z_replace_one"], rec["z_add_remove"] = effective_noise_multipliers(rec)
    return rec


def effective_noise_multipliers(rec: dict[str, Any]) -> tuple[float, float]:
    """Noise std over sensitivity of one round's release, under replace-one and under add/remove-one.

    FedAvg divides by the number of averaged updates k while the noise was sized for m sampled ones, so the
    *sum* of the clipped updates carries ``sigma = std * k``; its sensitivity is 2C (replace one client's update
    by another) or C (add/remove one). Adaptive clipping also releases the clipped count with noise
    ``sigma_b`` (sensitivity 1: Flower counts 0/1 bits), which composes with the update release into one
    Gaussian: ``z^-2 = (sens / sigma)^2 + (1 / sigma_b)^2``.
    """
    k = max(int(rec["averaged"]), 1)
    sigma = float(rec["noise_std"]) * k
    clip = float(rec["clipping_norm"])
    if sigma <= 0:
        return 0.0, 0.0
    sigma_b = float(rec.get("clipped_count_stddev", 0.0) or 0.0)
    count_term = sigma_b ** -2 if sigma_b > 0 else 0.0
    z_replace = ((2 * clip / sigma) ** 2 + count_term) ** -0.5
    z_add_remove = ((clip / sigma) ** 2 + count_term) ** -0.5
    return z_replace, z_add_remove


def _rdp_epsilon(events: list[Any], relation: Any, delta: float) -> float:
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(neighboring_relation=relation)
    absl = logging.getLogger("absl")  # fractional orders below 2 that fail to converge are skipped, noisily
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        for event, count in Counter(events).items():  # identical rounds compose at once (events are hashable)
            acc.compose(event, count)
        return float(acc.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def epsilon_without_replacement(population: int, rounds: list[tuple[int, float]], delta: float) -> float:
    """Epsilon of rounds ``(m, z)``: a fixed-size uniform sample of m out of ``population`` clients drawn without
    replacement, released through a Gaussian with noise multiplier z (std over the replace-one sensitivity)."""
    import dp_accounting as dpa

    if not rounds:
        return 0.0
    if any(z <= 0 for _, z in rounds):
        return math.inf
    events = [dpa.SampledWithoutReplacementDpEvent(population, m, dpa.GaussianDpEvent(z)) for m, z in rounds]
    return _rdp_epsilon(events, dpa.NeighboringRelation.REPLACE_ONE, delta)


def epsilon_poisson(population: int, rounds: list[tuple[int, float]], delta: float) -> float:
    """Epsilon under the DP-FedAvg assumption: Poisson sampling with rate m/N, add/remove-one, multiplier z."""
    import dp_accounting as dpa

    if not rounds:
        return 0.0
    if any(z <= 0 for _, z in rounds):
        return math.inf
    events = [dpa.PoissonSampledDpEvent(m / population, dpa.GaussianDpEvent(z)) for m, z in rounds]
    return _rdp_epsilon(events, dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, delta)


def epsilon_gaussian(releases: int, noise_multiplier: float, delta: float) -> float:
    """Epsilon of ``releases`` Gaussian releases (no sampling) with ``noise_multiplier`` = std / sensitivity."""
    import dp_accounting as dpa

    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    return _rdp_epsilon([dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(noise_multiplier), releases)],
                        dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, delta)


def local_noise_std(settings: RunSettings) -> float:
    """Std of the Gaussian noise Flower's ``LocalDpMod`` adds: ``sensitivity * sqrt(2 ln(1.25/delta)) / eps``."""
    p = settings.privacy
    return p.local_sensitivity * math.sqrt(2 * math.log(1.25 / p.target_delta)) / p.local_epsilon


def _finite(x: float) -> float | None:
    return None if math.isinf(x) or math.isnan(x) else float(x)


def privacy_report(settings: RunSettings, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``privacy`` section of results.json: mode, noise, clipping, sampling rate, rounds, (epsilon, delta)."""
    p = settings.privacy
    n = settings.partition.num_clients
    m = num_sampled_clients(settings)
    out: dict[str, Any] = {"mode": p.mode, "delta": p.target_delta, "population": n, "clients_per_round": m,
                           "sampling_rate": m / n, "rounds": len(rounds)}
    if p.mode == "none":
        out["epsilon"] = None
        return out
    if p.mode == "local":
        std = local_noise_std(settings)
        # the clipped update of one device can change by up to 2C between any two of its data sets
        z_local = std / (2 * p.clipping_norm)
        out.update({
            "mechanism": "Flower LocalDpMod: clip to C, add N(0, std^2) per coordinate before upload",
            "clipping_norm": p.clipping_norm, "noise_std": std, "local_epsilon_per_release": p.local_epsilon,
            "local_sensitivity": p.local_sensitivity,
            "noise_multiplier": z_local,
            "accountant": ACCOUNTANT,
            # worst case: a device sampled in every round
            "epsilon": _finite(epsilon_gaussian(len(rounds), z_local, p.target_delta)),
            "note": "local DP per device, composed over every round (a device may be sampled each round); the "
                    "per-release epsilon uses the classic Gaussian calibration, valid for epsilon < 1",
        })
        return out
    releases = [r["privacy"] for r in rounds if isinstance(r.get("privacy"), dict) and r["privacy"].get("released")]
    wor = [(int(r["sampled"]), float(r["z_replace_one"])) for r in releases]
    poisson = [(int(r["sampled"]), float(r["z_add_remove"])) for r in releases]
    clips = [float(r["clipping_norm"]) for r in releases]
    out.update({
        "noise_multiplier": p.noise_multiplier,
        "clipping_norm": p.clipping_norm,
        "clipping_norm_final": clips[-1] if clips else p.clipping_norm,
        "releases": len(releases),
        "effective_noise_multiplier_min": min((z for _, z in poisson), default=None),
        "accountant": ACCOUNTANT,
        "accounting": "SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z_eff/2)) per released round, "
                      "replace-one relation (sensitivity 2C), the sampler Flower uses",
        "epsilon": _finite(epsilon_without_replacement(n, wor, p.target_delta)),
        "epsilon_poisson_add_remove": _finite(epsilon_poisson(n, poisson, p.target_delta)),
        "covers": "model updates; training metrics and federated-evaluation metrics are sent without noise",
    })
    if settings.secagg.enabled:
        out["note"] = "noise added by Flower's legacy client-side wrapper to the SecAgg+ aggregate"
    return out
