"""Devices, the VAE encoder and the T5 encoder, on a tiny real PixArt-Sigma folder.

Every model is built at test time (tests/tiny_models.py, fixture ``tiny_pixart`` via
conftest.py) and loaded through the same from_pretrained paths as the real weights; nothing
is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from skimage import data

from tests.tiny_models import (
    LATENT_CHANNELS,
    T5_WIDTH,
    VAE_SCALING_FACTOR,
    build_tiny_pixart,
    photo_sentences,
)
from trainer.devices import (
    DeviceUnavailableError,
    dtype_name,
    dtype_named,
    pick_device,
)
from trainer.encoders import (
    EIGHT_BIT,
    TextEncoder,
    VaeEncoder,
    folder_digest,
    model_identity,
    t5_load_kwargs,
)

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
# bf16 has 8 significant bits: one rounding step is 2**-7 relative (torch's bf16 rtol).
BF16_RTOL, BF16_ATOL = 1.6e-2, 1e-2
FP32_ATOL = 1e-5
SHORT = "A tabby cat sitting on the harbour wall."


def _accelerators() -> dict[str, bool]:
    """Which accelerator types torch can use on this machine."""
    xpu = getattr(torch, "xpu", None)
    return {
        "cuda": torch.cuda.is_available(),
        "xpu": xpu is not None and xpu.is_available(),
        "mps": torch.backends.mps.is_available(),
    }


def _photo(name: str, size: tuple[int, int]) -> Image.Image:
    """A scikit-image sample photo, stretched to a bucket-like size."""
    photo = Image.fromarray(getattr(data, name)()).convert("RGB")
    return photo.resize(size, Image.Resampling.LANCZOS)


def _long_caption(sentences: int) -> str:
    """Photo prose many sentences long."""
    return " ".join(photo_sentences(sentences, seed=sentences))


@pytest.fixture(scope="module")
def vae(tiny_pixart: Path) -> VaeEncoder:
    """The tiny VAE on the CPU in fp32."""
    return VaeEncoder.load(str(tiny_pixart), device=CPU)


@pytest.fixture(scope="module")
def t5(tiny_pixart: Path) -> TextEncoder:
    """The tiny T5 on the CPU in bf16 (the default), max length 300."""
    return TextEncoder.load(str(tiny_pixart), device=CPU)


# --- devices ------------------------------------------------------------------------------


@pytest.mark.skipif(any(_accelerators().values()), reason="an accelerator is present")
def test_auto_falls_back_to_cpu_without_accelerators() -> None:
    assert pick_device() == CPU
    assert pick_device("auto") == CPU
    assert pick_device(" CPU ") == CPU


@pytest.mark.parametrize("name", ["cuda", "cuda:1", "xpu", "mps"])
def test_an_absent_accelerator_is_a_clear_error(name: str) -> None:
    if _accelerators()[name.split(":")[0]]:
        pytest.skip(f"{name} is present here")
    with pytest.raises(DeviceUnavailableError, match=f"'{name}' was asked for but") as error:
        pick_device(name)
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize("name", ["gpu", "meta", "cuda:x", ""])
def test_unknown_device_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="auto, cuda, xpu, mps, cpu"):
        pick_device(name)


def test_dtype_names_round_trip() -> None:
    for name in ("fp32", "fp16", "bf16"):
        assert dtype_name(dtype_named(name)) == name
    assert dtype_named("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        dtype_named("float32")
    with pytest.raises(ValueError, match="no darkroom name"):
        dtype_name(torch.int8)


# --- the tiny model folder ----------------------------------------------------------------


def test_tiny_folder_is_deterministic_and_loads_as_a_pipeline(
    tiny_pixart: Path,
    tmp_path: Path,
) -> None:
    from diffusers import PixArtSigmaPipeline

    again = build_tiny_pixart(tmp_path / "again")
    for sub in ("vae", "text_encoder", "tokenizer", "transformer", "scheduler"):
        assert folder_digest(again / sub) == folder_digest(tiny_pixart / sub), sub
    pipe = PixArtSigmaPipeline.from_pretrained(str(tiny_pixart))
    transformer = pipe.transformer
    assert transformer.config.caption_channels == pipe.text_encoder.config.d_model == T5_WIDTH
    assert transformer.config.use_additional_conditions is False
    assert pipe.vae.config.latent_channels == LATENT_CHANNELS
    assert list(pipe.scheduler.betas[[0, -1]]) == pytest.approx([1e-4, 0.02])
    text = torch.randn(1, 7, T5_WIDTH)
    latent = torch.randn(1, LATENT_CHANNELS, 16, 16)
    with torch.inference_mode():
        out = transformer(
            latent,
            encoder_hidden_states=text,
            timestep=torch.tensor([500]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
    assert out.shape == (1, 2 * LATENT_CHANNELS, 16, 16)


def test_the_tokenizer_really_uses_the_trained_sentencepiece_model(
    tiny_pixart: Path,
) -> None:
    from transformers import AutoTokenizer, T5Tokenizer

    for loader in (T5Tokenizer, AutoTokenizer):
        tokenizer = loader.from_pretrained(str(tiny_pixart / "tokenizer"))
        ids = tokenizer(SHORT).input_ids
        assert tokenizer.unk_token_id not in ids
        assert len(set(ids)) > len(ids) // 2
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == SHORT


# --- identity -----------------------------------------------------------------------------


def _hub_cache(tiny: Path, cache: Path, commit: str) -> None:
    """Lay ``tiny`` out as a Hugging Face cache holds a downloaded repository snapshot."""
    repo = cache / "models--darkroom-test--tiny-pixart"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny, repo / "snapshots" / commit)


IDENTITIES = """
import json, sys, torch
from trainer.encoders import TextEncoder, VaeEncoder, model_identity
cpu = torch.device("cpu")
print(json.dumps({
    "local": model_identity(sys.argv[1], "vae"),
    "hub_vae": VaeEncoder.load("darkroom-test/tiny-pixart", device=cpu).identity,
    "hub_t5": TextEncoder.load("darkroom-test/tiny-pixart", device=cpu).identity,
}))
"""


def test_identities_are_stable_across_processes_and_name_hub_snapshots(
    vae: VaeEncoder,
    tiny_pixart: Path,
    tmp_path: Path,
) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    _hub_cache(tiny_pixart, tmp_path / "hub", commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    run = subprocess.run(
        [sys.executable, "-c", IDENTITIES, str(tiny_pixart)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=True,
    )
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["local"] == vae.identity
    assert vae.identity.startswith("vae:sha256:") and len(vae.identity) == len("vae:sha256:") + 64
    assert seen["hub_vae"] == f"vae:hf:darkroom-test/tiny-pixart@{commit}"
    assert seen["hub_t5"] == (
        f"tokenizer:hf:darkroom-test/tiny-pixart@{commit};"
        f"text_encoder:hf:darkroom-test/tiny-pixart@{commit};precision=bf16"
    )


def test_vae_identity_changes_with_weights_and_config(
    vae: VaeEncoder,
    tiny_pixart: Path,
    tmp_path: Path,
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_pixart / "vae", copy / "vae")
    assert model_identity(str(copy), "vae") == vae.identity  # the path is not part of it
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights)
    changed_weights = model_identity(str(copy), "vae")
    assert changed_weights != vae.identity
    config = json.loads((copy / "vae" / "config.json").read_text())
    config["scaling_factor"] = 0.2
    (copy / "vae" / "config.json").write_text(json.dumps(config))
    assert model_identity(str(copy), "vae") not in (vae.identity, changed_weights)


def test_text_identity_names_tokenizer_weights_and_precision(
    t5: TextEncoder,
    tiny_pixart: Path,
) -> None:
    tokenizer = f"tokenizer:sha256:{folder_digest(tiny_pixart / 'tokenizer')}"
    encoder = f"text_encoder:sha256:{folder_digest(tiny_pixart / 'text_encoder')}"
    assert t5.identity == f"{tokenizer};{encoder};precision=bf16"
    fp32 = TextEncoder.load(str(tiny_pixart), device=CPU, precision="fp32")
    assert fp32.identity == f"{tokenizer};{encoder};precision=fp32"


def test_a_folder_without_the_subfolder_or_at_all_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no vae/ subfolder"):
        VaeEncoder.load(str(tmp_path), device=CPU)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextEncoder.load(str(tmp_path / "absent"), device=CPU)


# --- VAE ----------------------------------------------------------------------------------


def test_vae_reads_its_config(vae: VaeEncoder) -> None:
    assert vae.scaling_factor == pytest.approx(VAE_SCALING_FACTOR)
    assert vae.downscale == 8
    assert vae.latent_channels == LATENT_CHANNELS
    assert vae.dtype == torch.float32


def test_vae_encodes_real_photos_of_several_aspects(vae: VaeEncoder) -> None:
    square = [_photo("astronaut", (1024, 1024)), _photo("coffee", (1024, 1024))]
    tall = [_photo("rocket", (832, 1216))]
    for batch in (square, tall):
        width, height = batch[0].size
        latents = vae.encode(batch)
        assert latents.shape == (len(batch), LATENT_CHANNELS, height // 8, width // 8)
        assert latents.dtype == torch.float32 and latents.device == CPU
        assert torch.isfinite(latents).all()


def test_vae_latents_are_deterministic(vae: VaeEncoder) -> None:
    photos = [_photo("astronaut", (512, 512)), _photo("coffee", (512, 512))]
    # The posterior mean, not a sample, of each photo on its own: the same photo gives the
    # same latent bit for bit, whatever batch it is in (so its cache key can stand for it).
    first = vae.encode(photos)
    assert torch.equal(vae.encode(photos), first)
    assert torch.equal(vae.encode(photos[1:])[0], first[1])


def test_decode_inverts_the_shape(vae: VaeEncoder) -> None:
    photos = [_photo("chelsea", (640, 384)), _photo("astronaut", (640, 384))]
    images = vae.decode(vae.encode(photos))
    assert images.shape == (2, 3, 384, 640)
    assert images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0


def test_vae_refuses_mixed_or_odd_sizes(vae: VaeEncoder) -> None:
    with pytest.raises(ValueError, match="share a size"):
        vae.encode([_photo("coffee", (64, 64)), _photo("coffee", (128, 64))])
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode([_photo("coffee", (60, 64))])
    with pytest.raises(ValueError, match="no images"):
        vae.encode([])


def test_fp16_on_a_force_upcast_vae_computes_in_fp32_and_close_releases(
    tiny_pixart: Path,
) -> None:
    with VaeEncoder.load(str(tiny_pixart), device=CPU, dtype=torch.float16) as fp16:
        assert fp16.dtype == torch.float32
        assert fp16.encode([_photo("coffee", (64, 64))]).shape == (1, LATENT_CHANNELS, 8, 8)
    with pytest.raises(RuntimeError, match="closed"):
        fp16.encode([_photo("coffee", (64, 64))])


# --- T5 -----------------------------------------------------------------------------------


def test_embeddings_are_unpadded_16_bit_and_in_input_order(t5: TextEncoder) -> None:
    captions = [_long_caption(3), "", SHORT, _long_caption(9), _long_caption(1)]
    embeddings = t5.encode(captions, batch_size=2)
    assert len(embeddings) == len(captions)
    for caption, embedding in zip(captions, embeddings, strict=True):
        assert embedding.shape == (t5.token_count(caption), t5.width)
        assert embedding.dtype == torch.bfloat16 and embedding.device == CPU
        alone = t5.encode([caption])[0]
        torch.testing.assert_close(embedding, alone, rtol=BF16_RTOL, atol=BF16_ATOL)
    assert t5.width == T5_WIDTH
    lengths = [embedding.shape[0] for embedding in embeddings]
    assert len(set(lengths)) == len(lengths)  # distinct lengths: order really was checked


def test_the_empty_caption_is_one_eos_token(t5: TextEncoder) -> None:
    assert t5.token_count("") == 1
    (empty,) = t5.encode([""])
    assert empty.shape == (1, T5_WIDTH)


def test_identical_captions_are_encoded_once(t5: TextEncoder) -> None:
    captions = [SHORT, "", SHORT, _long_caption(4), "", SHORT, _long_caption(2)]
    done: list[int] = []
    before = t5.encoded_captions
    embeddings = t5.encode(captions, batch_size=2, on_batch=done.append)
    assert t5.encoded_captions - before == 4
    assert len(done) == math.ceil(4 / 2) and sum(done) == len(captions)
    assert torch.equal(embeddings[0], embeddings[2]) and torch.equal(embeddings[0], embeddings[5])
    assert torch.equal(embeddings[1], embeddings[4])


def test_padding_does_not_change_a_captions_embedding(
    t5: TextEncoder,
    tiny_pixart: Path,
) -> None:
    longest = _long_caption(12)
    assert t5.token_count(longest) > 10 * t5.token_count(SHORT)
    alone = t5.encode([SHORT])[0]
    beside_long = t5.encode([longest, SHORT], batch_size=2)[1]
    torch.testing.assert_close(beside_long, alone, rtol=BF16_RTOL, atol=BF16_ATOL)
    # In fp32 the real tokens' outputs match to rounding noise even against padding to 300
    # (as PixArt's own pipeline pads): storing embeddings unpadded loses nothing.
    fp32 = TextEncoder.load(str(tiny_pixart), device=CPU, precision="fp32")
    own = _hidden(fp32, tiny_pixart, SHORT, padding=False)
    padded = _hidden(fp32, tiny_pixart, SHORT, padding="max_length")
    assert padded.shape[0] == fp32.max_length
    torch.testing.assert_close(padded[: own.shape[0]], own, atol=FP32_ATOL, rtol=0)


def _hidden(t5: TextEncoder, tiny: Path, caption: str, *, padding: bool | str) -> torch.Tensor:
    """T5's last hidden state for one caption, tokenized straight by transformers."""
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer.from_pretrained(str(tiny / "tokenizer"))
    tokens = tokenizer(
        caption, padding=padding, max_length=t5.max_length, truncation=True, return_tensors="pt"
    )
    with torch.inference_mode():
        return t5.model(**tokens).last_hidden_state[0]


