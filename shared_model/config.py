"""Configuration dataclasses.

Every default lives once, in ``pyproject.toml`` under ``[tool.flwr.app.config]`` (flat, dotted, kebab-case keys
such as ``model.fusion`` or ``train.lr``). :func:`parse_run_config` turns that flat dict (Flower's
``context.run_config``, or a scenario file merged over the defaults) into frozen dataclasses once; code below the
app modules only ever sees the dataclasses.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from shared_model.compression import DOWNLINK_SCHEMES, Codec
from shared_model.head_features import DENSE_DIM, IMAGE_DIM, TEXT_DIM, VIDEO_DIM

FUSION_MODES = ("concat", "gated", "attention")
REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A configuration key is unknown or a value has the wrong type or range."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the fused ranking head. Saved inside every checkpoint, so a file rebuilds its own model."""

    fusion: str = "gated"
    text_dim: int = TEXT_DIM
    image_dim: int = IMAGE_DIM
    video_dim: int = VIDEO_DIM
    dense_dim: int = DENSE_DIM
    proj_dim: int = 48
    hidden: int = 96
    dropout: float = 0.1
    use_image: bool = True
    use_video: bool = True
    use_user: bool = True
    personal_layers: bool = False

    def __post_init__(self) -> None:
        if self.fusion not in FUSION_MODES:
            raise ConfigError(f"model.fusion: {self.fusion!r} is not one of {FUSION_MODES}")
        if self.proj_dim <= 0 or self.hidden <= 0:
            raise ConfigError("model.proj-dim and model.hidden must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: {self.dropout} not in [0, 1)")
        if self.video_dim != self.image_dim:
            raise ConfigError("model: video_dim must equal image_dim (video frames go through the image encoder)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEBIAS_MODES = ("ips", "offset")
ALIGN_POSITIVES = ("purchases", "clicks")


@dataclass(frozen=True)
class TrainConfig:
    """How the head is trained, centrally or on a device."""

    loss: str = "softmax"
    ips: bool = True  # correct the clicks for position bias (false: naive clicks)
    debias: str = "offset"  # how, when ips is on: "offset" (log-propensity score offset) or "ips" (weights)
    ips_clip: float = 20.0
    # query-image alignment (FusedRankingHead.align_loss): weight of the contrastive term; > 0 also stops the
    # ranking loss's gradient at the image projection, which then learns from the alignment alone. 0 = off.
    align_weight: float = 1.0
    align_temperature: float = 0.1
    # the alignment's positives: "clicks" (the slate's clicked candidates) or "purchases" (its purchased ones;
    # clicks when the slates being trained on hold no purchase at all). Purchases help a centrally trained head
    # but hurt FedAvg's (README), so clicks stay the default.
    align_positives: str = "clicks"
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    finetune_steps: int = 0  # on-device personalization: steps of local fine-tuning before evaluation (0 = off)
    finetune_lr: float = 3e-4
    finetune_batch_size: int = 16
    finetune_ips_clip: float = 3.0  # tighter than training's: a single device's IPS weights are high-variance

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.local_epochs < 0 or self.lr <= 0:
            raise ConfigError("train.batch-size and train.lr must be positive, train.local-epochs >= 0")
        if self.debias not in DEBIAS_MODES:
            raise ConfigError(f"train.debias must be one of {DEBIAS_MODES}, got {self.debias!r}")
        if self.align_weight < 0 or self.align_temperature <= 0:
            raise ConfigError("train.align-weight must be >= 0 and train.align-temperature > 0")
        if self.align_positives not in ALIGN_POSITIVES:
            raise ConfigError(f"train.align-positives must be one of {ALIGN_POSITIVES}, got {self.align_positives!r}")
        if self.ips_clip <= 0 or self.finetune_ips_clip <= 0:
            raise ConfigError("train.ips-clip and train.finetune-ips-clip must be > 0")


def _coerce(section: str, key: str, value: Any, target: Any) -> Any:
    kind = type(target)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{section}.{key}: expected true/false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{section}.{key}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{section}.{key}: expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{section}.{key}: expected a string, got {value!r}")
    return value


def section_to_dataclass(cls: type, section: str, flat: Mapping[str, Any], strict: bool = True) -> Any:
    """Build dataclass ``cls`` from the ``section.*`` keys of a flat run config (kebab-case keys)."""
    default = cls()
    known = {f.name.replace("_", "-"): f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for full_key, value in flat.items():
        head, _, key = full_key.partition(".")
        if head != section:
            continue
        if key not in known:
            if strict:
                raise ConfigError(f"unknown config key {full_key!r}; valid: {sorted(section + '.' + k for k in known)}")
            continue
        name = known[key]
        kwargs[name] = _coerce(section, key, value, getattr(default, name))
    return cls(**kwargs)


def load_defaults(pyproject: Path | None = None) -> dict[str, Any]:
    """The run-config defaults declared in ``pyproject.toml`` (``[tool.flwr.app.config]``), read once per process
    and file: the ClientApp and its mods ask for them on every message."""
    return dict(_read_defaults(pyproject or REPO_ROOT / "pyproject.toml"))


@functools.lru_cache(maxsize=8)
def _read_defaults(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    return dict(data["tool"]["flwr"]["app"]["config"])


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested TOML tables into dotted keys, as Flower does for run configs."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def merge_overrides(defaults: Mapping[str, Any], overrides: Mapping[str, Any], source: str = "overrides") -> dict[str, Any]:
    """Overlay ``overrides`` on ``defaults``; unknown keys and type changes are errors naming ``source``."""
    merged = dict(defaults)
    for key, value in overrides.items():
        if key not in defaults:
            raise ConfigError(f"{source}: unknown config key {key!r}")
        dv = defaults[key]
        ok = (
            (isinstance(dv, bool) and isinstance(value, bool))
            or (isinstance(dv, int) and not isinstance(dv, bool) and isinstance(value, int) and not isinstance(value, bool))
            or (isinstance(dv, float) and isinstance(value, int | float) and not isinstance(value, bool))
            or (isinstance(dv, str) and isinstance(value, str))
        )
        if not ok:
            raise ConfigError(f"{source}: {key} expects {type(dv).__name__}, got {value!r}")
        merged[key] = float(value) if isinstance(dv, float) else value
    return merged


@dataclass(frozen=True)
class DataConfig:
    dir: str = "data/default"
    seed: int = 0
    preset: str = "default"


# ``strategy.name`` -> the Flower strategy class (``flwr.serverapp.strategy``) that ``server.strategies`` builds
STRATEGY_CLASSES = {
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "fedadam": "FedAdam",
    "fedyogi": "FedYogi",
    "fedmedian": "FedMedian",
    "fedtrimmedavg": "FedTrimmedAvg",
    "krum": "Krum",
}
# asynchronous strategies: the server's own loop (server/buffered.py) over a Flower FedAvg subclass
ASYNC_STRATEGIES = ("fedbuff",)
STRATEGY_NAMES = tuple(STRATEGY_CLASSES) + ASYNC_STRATEGIES


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_train_clients: int = 2
    min_available_clients: int = 2
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    trim_beta: float = 0.2
    num_malicious: int = 0
    # fedbuff (asynchronous, buffered): devices training at once, updates per server step, staleness weighting
    concurrency: int = 30
    buffer_size: int = 10
    staleness_exponent: float = 0.5  # an update s server steps old counts (1 + s) ** -exponent
    buffer_lr: float = 1.0  # server step size on the buffered mean update

    def __post_init__(self) -> None:
        if self.name.lower() not in STRATEGY_NAMES:
            raise ConfigError(f"strategy.name: {self.name!r} is not one of {STRATEGY_NAMES}")
        if not 0.0 < self.fraction_train <= 1.0 or not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ConfigError("strategy.fraction-train must be in (0, 1] and strategy.fraction-evaluate in [0, 1]")
        if self.concurrency < 1 or not 1 <= self.buffer_size <= self.concurrency:
            raise ConfigError(f"strategy.buffer-size ({self.buffer_size}) must be in [1, strategy.concurrency "
                              f"({self.concurrency})]")
        if self.staleness_exponent < 0 or self.buffer_lr <= 0:
            raise ConfigError("strategy.staleness-exponent must be >= 0 and strategy.buffer-lr > 0")

    @property
    def is_async(self) -> bool:
        return self.name.lower() in ASYNC_STRATEGIES


@dataclass(frozen=True)
class ServerConfig:
    num_rounds: int = 3
    out_dir: str = "runs/flwr"
    eval_every: int = 1
    round_timeout: float = 600.0
    resume: bool = True
    seed: int = 0
    # tail averaging: the mean of the last N rounds' global heads (at most the run's last third) is written as
    # averaged.pt beside last.pt and evaluated in results.json; 0 or 1 = off
    average_rounds: int = 10

    def __post_init__(self) -> None:
        if self.average_rounds < 0:
            raise ConfigError(f"server.average-rounds: {self.average_rounds} must be >= 0")


@dataclass(frozen=True)
class PartitionConfig:
    scheme: str = "natural"
    num_clients: int = 20
    alpha: float = 0.5
    seed: int = 0


PRIVACY_MODES = ("none", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive", "local")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy. Client-level DP through Flower's strategy wrappers (``server-*`` clip on the server,
    ``client-*`` clip on the device through Flower's client mods), or local DP on the device (``local``)."""

    mode: str = "none"
    noise_multiplier: float = 0.0
    clipping_norm: float = 1.0
    target_delta: float = 1e-5
    target_quantile: float = 0.5  # adaptive clipping: quantile of update norms to track
    clip_lr: float = 0.2  # adaptive clipping: step size of the clipping-norm update
    clipped_count_stddev: float = 0.0  # adaptive clipping: noise on the clipped-count; 0 = Flower's default
    local_epsilon: float = 1.0  # local DP: epsilon of each upload (analytic Gaussian mechanism, at target-delta)
    # local DP: L2 sensitivity the noise is sized for; at least 2 x clipping-norm (any two clipped updates of a
    # device differ by at most the diameter of the clipping ball)
    local_sensitivity: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in PRIVACY_MODES:
            raise ConfigError(f"privacy.mode: {self.mode!r} is not one of {PRIVACY_MODES}")
        if self.noise_multiplier < 0 or self.clipping_norm <= 0:
            raise ConfigError("privacy.noise-multiplier must be >= 0 and privacy.clipping-norm > 0")
        if not 0.0 < self.target_delta < 1.0:
            raise ConfigError(f"privacy.target-delta: {self.target_delta} not in (0, 1)")
        if not 0.0 <= self.target_quantile <= 1.0 or self.clip_lr <= 0 or self.clipped_count_stddev < 0:
            raise ConfigError("privacy.target-quantile must be in [0, 1], privacy.clip-lr > 0 and "
                              "privacy.clipped-count-stddev >= 0")
        if self.local_epsilon <= 0 or self.local_sensitivity < 0:
            raise ConfigError("privacy.local-epsilon must be > 0 and privacy.local-sensitivity >= 0")
        if self.mode == "local" and self.local_sensitivity < 2 * self.clipping_norm:
            raise ConfigError(f"privacy.local-sensitivity={self.local_sensitivity:g} must be >= 2 x "
                              f"privacy.clipping-norm ({self.clipping_norm:g}) for privacy.mode='local': two "
                              "clipped updates of one device can differ by that much, so a smaller sensitivity "
                              "would state an epsilon the noise does not give")


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation with Flower's SecAgg+ workflow and client mod."""

    enabled: bool = False
    num_shares: int = 3
    reconstruction_threshold: int = 2
    clipping_range: float = 8.0
    quantization_range: int = 4194304
    max_weight: float = 10000.0

    def __post_init__(self) -> None:
        # Flower's SecAggPlusWorkflow: an integer num_shares > 2 and 2 <= threshold < num_shares
        if self.enabled and not (self.num_shares > 2 and 2 <= self.reconstruction_threshold < self.num_shares):
            raise ConfigError("secagg.num-shares must be > 2 and secagg.reconstruction-threshold in "
                              "[2, secagg.num-shares)")
        if self.clipping_range <= 0 or self.quantization_range <= 1 or self.max_weight <= 0:
            raise ConfigError("secagg.clipping-range, secagg.max-weight must be > 0 and secagg.quantization-range > 1")
        if self.quantization_range >= 2**32:
            raise ConfigError("secagg.quantization-range must be below the 2^32 modulus of Flower's SecAgg+")


BYZANTINE_ATTACKS = ("sign-flip", "noise", "poisoned-clicks")


@dataclass(frozen=True)
class FaultConfig:
    """Faults injected in simulation: crashes, stragglers and Byzantine devices (chosen per client and round
    from ``server.seed``, so a run is reproducible). ``max-update-norm`` (0 = off) is the server's norm bound."""

    crash_prob: float = 0.0
    straggler_prob: float = 0.0
    straggler_delay: float = 0.0
    byzantine_fraction: float = 0.0
    byzantine_attack: str = "sign-flip"
    byzantine_scale: float = 5.0
    max_update_norm: float = 0.0
    # simulated device time (server/simclock.py): a training job takes job-seconds, slow-factor times that on a
    # seeded slow-fraction of the devices; rounds and asynchronous updates are stamped with this clock
    job_seconds: float = 1.0
    slow_fraction: float = 0.0
    slow_factor: float = 5.0
    sim_timeout: float = 0.0  # synchronous rounds: simulated seconds the server waits (0 = for every device)

    def __post_init__(self) -> None:
        if not 0.0 <= self.slow_fraction <= 1.0 or self.slow_factor < 1.0 or self.job_seconds <= 0:
            raise ConfigError("faults.slow-fraction must be in [0, 1], faults.slow-factor >= 1 and "
                              "faults.job-seconds > 0")
        if self.sim_timeout < 0:
            raise ConfigError("faults.sim-timeout must be >= 0 (0: no simulated timeout)")
        for name in ("crash_prob", "straggler_prob", "byzantine_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"faults.{name.replace('_', '-')}: {v} not in [0, 1]")
        if self.byzantine_attack not in BYZANTINE_ATTACKS:
            raise ConfigError(f"faults.byzantine-attack: {self.byzantine_attack!r} is not one of {BYZANTINE_ATTACKS}")
        if self.straggler_delay < 0 or self.max_update_norm < 0:
            raise ConfigError("faults.straggler-delay and faults.max-update-norm must be >= 0")


@dataclass(frozen=True)
class CompressionConfig:
    """What crosses the network each round (``shared_model.compression``): the device's update as a delta from the
    head it received, encoded by ``uplink`` (none / fp16 / int8 / topk), and the global head as fp16 when
    ``downlink = "fp16"``."""

    uplink: str = "none"
    downlink: str = "fp32"
    int8_granularity: str = "tensor"  # one scale per tensor, or per output channel ("channel")
    stochastic_rounding: bool = True  # int8: unbiased stochastic rounding (else round to nearest)
    topk_fraction: float = 0.1  # topk: share of each tensor's entries sent
    error_feedback: bool = True  # topk: entries not sent stay on the device and join its next update

    def __post_init__(self) -> None:
        if self.downlink not in DOWNLINK_SCHEMES:
            raise ConfigError(f"compression.downlink: {self.downlink!r} is not one of {DOWNLINK_SCHEMES}")
        try:
            self.codec()
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def codec(self) -> Codec:
        return Codec(self.uplink, self.int8_granularity, self.stochastic_rounding, self.topk_fraction,
                     self.error_feedback)

    @property
    def enabled(self) -> bool:
        return self.uplink != "none" or self.downlink != "fp32"


SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "train": TrainConfig,
    "strategy": StrategyConfig, "server": ServerConfig, "partition": PartitionConfig,
    "privacy": PrivacyConfig, "secagg": SecAggConfig, "faults": FaultConfig, "compression": CompressionConfig,
}


@dataclass(frozen=True)
class RunSettings:
    """The whole run configuration, parsed once from Flower's flat ``run_config``."""

    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    strategy: StrategyConfig
    server: ServerConfig
    partition: PartitionConfig
    privacy: PrivacyConfig
    secagg: SecAggConfig
    faults: FaultConfig
    compression: CompressionConfig = CompressionConfig()

    def __post_init__(self) -> None:
        if self.strategy.is_async and (self.secagg.enabled or self.privacy.mode != "none"):
            raise ConfigError(
                f"strategy.name = {self.strategy.name!r} cannot be combined with secagg.enabled = "
                f"{str(self.secagg.enabled).lower()} / privacy.mode = {self.privacy.mode!r}: SecAgg+ needs a "
                "synchronous cohort, and the DP accountant counts synchronous rounds of sampled devices")
        if self.secagg.enabled and self.compression.enabled:
            raise ConfigError(
                "secagg.enabled = true cannot be combined with compression.uplink = "
                f"{self.compression.uplink!r} / compression.downlink = {self.compression.downlink!r}: SecAgg+ "
                "quantizes and masks the update itself (secagg.quantization-range); set compression.uplink = "
                "\"none\" and compression.downlink = \"fp32\"")

    def to_flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in SECTIONS:
            for k, v in asdict(getattr(self, name)).items():
                out[f"{name}.{k.replace('_', '-')}"] = v
        return out


def parse_run_config(flat: Mapping[str, Any]) -> RunSettings:
    """Parse a flat run config (dotted kebab-case keys); unknown keys and wrong types raise ConfigError.

    Keys absent from ``flat`` take the dataclass defaults (which mirror pyproject's run config).
    """
    unknown = [k for k in flat if k.partition(".")[0] not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown config keys {sorted(unknown)}; sections are {sorted(SECTIONS)}")
    parsed = {name: section_to_dataclass(cls, name, flat) for name, cls in SECTIONS.items()}
    return RunSettings(**parsed)


Layer = tuple[str, Mapping[str, Any]]  # (source named in errors, flat overrides)


def resolve_run_config(*layers: Layer) -> dict[str, Any]:
    """The one config resolver: pyproject defaults, then each layer in order (low to high: scenario, Flower's
    run config, command line / programmatic overrides). Unknown keys and type changes name their layer."""
    flat = load_defaults()
    for source, overrides in layers:
        flat = merge_overrides(flat, overrides, source)
    return flat


def resolve_settings(*layers: Layer) -> RunSettings:
    """:func:`resolve_run_config` parsed into :class:`RunSettings`, once per process for the same layers: the
    ClientApp's handlers and its mods all ask on every message and share one frozen object."""
    key = tuple((source, tuple(sorted(overrides.items()))) for source, overrides in layers)
    return _settings_cached(key)


@functools.lru_cache(maxsize=64)
def _settings_cached(key: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]) -> RunSettings:
    return parse_run_config(resolve_run_config(*((source, dict(items)) for source, items in key)))


def scenario_layer(name_or_path: str) -> Layer:
    """A scenario file as a resolver layer."""
    return f"scenario {name_or_path}", load_scenario(name_or_path)


def load_scenario(name_or_path: str, scenarios_dir: Path | None = None) -> dict[str, Any]:
    """A scenario's overrides (flattened) from ``simulations/scenarios/NAME.toml`` or a path."""
    p = Path(name_or_path)
    if not p.suffix:
        p = (scenarios_dir or REPO_ROOT / "simulations" / "scenarios") / f"{name_or_path}.toml"
    if not p.is_file():
        avail = sorted(x.stem for x in (scenarios_dir or REPO_ROOT / "simulations" / "scenarios").glob("*.toml"))
        raise ConfigError(f"scenario {name_or_path!r} not found ({p}); available: {avail}")
    with open(p, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from e
    return flatten(data)
