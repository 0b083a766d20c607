"""``trainer.encode`` on its own (no daemon, no Immich): files in, a cache out.

Real JPEGs of scikit-image photos, the tiny PixArt-Sigma from ``tests/tiny_models.py``,
and a cache on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.immich_library import make_jpeg
from trainer.cache import EMPTY_TEXT_META, Cache
from trainer.devices import pick_device
from trainer.encode import EncodeConfig, SampleSource, SourceUnavailable, encode_sources
from trainer.encoders import TextEncoder, VaeEncoder
from trainer.images import prepare_image

CPU = "cpu"
# Mean difference between decoding a 16-bit latent and its fp32 original (pixels in [-1, 1]).
DECODE_TOLERANCE = 1e-3


def counting(data: bytes, calls: list[str], name: str) -> Callable[[], bytes]:
    def fetch() -> bytes:
        calls.append(name)
        return data

    return fetch


def missing() -> bytes:
    raise SourceUnavailable("Immich: 404 asset not found")


@pytest.fixture
def photos() -> dict[str, bytes]:
    return {
        "square": make_jpeg("astronaut", scale=2.1),
        "landscape": make_jpeg("chelsea", scale=3.5),
    }


@pytest.fixture
def config(tiny_pixart: Path) -> EncodeConfig:
    return EncodeConfig(model=str(tiny_pixart), vae_device=CPU, text_device=CPU, commit_every=2)


def sources(photos: dict[str, bytes], calls: list[str]) -> list[SampleSource]:
    good = photos["square"]
    return [
        SampleSource("a", "sq", "An astronaut in a white suit.", counting(good, calls, "a")),
        SampleSource("b", "ls", "A tabby cat looks up.", counting(photos["landscape"], calls, "b")),
        # A corrupt original, rescued by its fallback (e.g. Immich's preview).
        SampleSource(
            "c",
            "bad",
            "An astronaut again.",
            counting(b"not a jpeg", calls, "c"),
            fallback=counting(good, calls, "c-fallback"),
        ),
        SampleSource("d", "cut", "Cut short.", counting(good[: len(good) // 2], calls, "d")),
        SampleSource("e", "gone", "Never fetched.", missing),
    ]


def test_encode_fills_the_cache_and_reports_every_photo(
    tmp_path: Path, photos: dict[str, bytes], config: EncodeConfig
) -> None:
    calls: list[str] = []
    with Cache.open(tmp_path / "cache", create=True) as cache:
        report = encode_sources(cache, sources(photos, calls), config, bar=False)
        assert report.samples == {"a": "1024x1024", "b": "1216x832", "c": "1024x1024"}
        assert report.skipped.keys() == {"d"} and report.skipped["d"].startswith("truncated")
        assert report.failed == {"e": "Immich: 404 asset not found"}
        assert report.texts_encoded == 3
        live = cache.live_samples()
        # The same pixels (a's original, c's fallback) share one latent.
        assert live["a"].latent_key == live["c"].latent_key
        assert cache.load_latent(live["b"].latent_key).shape == (4, 832 // 8, 1216 // 8)
        assert cache.has_text(cache.get_meta(EMPTY_TEXT_META) or "")
        assert cache.verify().ok

        calls.clear()
        again = encode_sources(cache, sources(photos, calls), config, bar=False)
        assert (again.encoded, again.texts_encoded) == ([], 0)
        assert sorted(again.reused) == ["a", "b", "c"]
        assert calls == ["d"]  # only the refused photo is tried again


def test_a_stored_latent_decodes_like_a_fresh_one(
    tmp_path: Path, photos: dict[str, bytes], config: EncodeConfig, tiny_pixart: Path
) -> None:
    data = photos["landscape"]
    with Cache.open(tmp_path / "cache", create=True) as cache:
        source = SampleSource("b", "ls", "A tabby cat looks up.", lambda: data)
        encode_sources(cache, [source], config, bar=False)
        sample = cache.live_samples()["b"]
        stored = cache.load_latent(sample.latent_key)
        stored_text = cache.load_text(sample.text_key)
    device = pick_device(CPU)
    with VaeEncoder.load(str(tiny_pixart), device=device) as vae:
        fresh = vae.encode([prepare_image(data).image])
        from_cache = vae.decode(stored.unsqueeze(0).float())
        from_fresh = vae.decode(fresh.to(stored.dtype).float())
        from_fp32 = vae.decode(fresh)
    # The stored latent is the fresh one in 16 bits, bit for bit; the decodings agree up to
    # float noise of the convolutions (the tensors' memory differs), and against the fp32
    # latent 16-bit storage costs only rounding.
    assert torch.equal(stored, fresh[0].to(stored.dtype))
    assert (from_cache - from_fresh).abs().mean().item() < DECODE_TOLERANCE
    assert (from_cache - from_fp32).abs().mean().item() < DECODE_TOLERANCE
    with TextEncoder.load(str(tiny_pixart), device=device) as text:
        assert torch.equal(text.encode(["A tabby cat looks up."])[0], stored_text)


def test_a_new_caption_makes_a_new_entry_and_gc_removes_the_old(
    tmp_path: Path, photos: dict[str, bytes], config: EncodeConfig
) -> None:
    data = photos["square"]
    with Cache.open(tmp_path / "cache", create=True) as cache:
        encode_sources(cache, [SampleSource("a", "sq", "First words.", lambda: data)], config)
        old = cache.live_samples()["a"]
        report = encode_sources(
            cache, [SampleSource("a", "sq", "Second words.", lambda: data)], config
        )
        assert report.texts_encoded == 1 and report.reused == ["a"]
        new = cache.live_samples()["a"]
        assert new.latent_key == old.latent_key and new.text_key != old.text_key
        cache.gc()
        assert not cache.has_text(old.text_key) and cache.has_text(new.text_key)
        assert cache.verify().ok
