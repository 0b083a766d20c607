"""darkroom's settings: built once at start, then passed explicitly to whatever needs them.

Sources, in increasing priority:

1. defaults (below),
2. a TOML file (``--config``; ``/etc/darkroom/darkroom.toml`` when present),
3. the systemd credential ``$CREDENTIALS_DIRECTORY/immich_api_key`` (``LoadCredential=``),
4. ``DARKROOM_*`` environment variables, nested with ``__`` (``DARKROOM_IMMICH__URL``).

Nothing else in darkroom reads the environment or a config file; ``load_settings`` is the
only door.  A bad value fails with :class:`SettingsError`, which names the field and the
source it came from and never echoes a secret.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from trainer.sample_defaults import (
    DEFAULT_GUIDANCE,
    DEFAULT_NEGATIVE,
    DEFAULT_SEED,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
)

DEFAULT_CONFIG_PATH = Path("/etc/darkroom/darkroom.toml")
ENV_PREFIX = "DARKROOM_"
ENV_NESTED_DELIMITER = "__"
CREDENTIAL_NAME = "immich_api_key"
# systemd exports these for StateDirectory=/CacheDirectory=; they are the natural defaults.
SYSTEMD_STATE_ENV = "STATE_DIRECTORY"
SYSTEMD_CACHE_ENV = "CACHE_DIRECTORY"
SYSTEMD_CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
FALLBACK_STATE_DIR = Path("/var/lib/darkroom")
FALLBACK_CACHE_DIR = Path("/var/cache/darkroom")

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["auto", "journal", "plain"]


class SettingsError(Exception):
    """Settings could not be built; the message names each bad field and its source."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImmichSettings(_Section):
    """Where Immich is and how darkroom talks to it."""

    url: AnyHttpUrl | None = Field(
        default=None, description="Immich base URL, with or without the trailing /api."
    )
    api_key: SecretStr | None = Field(
        default=None, description="API key; prefer the systemd credential immich_api_key."
    )
    timeout_s: float = Field(default=30.0, gt=0, description="Timeout of one HTTP call.")
    max_retries: int = Field(
        default=4, ge=0, le=10, description="Retries for connect errors, 429 and 5xx."
    )
    download_cap_mb: int = Field(
        default=200, gt=0, description="Largest original or preview darkroom will download."
    )


