"""Fill the training cache: each photo's latent and each caption's embedding, once.

The input is a list of :class:`SampleSource` (a reference, the caption, and a way to fetch
the pixels), so this runs without the daemon: the daemon builds sources from the state
store and Immich; a test builds them from files.  For each chunk of ``commit_every``
sources, in order:

1. reuse    -- a source whose latent is stored (same pixels, rotation, preparation, VAE and
               dtype) is not fetched again;
2. prepare  -- fetch the pixels, orient, convert to sRGB, fit a bucket (``images``);
3. latents  -- VAE posterior means, batched per bucket (``encoders``);
4. texts    -- captions without a stored embedding, length-sorted batches (``encoders``);
5. commit   -- one shard and one index transaction link each reference to its two keys.

A crash loses at most the chunk in flight.  Each model is loaded at its first use in a run
and released at the end, so a run with nothing new loads neither.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch

from trainer.cache import EMPTY_TEXT_META, Cache, CacheWriter, latent_key, text_key
from trainer.devices import dtype_named, pick_device
from trainer.encoders import TextEncoder, VaeEncoder, identity_stamp, model_identity
from trainer.images import ImageRejected, PreparedImage, PrepConfig, prepare_image
from trainer.progress import Progress

log = logging.getLogger("darkroom.encode")

PREFETCH_WORKERS = 2
IDENTITY_META = "identity:"  # cache meta: model files' stamp -> their identity


class SourceUnavailable(Exception):
    """A sample's pixels could not be fetched (the message says why); the run goes on."""


@dataclass(frozen=True)
class SampleSource:
    """One photo to put in the cache, its pixels fetched only when they are needed.

    ``source_id`` names the pixels before they are fetched (e.g. Immich's checksum and
    which rendition), so a rerun can tell the latent is already stored without a download.
    ``fallback`` fetches other pixels (e.g. Immich's preview) when ``fetch``'s cannot be
    used.
    """

    ref: str
    source_id: str
    caption: str
    fetch: Callable[[], bytes]
    rotation: int = 0
    fallback: Callable[[], bytes] | None = None


@dataclass(frozen=True)
class EncodeConfig:
    """How sources are prepared and encoded (the cache keys depend on all of it)."""

    model: str
    prep: PrepConfig = field(default_factory=PrepConfig)
    vae_device: str = "auto"
    vae_precision: str = "fp32"
    vae_batch_size: int = 4
    text_device: str = "cpu"
    text_precision: str = "bf16"
    text_offload: bool = False
    text_batch_size: int = 8
    max_length: int = 300
    latent_dtype: str = "fp16"
    text_dtype: str = "bf16"
    commit_every: int = 64


@dataclass
class EncodeReport:
    """What a run did, per reference."""

    samples: dict[str, str] = field(default_factory=dict)  # ref -> bucket, now in the cache
    encoded: list[str] = field(default_factory=list)  # refs whose latent was made this run
    reused: list[str] = field(default_factory=list)  # refs whose latent was already stored
    texts_encoded: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # ref -> why its photo was refused
    failed: dict[str, str] = field(default_factory=dict)  # ref -> why its pixels were missing


class _Ready(NamedTuple):
    """A source whose latent is known (stored before, or made in this chunk)."""

    source: SampleSource
    source_key: str
    latent_key: str
    bucket: str


