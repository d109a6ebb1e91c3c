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
  mechanism only if the average gives every client the same weight: DP runs average uniformly (devices declare
  the constant weight 1, and the server sets each accepted reply's ``num-examples`` to 1 before aggregation,
  :func:`before_aggregate`, so a declared weight can never make one device's update dominate).
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

Device metrics under DP (every mode but ``none``): the mechanisms above cover the model update only, so
devices send no other value computed from their data (``client.privacy``): a train reply carries
``num-examples = 1`` (a public constant; plus Flower's ``norm_bit`` under ``client-adaptive``, released by the
wrapper with noise and counted through the clipped-count term of :func:`effective_noise_multipliers`), and
evaluate messages are refused. :func:`wrap_strategy` turns federated evaluation off (``fraction_evaluate = 0``)
and aggregates no train metrics; ``results.json`` says so (``privacy.device_metrics``). Central evaluation on
the server's own held-out sessions is unaffected.

Screening and clipping, in this order (:func:`dp_pipeline`, reported as ``privacy.order``): the device trains,
clips to C (``client-*``; ``local`` also adds its noise) and sends; the server screens each reply (error,
weight, finite values, keys, shapes, dtype, then the ``faults.max-update-norm`` bound on the update's L2
norm), then the DP wrapper clips (``server-*``), averages uniformly and adds noise. A norm screen must not make
a decision that depends on a device's data beyond what DP releases (the number of averaged updates is
published), so :func:`check_privacy_settings` refuses a norm bound before the server's clip (``server-*``), one
below an honest device's clipped norm (``client-fixed`` with a bound <= C), and one beside a clipping norm that
moves (``client-adaptive``). Under ``client-fixed`` a bound above C only rejects a device that did not clip;
under ``local`` the screen sees a noised, locally private update, so any bound is post-processing.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as fs

from client.privacy import DP_TRAIN_WEIGHT, analytic_gaussian_std, classic_gaussian_std
from server.strategies import base_fedavg
from shared_model.config import ConfigError, RunSettings
from shared_model.records import METRICS, NUM_EXAMPLES, NUM_STEPS, TRAIN_LOSS, TRAIN_SECONDS

log = logging.getLogger(__name__)

CENTRAL_MODES = ("server-fixed", "server-adaptive", "client-fixed", "client-adaptive")
ADAPTIVE_MODES = ("server-adaptive", "client-adaptive")
# base strategies whose aggregate_train is FedAvg's weighted average (what the wrappers' noise is calibrated to)
DP_BASE_STRATEGIES = ("fedavg", "fedprox")
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
    _check_screen_composes_with_clipping(settings)
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


def _check_screen_composes_with_clipping(settings: RunSettings) -> None:
    """The norm screen (``faults.max-update-norm``) runs before the server's clip and after the device's: refuse
    a bound whose accept/reject decision would depend on an honest device's data (module docstring)."""
    p, bound = settings.privacy, settings.faults.max_update_norm
    if bound <= 0 or p.mode == "local":
        return
    if p.mode in ("server-fixed", "server-adaptive", "client-adaptive"):
        where = ("before the server clips it" if p.mode.startswith("server")
                 else "while the clipping norm adapts")
        raise ConfigError(f"faults.max-update-norm={bound:g} with privacy.mode={p.mode!r}: the screen would reject "
                          f"updates by their norm {where}, and which device was rejected is not private; DP "
                          "clipping already bounds every update, set faults.max-update-norm=0")
    if p.mode == "client-fixed" and bound <= p.clipping_norm:
        raise ConfigError(f"faults.max-update-norm={bound:g} must be 0 or above privacy.clipping-norm="
                          f"{p.clipping_norm:g} with privacy.mode='client-fixed': devices clip to that norm, so a "
                          "smaller bound would reject honest updates by their norm")


def dp_pipeline(settings: RunSettings) -> list[str]:
    """What happens to one device's update, in order, under ``privacy.mode`` (results.json ``privacy.order``)."""
    p = settings.privacy
    steps = ["device: train the head"]
    if p.mode in ("client-fixed", "client-adaptive"):
        steps.append("device: clip the update to the clipping norm (Flower's "
                     f"{'fixed' if p.mode == 'client-fixed' else 'adaptive'}clipping_mod)")
    elif p.mode == "local":
        steps.append("device: clip the update to the clipping norm and add Gaussian noise (AnalyticLocalDpMod)")
    if p.mode != "none":
        steps.append(f"device: drop every metric but num-examples = {DP_TRAIN_WEIGHT}")
    if settings.secagg.enabled:
        steps.append("device: SecAgg+ masks the update; the server screens only the aggregate")
    else:
        bound = settings.faults.max_update_norm
        steps.append("server: screen the reply (error, weight, finite, keys, shapes, dtype"
                     + (f", update norm <= {bound:g})" if bound > 0 else ")"))
    if p.mode in ("server-fixed", "server-adaptive"):
        steps.append("server: clip each accepted update to the clipping norm (Flower's DP wrapper)")
    if p.mode in CENTRAL_MODES:
        steps += ["server: uniform average of the accepted updates",
                  "server: add Gaussian noise, std = noise-multiplier * clipping-norm / sampled clients"]
    elif p.mode == "local":
        steps.append("server: uniform average (devices declare weight 1; the strategy's aggregate)")
    else:
        steps.append("server: the strategy's aggregate (weighted by num-examples for FedAvg)")
    return steps