class OllamaSettings(_Section):
    """The vision model and the Ollama server(s) that run it."""

    hosts: list[AnyHttpUrl] = Field(
        default_factory=lambda: [AnyHttpUrl("http://127.0.0.1:11434")],
        min_length=1,
        description="One or more Ollama servers; work is spread across them.",
    )
    model: str = Field(
        default="qwen2.5vl:7b",
        min_length=1,
        description="A vision model that follows a JSON schema with images.",
    )

    @field_validator("hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        return [h.strip() for h in value.split(",")] if isinstance(value, str) else value

    parallel: int = Field(
        default=1, ge=1, le=16, description="Requests per host at once (OLLAMA_NUM_PARALLEL)."
    )
    timeout_s: float = Field(default=300.0, gt=0, description="Timeout of one model call.")
    num_ctx: int = Field(default=8192, ge=2048, description="Context length; kept constant.")
    temperature: float = Field(default=0.0, ge=0, le=2)
    seed: int = 42
    keep_alive: str = Field(default="30m", description="How long Ollama keeps the model loaded.")
    image_long_side: int = Field(
        default=1024, ge=256, le=4096, description="Images are sent downscaled to this."
    )
    orientation_long_side: int = Field(
        default=512, ge=128, le=4096, description="Size of the four orientation views."
    )


class CurationSettings(_Section):
    """What the robot critic does, and what it may write into Immich."""

    describe: bool = True
    score: bool = True
    orient: bool = True
    description_mode: Literal["fill-empty", "never"] = "fill-empty"
    rating_mode: Literal["fill-empty", "never"] = "fill-empty"
    dry_run: bool = Field(default=False, description="Compute and store, write nothing.")
    max_attempts: int = Field(default=3, ge=1, le=10, description="Tries per model answer.")
    description_max_chars: int = Field(default=2000, ge=100)
    keep_preamble: bool = Field(default=False, description='Keep "This image shows…".')
    orientation_rule: Literal["unanimous", "majority"] = "unanimous"
    review_album: str = Field(default="darkroom · check rotation", min_length=1)
    tag_prefix: str = Field(default="darkroom", min_length=1, pattern=r"^[^/]+$")


class DiscoverySettings(_Section):
    """How darkroom notices new and changed photos in Immich."""

    interval_s: float = Field(default=300.0, gt=0, description="Seconds between polls.")
    safety_margin_s: float = Field(
        default=120.0, ge=0, description="Look back this far before the last change seen."
    )
    visibilities: list[Literal["timeline", "archive", "hidden", "locked"]] = Field(
        default_factory=lambda: ["timeline", "archive"], min_length=1
    )


class DaemonSettings(_Section):
    """The long-running service: its rhythm, its health endpoint, how it stops."""

    curate_interval_s: float = Field(
        default=30.0, gt=0, description="How often pending photos are looked for."
    )
    reconcile_interval_h: float = Field(
        default=24.0, gt=0, description="Full walks of the library to notice hard deletes."
    )
    backoff_base_s: float = Field(default=5.0, gt=0, description="First wait when down.")
    backoff_max_s: float = Field(default=600.0, gt=0, description="Longest wait when down.")
    stop_timeout_s: float = Field(
        default=20.0, gt=0, description="On SIGTERM, wait this long for work in flight."
    )
    health_host: str = Field(default="127.0.0.1", description="Health endpoint address.")
    health_port: int = Field(default=8177, ge=0, le=65535, description="0: pick a free port.")
    health_enabled: bool = True


class HookSettings(_Section):
    """When the daemon starts encoding and training, each in a process of its own."""

    window: str = Field(
        default="01:00-06:00",
        pattern=r"^$|^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$",
        description='Local time window "HH:MM-HH:MM" (may wrap midnight); "": any time.',
    )
    min_new_samples: int = Field(
        default=200, ge=0, description="Curated photos since the last run needed to start."
    )
    encode_command: list[str] | None = Field(
        default=None, description="Command that fills the training cache."
    )
    train_command: list[str] | None = Field(
        default=None, description="Command that resumes training."
    )
    check_interval_s: float = Field(default=60.0, gt=0)
    train_stop_command: list[str] = Field(
        default_factory=list,
        description="Run at the window's end to stop training; []: SIGTERM to train_command.",
    )
    train_stop_timeout_s: float = Field(
        default=300.0, gt=0, description="After the stop, wait this long for the checkpoint."
    )
    restart_backoff_s: float = Field(
        default=60.0, gt=0, description="First wait before restarting a crashed trainer."
    )
    restart_backoff_max_s: float = Field(
        default=3600.0, gt=0, description="The wait doubles after each crash, up to this."
    )
    max_restarts: int = Field(default=5, ge=0, le=100, description="Crash restarts per run.")
    samples_command: list[str] | None = Field(
        default=None,
        description="Run after training: renders, evaluation, uploads (darkroom samples).",
    )


DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?|xpu(:\d+)?)$"