def _digest(fields: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class Encoder:
    """One encode run over a cache: the models it loaded, the keys it derived."""

    def __init__(
        self, cache: Cache, config: EncodeConfig, *, text_device: torch.device | None = None
    ) -> None:
        self.cache, self.config = cache, config
        self._text_device = text_device
        self._vae: VaeEncoder | None = None
        self._text: TextEncoder | None = None
        # Identities come from the model files, so keys are known before any model loads.
        self.vae_id = f"{self._identity('vae')}/{config.vae_precision}"
        encoder_id, tokenizer_id = self._identity("text_encoder"), self._identity("tokenizer")
        self.text_id = f"{encoder_id}+{tokenizer_id}/{config.text_precision}"

    def _identity(self, subfolder: str) -> str:
        """``model_identity``, remembered in the cache by the files' sizes and times: hashing
        T5's 19 GB of weights on every run would cost minutes for nothing.
        """
        stamp = identity_stamp(self.config.model, subfolder)
        if stamp is None:
            return model_identity(self.config.model, subfolder)
        remembered = self.cache.get_meta(f"{IDENTITY_META}{stamp}")
        if remembered is None:
            remembered = model_identity(self.config.model, subfolder)
            self.cache.set_meta(f"{IDENTITY_META}{stamp}", remembered)
        return remembered

    # -- keys -----------------------------------------------------------------------------

    def source_key(self, source: SampleSource) -> str:
        """Names a latent by what it is made from, before the pixels are fetched."""
        return _digest(
            {
                "source": source.source_id,
                "rotation": source.rotation,
                "prep": asdict(self.config.prep),
                "vae": self.vae_id,
                "dtype": self.config.latent_dtype,
            }
        )

    def text_key(self, caption: str) -> str:
        """The content address of a caption's embedding."""
        return text_key(caption, self.text_id, self.config.max_length, self.config.text_dtype)

    # -- models, loaded at first use ------------------------------------------------------

    def vae(self) -> VaeEncoder:
        if self._vae is None:
            device = pick_device(self.config.vae_device)
            log.info("loading the VAE on %s (%s)", device, self.config.vae_precision)
            dtype = dtype_named(self.config.vae_precision)
            self._vae = VaeEncoder.load(self.config.model, device=device, dtype=dtype)
        return self._vae

    def text(self) -> TextEncoder:
        if self._text is None:
            device = self._text_device or pick_device(self.config.text_device)
            log.info("loading the T5 text encoder on %s (%s)", device, self.config.text_precision)
            self._text = TextEncoder.load(
                self.config.model,
                device=device,
                precision=self.config.text_precision,
                max_length=self.config.max_length,
                offload=self.config.text_offload,
            )
        return self._text

    def close(self) -> None:
        """Release whichever models were loaded."""
        for model in (self._vae, self._text):
            if model is not None:
                model.close()
        self._vae = self._text = None

    # -- the run --------------------------------------------------------------------------

    def run(self, sources: Sequence[SampleSource], progress: Progress) -> EncodeReport:
        """Encode what is missing for ``sources``, committing chunk by chunk."""
        report = EncodeReport()
        self._ensure_empty_text()
        step = self.config.commit_every
        for start in range(0, len(sources), step):
            chunk = sources[start : start + step]
            with self.cache.writer() as writer:
                ready = list(self._latents(chunk, writer, report))
                self._texts([item.source.caption for item in ready], writer, report)
                for item in ready:
                    writer.set_sample(
                        item.source.ref,
                        source_key=item.source_key,
                        latent_key=item.latent_key,
                        text_key=self.text_key(item.source.caption),
                        bucket=item.bucket,
                    )
                    report.samples[item.source.ref] = item.bucket
            progress.update(len(chunk))
        return report

    def _ensure_empty_text(self) -> None:
        """Caption dropout trains on the empty caption's embedding: keep one at hand."""
        key = self.text_key("")
        if not self.cache.has_text(key):
            with self.cache.writer() as writer:
                writer.add_text(key, self._embed([""])[0])
        if self.cache.get_meta(EMPTY_TEXT_META) != key:
            self.cache.set_meta(EMPTY_TEXT_META, key)

    def _latents(
        self, chunk: Sequence[SampleSource], writer: CacheWriter, report: EncodeReport
    ) -> list[_Ready]:
        """Stored latents as they are; the rest fetched (in the background) and encoded."""
        ready: list[_Ready] = []
        todo: list[tuple[SampleSource, str]] = []
        for source in chunk:
            key = self.source_key(source)
            stored = self.cache.latent_for_source(key)
            if stored is None:
                todo.append((source, key))
                continue
            report.reused.append(source.ref)
            ready.append(_Ready(source, key, stored, self.cache.latent_bucket(stored)))
        groups: dict[str, list[_Prepared]] = {}
        made: list[_Ready] = []
        with ThreadPoolExecutor(PREFETCH_WORKERS, thread_name_prefix="prepare") as pool:
            outcomes = pool.map(self._prepare, [source for source, _ in todo])
            for (source, key), outcome in zip(todo, outcomes, strict=True):
                if isinstance(outcome, _Refusal):
                    log.warning("asset %s: %s", source.ref, outcome.reason)
                    target = report.failed if outcome.missing else report.skipped
                    target[source.ref] = outcome.reason
                    continue
                group = groups.setdefault(outcome.image.bucket.name, [])
                group.append(_Prepared(source, key, outcome.image, outcome.checksum))
                if len(group) >= self.config.vae_batch_size:
                    made += self._encode_group(groups.pop(outcome.image.bucket.name), writer)
        for group in groups.values():
            made += self._encode_group(group, writer)
        report.encoded += [item.source.ref for item in made]
        return ready + made

    def _prepare(self, source: SampleSource) -> _Fetched | _Refusal:
        """The source's pixels fitted to a bucket, or why not (the fallback's pixels come
        already edited by their provider, so no rotation is applied to them).
        """
        attempts = [(source.fetch, source.rotation)]
        if source.fallback is not None:
            attempts.append((source.fallback, 0))
        refusal = _Refusal("no pixels to fetch", missing=True)
        for fetch, rotation in attempts:
            try:
                data = fetch()
            except SourceUnavailable as exc:
                refusal = _Refusal(str(exc), missing=True)
                continue
            try:
                image = prepare_image(data, rotation=rotation, config=self.config.prep)
            except ImageRejected as exc:
                refusal = _Refusal(f"{exc.reason}: {exc}", missing=False)
                continue
            return _Fetched(image, hashlib.sha256(data).hexdigest())
        return refusal

    def _encode_group(self, group: list[_Prepared], writer: CacheWriter) -> list[_Ready]:
        """One VAE batch of same-bucket photos into the writer."""
        latents = self.vae().encode([item.image.image for item in group])
        dtype = dtype_named(self.config.latent_dtype)
        ready = []
        for item, latent in zip(group, latents, strict=True):
            bucket = item.image.bucket.name
            key = latent_key(
                item.checksum, bucket, item.image.crop_signature, self.vae_id,
                self.config.latent_dtype,
            )  # fmt: skip
            writer.add_latent(key, latent.to(dtype), bucket=bucket, source_key=item.source_key)
            ready.append(_Ready(item.source, item.source_key, key, bucket))
        return ready

    def _texts(self, captions: Sequence[str], writer: CacheWriter, report: EncodeReport) -> None:
        """Embed the captions that have no stored embedding yet (each distinct one once)."""
        missing = sorted({c for c in captions if not self.cache.has_text(self.text_key(c))})
        if not missing:
            return
        for caption, embedding in zip(missing, self._embed(missing), strict=True):
            writer.add_text(self.text_key(caption), embedding)
        report.texts_encoded += len(missing)

    def _embed(self, captions: Sequence[str]) -> list[torch.Tensor]:
        dtype = dtype_named(self.config.text_dtype)
        embeddings = self.text().encode(captions, batch_size=self.config.text_batch_size)
        return [embedding.to(dtype) for embedding in embeddings]


class _Fetched(NamedTuple):
    image: PreparedImage
    checksum: str  # sha256 of the bytes the image was decoded from


class _Refusal(NamedTuple):
    reason: str
    missing: bool  # True: the pixels could not be fetched; False: the photo was refused


class _Prepared(NamedTuple):
    source: SampleSource
    source_key: str
    image: PreparedImage
    checksum: str


def text_device_for(cache: Cache, config: EncodeConfig) -> torch.device:
    """Where T5 runs: as configured; ``auto`` takes a GPU only while no training reads
    the cache (a trainer holds the GPU), else the CPU.
    """
    if config.text_device != "auto":
        return pick_device(config.text_device)
    device = pick_device("auto")
    if device.type != "cpu" and cache.training_active():
        log.info("training is running: T5 stays on the CPU")
        return torch.device("cpu")
    return device


def encode_sources(
    cache: Cache,
    sources: Sequence[SampleSource],
    config: EncodeConfig,
    *,
    bar: bool | None = None,
) -> EncodeReport:
    """Put every source in the cache that is not there yet; see the module docstring."""
    encoder = Encoder(cache, config, text_device=text_device_for(cache, config))
    try:
        with Progress(len(sources), "photos", bar=bar) as progress:
            report = encoder.run(sources, progress)
    finally:
        encoder.close()
    log.info(
        "encoded %d photos (%d already cached), %d captions; %d refused, %d not fetched",
        len(report.encoded), len(report.reused), report.texts_encoded,
        len(report.skipped), len(report.failed),
    )  # fmt: skip
    return report