def _withhold_device_metrics(strategy: fs.Strategy, settings: RunSettings) -> None:
    """Under DP: no federated evaluation, no aggregated train metrics (devices send none: client.privacy)."""
    inner = base_fedavg(strategy)
    if inner.fraction_evaluate > 0:
        log.warning("privacy.mode=%s: federated evaluation is off (strategy.fraction-evaluate=%g ignored): device "
                    "metrics are not covered by DP, so devices do not send them", settings.privacy.mode,
                    inner.fraction_evaluate)
    inner.fraction_evaluate, inner.min_evaluate_nodes = 0.0, 0
    inner.train_metrics_aggr_fn = _no_metrics


def _no_metrics(contents: list[RecordDict], weighting_key: str) -> MetricRecord:
    return MetricRecord()


def wrap_strategy(strategy: fs.Strategy, settings: RunSettings) -> fs.Strategy:
    """``strategy`` wrapped in the Flower DP wrapper that ``privacy.mode`` names (or returned as is); under any DP
    mode without federated evaluation and without aggregated device metrics."""
    check_privacy_settings(settings)
    p = settings.privacy
    if p.mode != "none":
        _withhold_device_metrics(strategy, settings)
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

    Devices already declare weight 1 under DP (``client.privacy``); the server sets it anyway, so a device that
    declares another weight cannot tilt the average. Returns what :func:`release_record` needs (the clipping norm
    in force while clipping), or None without DP.
    """
    if not is_dp_wrapper(strategy):
        return None
    for msg in replies:
        msg.content.metric_records[METRICS][NUM_EXAMPLES] = DP_TRAIN_WEIGHT
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


def local_noise_std(settings: RunSettings) -> float:
    """Std of the Gaussian noise a device adds under ``privacy.mode = local`` (``client.privacy.AnalyticLocalDpMod``):
    the analytic Gaussian mechanism for (``local-epsilon``, ``target-delta``) at ``local-sensitivity``."""
    p = settings.privacy
    return analytic_gaussian_std(p.local_epsilon, p.target_delta, p.local_sensitivity)


def epsilon_gaussian_exact(releases: int, noise_multiplier: float, delta: float) -> float:
    """Tight epsilon of ``releases`` Gaussian releases (no sampling), std / sensitivity = ``noise_multiplier``:
    they compose exactly into one Gaussian with multiplier ``noise_multiplier / sqrt(releases)`` (Gaussian DP),
    whose epsilon is the analytic one (Balle & Wang 2018)."""
    from dp_accounting.gaussian_mechanism import get_epsilon_gaussian

    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    return float(get_epsilon_gaussian(noise_multiplier / math.sqrt(releases), delta))


def device_metrics_report(settings: RunSettings) -> dict[str, Any]:
    """What devices send besides the model update (results.json ``privacy.device_metrics``)."""
    mode = settings.privacy.mode
    if mode == "none":
        return {"train": "sent without noise (num-examples, train-loss, num-steps)",
                "evaluate": "sent without noise (num-examples and NDCG/MRR/recall per device)"}
    sent = [f"{NUM_EXAMPLES} = {DP_TRAIN_WEIGHT} (a public constant, not the device's example count)"]
    if mode == "client-adaptive":
        sent.append("norm_bit (released only as a noisy count; counted by the accountant)")
    return {"train_sent": sent, "train_withheld": [TRAIN_LOSS, NUM_STEPS, TRAIN_SECONDS, f"the true {NUM_EXAMPLES}"],
            "evaluate": "not sent: federated evaluation is off under DP (devices refuse evaluate messages); the "
                        "server evaluates on its own held-out sessions",
            "aggregated_train_metrics": "none"}


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
    out["order"] = dp_pipeline(settings)
    out["device_metrics"] = device_metrics_report(settings)
    if p.mode == "local":
        std = local_noise_std(settings)
        # the clipped update of one device can change by up to 2C between any two of its data sets
        z_local = std / (2 * p.clipping_norm)
        out.update({
            "mechanism": "AnalyticLocalDpMod (Flower's LocalDpMod, analytic calibration): clip to C, add "
                         "N(0, std^2) per coordinate before upload",
            "calibration": "analytic Gaussian mechanism (Balle & Wang 2018), valid for every epsilon",
            "clipping_norm": p.clipping_norm, "noise_std": std, "local_epsilon_per_release": p.local_epsilon,
            "local_sensitivity": p.local_sensitivity,
            "noise_std_classic_calibration": classic_gaussian_std(p.local_epsilon, p.target_delta,
                                                                  p.local_sensitivity),
            "noise_multiplier": z_local,
            "epsilon_per_release": _finite(epsilon_gaussian_exact(1, z_local, p.target_delta)),
            "accountant": "dp_accounting.gaussian_mechanism (exact composition of Gaussian releases)",
            # worst case: a device sampled in every round
            "epsilon": _finite(epsilon_gaussian_exact(len(rounds), z_local, p.target_delta)),
            "note": "local DP per device (any two data sets of one device), composed over every round (a device "
                    "may be sampled each round); epsilon_per_release is at the true sensitivity 2 x clipping_norm, "
                    "so at most local_epsilon_per_release",
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
        "covers": "model updates" + (" and the clipped-count bits" if p.mode in ADAPTIVE_MODES else "")
                  + "; devices send no other metric (privacy.device_metrics)",
    })
    if settings.secagg.enabled:
        out["note"] = "noise added by Flower's legacy client-side wrapper to the SecAgg+ aggregate"
    return out