class CacheSettings(_Section):
    """Which photos become training samples, and how ``darkroom encode`` encodes them."""

    model: str = Field(
        default="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
        min_length=1,
        description="Base model: a local folder or a Hugging Face id (diffusers layout).",
    )
    min_rating: int = Field(
        default=3, ge=1, le=5, description="Stars a photo needs; a person's rating outranks ours."
    )
    thin_duplicates: bool = Field(
        default=False, description="Keep only the best photo of each Immich duplicate group."
    )
    prefer_original: bool = Field(
        default=True, description="Encode the original when Pillow reads it; else the preview."
    )
    max_original_mb: float = Field(default=200.0, gt=0, description="Larger originals: preview.")
    max_upscale: float = Field(
        default=1.0, ge=1.0, le=4.0, description="How far a photo may be enlarged to fill a bucket."
    )
    max_aspect: float = Field(
        default=2.75, ge=1.0, description="Long side / short side beyond which a photo is skipped."
    )
    heic: bool = Field(
        default=True, description="Read HEIC originals when pillow-heif is installed."
    )
    vae_device: str = Field(
        default="auto", pattern=DEVICE_PATTERN, description="auto: the training device."
    )
    vae_precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    vae_batch_size: int = Field(default=4, ge=1, le=64)
    text_device: str = Field(
        default="cpu",
        pattern=DEVICE_PATTERN,
        description="auto: a GPU when present and no training is running, else the CPU.",
    )
    text_precision: Literal["bf16", "fp16", "fp32", "8bit"] = Field(
        default="bf16", description="8bit needs bitsandbytes and a CUDA GPU."
    )
    text_offload: bool = Field(default=False, description="On a GPU: spill layers to the CPU.")
    text_batch_size: int = Field(default=8, ge=1, le=256)
    max_caption_tokens: int = Field(default=300, ge=1, le=512)
    latent_dtype: Literal["fp16", "bf16"] = "fp16"
    commit_every: int = Field(
        default=64, ge=1, description="Samples per append; a crash loses at most this many."
    )
    held_out_every: int = Field(
        default=50, ge=0, description="1 photo in N is held out, never trained on; 0: none."
    )
    held_out_max: int = Field(
        default=64, ge=1, description="Held-out photos encoded for evaluation, at most."
    )


class TrainSettings(_Section):
    """How ``darkroom train`` trains; the memory preset bundles precision, optimizer, batch."""

    preset: Literal["12gb", "24gb", "cpu-test"] = Field(
        default="12gb", description="Memory preset (README, Training)."
    )
    device: str = Field(default="auto", pattern=DEVICE_PATTERN, description="auto: cuda, xpu…")
    seed: int = Field(default=0, ge=0, description="Seeds noise, timesteps, dropout, rounding.")
    learning_rate: float | None = Field(default=None, gt=0, description="None: the preset's.")
    checkpoint_every: int = Field(default=500, ge=1, description="Optimizer steps per checkpoint.")
    keep_last: int = Field(default=3, ge=1, description="Newest checkpoints kept.")
    milestone_every: int = Field(default=5000, ge=0, description="Kept forever; 0: none.")
    min_snr_gamma: float | None = Field(default=None, gt=0, description="Min-SNR weighting.")
    ema_decay: float | None = Field(default=None, gt=0, lt=1, description="EMA of the weights.")
    log_every: int = Field(default=10, ge=1, description="Optimizer steps per log line.")
    tensorboard: bool = Field(default=False, description="TensorBoard event files too.")
    device_watts: float | None = Field(
        default=None, gt=0, description="Power draw for the energy estimate; None: read it."
    )
    energy_price_per_kwh: float | None = Field(
        default=None, gt=0, description="Electricity price, for the cost estimate."
    )


class ValidationPrompt(_Section):
    """A prompt rendered by every checkpoint, always with the same seed."""

    prompt: str = Field(min_length=1)
    seed: int = Field(default=DEFAULT_SEED, ge=0)


DEFAULT_VALIDATION_PROMPTS = (
    "a portrait of an old fisherman on the harbour wall in soft golden hour light",
    "a quiet lake at dawn with mist over the water, a wooden rowing boat",
    "a tabby cat asleep on the kitchen table by a sunlit window",
    "a narrow alley after the rain, neon signs reflected in the cobblestones",
)