def test_captions_are_truncated_to_max_length_keeping_eos(tiny_pixart: Path) -> None:
    from transformers import T5Tokenizer

    short_limit = 16
    t5 = TextEncoder.load(str(tiny_pixart), device=CPU, max_length=short_limit)
    caption = _long_caption(6)
    (embedding,) = t5.encode([caption])
    assert t5.token_count(caption) == short_limit == embedding.shape[0]
    # What went in: the caption's first tokens, then EOS (as PixArt's pipeline truncates).
    tokenizer = T5Tokenizer.from_pretrained(str(tiny_pixart / "tokenizer"))
    ids = [*tokenizer(caption).input_ids[: short_limit - 1], tokenizer.eos_token_id]
    with torch.inference_mode():
        expected = t5.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    torch.testing.assert_close(embedding, expected.to(torch.bfloat16), rtol=0, atol=0)


def test_only_the_text_encoder_and_tokenizer_are_needed(
    tiny_pixart: Path,
    tmp_path: Path,
) -> None:
    for sub in ("tokenizer", "text_encoder"):
        shutil.copytree(tiny_pixart / sub, tmp_path / sub)
    with TextEncoder.load(str(tmp_path), device=CPU, offload=True) as t5:  # no-op on the CPU
        assert t5.encode([SHORT])[0].shape == (t5.token_count(SHORT), T5_WIDTH)
    with pytest.raises(RuntimeError, match="closed"):
        t5.encode([SHORT])


def test_8bit_needs_cuda_and_bitsandbytes(tiny_pixart: Path) -> None:
    with pytest.raises(ValueError, match=r"'8bit' needs a CUDA device \(got cpu\)"):
        TextEncoder.load(str(tiny_pixart), device=CPU, precision=EIGHT_BIT)


def test_precision_and_offload_choices(tiny_pixart: Path) -> None:
    assert t5_load_kwargs(CPU, "bf16", offload=True) == {"dtype": torch.bfloat16}
    assert t5_load_kwargs(CPU, "fp32", offload=False) == {"dtype": torch.float32}
    with pytest.raises(ValueError, match="bf16, fp16, fp32, 8bit"):
        TextEncoder.load(str(tiny_pixart), device=CPU, precision="int4")
    with pytest.raises(ValueError, match="batch_size"):
        TextEncoder.load(str(tiny_pixart), device=CPU).encode([SHORT], batch_size=0)