class SamplesSettings(_Section):
    """``darkroom generate``, the validation renders after each checkpoint, and uploads."""

    prompts: list[ValidationPrompt] = Field(
        default_factory=lambda: [ValidationPrompt(prompt=p) for p in DEFAULT_VALIDATION_PROMPTS],
        description="Rendered by every checkpoint with fixed seeds (the time-lapse).",
    )
    steps: int = Field(default=DEFAULT_STEPS, ge=1, le=1000)
    guidance: float = Field(default=DEFAULT_GUIDANCE, ge=0)
    width: int = Field(default=DEFAULT_SIZE, description="One of the nine bucket sizes.")
    height: int = Field(default=DEFAULT_SIZE, description="One of the nine bucket sizes.")
    negative: str = DEFAULT_NEGATIVE
    device: str = Field(default="auto", pattern=DEVICE_PATTERN)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    cpu_offload: bool = Field(default=False, description="Keep idle parts in RAM (12 GB cards).")
    vae_tiling: bool = Field(default=False, description="Decode in tiles (less GPU memory).")
    upload: Literal["auto", "on", "off"] = Field(
        default="auto", description="Put results in Immich; auto: when the key has asset.upload."
    )
    album: str = Field(default="darkroom · time-lapse", min_length=1)
    frame_ms: int = Field(default=600, ge=20, description="Time-lapse: time per checkpoint.")
    hold_last_ms: int = Field(default=2000, ge=20, description="Time-lapse: last frame's time.")
    clip_model: Path | None = Field(
        default=None, description="A local CLIP model folder for CLIP scores; None: skipped."
    )
    evaluate: bool = Field(default=True, description="Held-out loss per checkpoint.")


class StudioSettings(_Section):
    """``darkroom studio``: the local web app that looks inside the model."""

    host: str = Field(
        default="127.0.0.1", description="Listen address; any other than loopback needs token."
    )
    port: int = Field(default=8178, ge=1, le=65535)
    token: SecretStr | None = Field(
        default=None, description="Required by every request when set (16+ characters)."
    )
    max_runs: int = Field(default=16, ge=1, description="Finished runs kept for scrubbing.")
    memory_mb: int = Field(default=2048, ge=64, description="Memory the kept runs may hold.")
    max_waiting: int = Field(default=8, ge=1, description="Queued runs at most; more get 503.")


class PathSettings(_Section):
    """Where darkroom keeps its state, its training cache and its checkpoints."""

    state_dir: Path = Field(description="SQLite state database lives here.")
    cache_dir: Path = Field(description="VAE latents and T5 embeddings.")
    checkpoint_dir: Path = Field(description="Training checkpoints; default state_dir/checkpoints.")
    held_out_dir: Path = Field(
        description="Held-out photos' cache (never trained on); default state_dir/held-out."
    )

    @model_validator(mode="before")
    @classmethod
    def _defaults_beside_state(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "state_dir" not in data:
            return data
        state_dir = Path(data["state_dir"])
        beside = {"checkpoint_dir": "checkpoints", "held_out_dir": "held-out"}
        defaults = {key: str(state_dir / name) for key, name in beside.items()}
        return {**defaults, **{key: value for key, value in data.items() if value is not None}}

    @property
    def database(self) -> Path:
        """The state database file."""
        return self.state_dir / "darkroom.sqlite3"


class Settings(_Section):
    """Everything darkroom can be told. Frozen: built once, passed down."""

    log_level: LogLevel = "INFO"
    log_format: LogFormat = Field(
        default="auto", description="journal: syslog priority prefixes; auto picks by stdout."
    )
    immich: ImmichSettings = ImmichSettings()
    ollama: OllamaSettings = OllamaSettings()
    curation: CurationSettings = CurationSettings()
    discovery: DiscoverySettings = DiscoverySettings()
    daemon: DaemonSettings = DaemonSettings()
    hooks: HookSettings = HookSettings()
    cache: CacheSettings = CacheSettings()
    samples: SamplesSettings = SamplesSettings()
    studio: StudioSettings = StudioSettings()
    train: TrainSettings = TrainSettings()
    paths: PathSettings

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


def default_paths(environ: Mapping[str, str]) -> dict[str, str]:
    """systemd-style default locations, honouring the directories systemd hands us."""
    state = Path(environ.get(SYSTEMD_STATE_ENV) or FALLBACK_STATE_DIR)
    cache = Path(environ.get(SYSTEMD_CACHE_ENV) or FALLBACK_CACHE_DIR)
    return {"state_dir": str(state), "cache_dir": str(cache)}


def load_settings(
    config_path: Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build the one Settings object from all sources; raise SettingsError on bad input.

    ``config_path`` None means the default file if it exists; a path given explicitly must
    exist.  ``environ`` defaults to the process environment (tests pass their own).
    """
    env = os.environ if environ is None else environ
    layers: list[tuple[str, dict[str, Any]]] = [("defaults", {"paths": default_paths(env)})]
    toml_path = _resolve_config_path(config_path)
    if toml_path is not None:
        layers.append((f"config file {toml_path}", _read_toml(toml_path)))
    credential = _read_credential(env)
    if credential is not None:
        layers.append(credential)
    layers.append(("environment", _env_layer(env)))
    merged: dict[str, Any] = {}
    for _, data in layers:
        merged = _deep_merge(merged, data)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise SettingsError(_describe_errors(exc, layers)) from None


def _resolve_config_path(config_path: Path | None) -> Path | None:
    if config_path is None:
        return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None
    if not config_path.is_file():
        raise SettingsError(f"config file {config_path} does not exist")
    return config_path


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise SettingsError(f"config file {path} cannot be read: {exc.strerror}") from None


def _read_credential(env: Mapping[str, str]) -> tuple[str, dict[str, Any]] | None:
    directory = env.get(SYSTEMD_CREDENTIALS_ENV)
    if not directory:
        return None
    path = Path(directory) / CREDENTIAL_NAME
    if not path.is_file():
        return None
    key = path.read_text(encoding="utf-8").strip()
    return (f"systemd credential {path}", {"immich": {"api_key": key}})


def _env_layer(env: Mapping[str, str]) -> dict[str, Any]:
    """DARKROOM_A__B=v becomes {"a": {"b": "v"}}; pydantic coerces the strings."""
    layer: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        keys = name[len(ENV_PREFIX) :].lower().split(ENV_NESTED_DELIMITER)
        node = layer
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise SettingsError(f"environment variable {name} conflicts with {key}")
            node = child
        node[keys[-1]] = _env_value(name, value)
    return layer


def _env_value(name: str, value: str) -> Any:
    """Lists and tables come as JSON (``["http://a:11434", "http://b:11434"]``)."""
    if not value.lstrip().startswith(("[", "{")):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"environment variable {name} is not valid JSON: {exc}") from None


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _source_of(loc: tuple[int | str, ...], layers: list[tuple[str, dict[str, Any]]]) -> str:
    """The highest-priority source that set the value at ``loc`` (or its nearest parent)."""
    for name, data in reversed(layers):
        node: Any = data
        for part in loc:
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            return name
    for depth in range(len(loc) - 1, 0, -1):
        found = _source_of(loc[:depth], layers)
        if found != "defaults":
            return found
    return "defaults"


def _may_echo(loc: tuple[int | str, ...]) -> bool:
    """Whether the input at ``loc`` may be shown: only declared, non-secret leaf fields.

    Sections and unknown keys are never echoed, since they could hold a misplaced key.
    """
    model: type[BaseModel] = Settings
    for depth, part in enumerate(loc):
        field = model.model_fields.get(str(part))
        if field is None:
            return False
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        is_leaf = depth == len(loc) - 1
        return is_leaf and "SecretStr" not in str(annotation)
    return False


def _describe_errors(exc: ValidationError, layers: list[tuple[str, dict[str, Any]]]) -> str:
    lines = ["invalid settings:"]
    for error in exc.errors():
        loc = tuple(error["loc"])
        field = ".".join(str(part) for part in loc)
        where = _source_of(loc, layers)
        value = error.get("input")
        shown = ""
        if _may_echo(loc) and isinstance(value, str | int | float | bool):
            shown = f" (got {value!r})"
        lines.append(f"  {field}: {error['msg']}{shown} [from {where}]")
    return "\n".join(lines)
