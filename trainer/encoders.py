"""The two frozen encoders of PixArt-Sigma, loaded only while there is something to encode.

Training never runs the VAE or T5: every photo becomes a VAE latent and every caption a T5
embedding once, and the cache keeps them.  This module wraps both encoders behind a small
interface the cache filler drives:

* ``VaeEncoder`` turns same-size RGB images (one bucket's batch) into the VAE posterior
  *mean* times the VAE's scaling factor — deterministic, so the same photo always yields the
  same latent and a content-addressed key can stand for it.
* ``TextEncoder`` runs the T5 encoder on captions: identical captions once, batches sorted
  by token length and padded only to the longest caption of the batch, and each embedding
  cut back to its real tokens (EOS included), so nothing spends time or bytes on padding.
  T5's real-token outputs do not depend on how much padding follows them (the attention mask
  hides it), so storing them unpadded loses nothing.

``model`` is a local folder in the diffusers layout of ``PixArt-alpha/PixArt-Sigma-XL-2-1024-MS``
(``vae/``, ``text_encoder/``, ``tokenizer/``, ...) or a Hugging Face id of such a repository;
each encoder loads only its own subfolders.  Each also has an ``identity``: a string that
names exactly these weights, used in the cache keys.  For a local folder it is a sha256 over
the subfolder's config and weight files (hashed once per load: for T5-XXL's ~19 GB, about
as long as reading them from disk); for a hub id, the id plus the snapshot commit loaded.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import torch
from PIL import Image

from trainer.devices import check_dtype_supported, dtype_named, empty_cache

if TYPE_CHECKING:  # imported lazily: trainer must import fast and without a GPU stack
    from diffusers import AutoencoderKL
    from transformers import T5EncoderModel, T5Tokenizer

log = logging.getLogger(__name__)

VAE_FOLDER = "vae"
TEXT_ENCODER_FOLDER = "text_encoder"
TOKENIZER_FOLDER = "tokenizer"
# The file whose cached copy reveals which hub snapshot (commit) a subfolder came from.
HUB_PROBE_FILES = {
    VAE_FOLDER: "config.json",
    TEXT_ENCODER_FOLDER: "config.json",
    TOKENIZER_FOLDER: "tokenizer_config.json",
}

# Files that decide what from_pretrained builds: configs, weights, tokenizer models.
IDENTITY_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt")
# from_pretrained prefers safetensors; legacy .bin copies beside them are not what it loads.
LEGACY_WEIGHT_SUFFIXES = (".bin",)
HASH_CHUNK_BYTES = 16 * 1024 * 1024

DEFAULT_MAX_LENGTH = 300  # PixArt-Sigma's T5 token limit
DEFAULT_BATCH_SIZE = 8  # T5 on a CPU: bigger batches are not faster (see DESIGN.md)
EIGHT_BIT = "8bit"
PRECISIONS = ("bf16", "fp16", "fp32", EIGHT_BIT)
# Non-quantized parts of an 8-bit T5 compute in fp16 (T5 keeps its `wo` layers in fp32).
EIGHT_BIT_COMPUTE_DTYPE = torch.float16
EMBEDDING_DTYPE = torch.bfloat16  # what TextEncoder returns; the cache stores 16-bit

PIXEL_MAX = 255.0  # 8-bit RGB, mapped to [-1, 1] as the VAE was trained on


# --- identity -----------------------------------------------------------------------------


def _local_folder(model: str) -> Path | None:
    """The model's folder when ``model`` is a local path; None for a hub id.

    Something that is clearly a path but does not exist is an error here, rather than a
    confusing "repository not found" from the hub client later.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model.startswith(("/", "./", "../", "~")) or path.exists():
        raise FileNotFoundError(f"model folder {model!r} does not exist or is not a folder")
    return None


def _identity_files(folder: Path) -> list[Path]:
    """The files of a subfolder that decide what gets loaded, in a fixed order."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in IDENTITY_SUFFIXES)
    if any(p.suffix == ".safetensors" for p in files):
        files = [p for p in files if p.suffix not in LEGACY_WEIGHT_SUFFIXES]
    return files


def folder_digest(folder: Path) -> str:
    """sha256 over the names, sizes and bytes of a model subfolder's config/weight files."""
    files = _identity_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder} holds no config or weight files")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as handle:
            while chunk := handle.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def _hub_commit(model: str, subfolder: str) -> str | None:
    """The snapshot commit a hub model's subfolder was loaded from, if it is in the cache."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, f"{subfolder}/{HUB_PROBE_FILES[subfolder]}")
    if not isinstance(cached, str):
        return None
    parts = Path(cached).parts
    if "snapshots" not in parts[:-1]:
        return None
    return parts[parts.index("snapshots") + 1]


def model_identity(model: str, subfolder: str) -> str:
    """A stable name for the weights in ``model``'s subfolder (see the module docstring)."""
    folder = _local_folder(model)
    if folder is not None:
        return f"{subfolder}:sha256:{folder_digest(folder / subfolder)}"
    commit = _hub_commit(model, subfolder)
    return f"{subfolder}:hf:{model}" + (f"@{commit}" if commit else "")


def identity_stamp(model: str, subfolder: str) -> str | None:
    """A cheap fingerprint (path, names, sizes, modification times) of a local model
    subfolder's files, for remembering its :func:`model_identity` without re-hashing
    gigabytes of weights on every run; None for a hub id (its identity is cheap already).
    """
    folder = _local_folder(model)
    if folder is None:
        return None
    files = _identity_files(folder / subfolder)
    listed = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(repr((str(folder.resolve()), subfolder, listed)).encode()).hexdigest()


def _check_subfolder(model: str, subfolder: str) -> None:
    """A clear error when a local model folder lacks one of the subfolders we load."""
    folder = _local_folder(model)
    if folder is not None and not (folder / subfolder).is_dir():
        raise FileNotFoundError(
            f"{folder} has no {subfolder}/ subfolder: expected the PixArt-Sigma diffusers "
            f"layout (vae/, text_encoder/, tokenizer/, transformer/, scheduler/)"
        )


def _release(device: torch.device) -> None:
    """Free a dropped model's memory now, not whenever the collector gets to it."""
    gc.collect()
    empty_cache(device)


# --- VAE ----------------------------------------------------------------------------------


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Same-size images as an (N, 3, H, W) float32 tensor in [-1, 1]."""
    if not images:
        raise ValueError("no images to encode")
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise ValueError(f"images in one batch must share a size (one bucket), got {sorted(sizes)}")
    rgb = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in rgb]))
    return pixels.permute(0, 3, 1, 2).float() / (PIXEL_MAX / 2) - 1.0


class VaeEncoder:
    """The PixArt-Sigma VAE's encoder side, turning bucket-sized photos into latents."""

    def __init__(
        self, vae: AutoencoderKL, *, identity: str, device: torch.device, dtype: torch.dtype
    ):
        """Wrap a loaded AutoencoderKL (use ``load``)."""
        self._vae: AutoencoderKL | None = vae
        self.identity = identity
        self.device = device
        self.dtype = dtype
        self.scaling_factor: float = float(vae.config.scaling_factor)
        self.shift_factor: float = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.downscale: int = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels: int = int(vae.config.latent_channels)

    @classmethod
    def load(
        cls, model: str, *, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> VaeEncoder:
        """Load ``model``'s vae/ subfolder onto ``device``.

        fp16 on a VAE whose config says ``force_upcast`` (the SDXL VAE PixArt-Sigma uses
        overflows in fp16) computes in fp32 instead, as diffusers' own pipelines do;
        ``dtype`` on the result says what is really used.
        """
        from diffusers import AutoencoderKL

        _check_subfolder(model, VAE_FOLDER)
        check_dtype_supported(device, dtype)
        config = AutoencoderKL.load_config(model, subfolder=VAE_FOLDER)
        if dtype == torch.float16 and config.get("force_upcast", False):
            log.info("the VAE overflows in fp16 (force_upcast): encoding in fp32")
            dtype = torch.float32
        vae = AutoencoderKL.from_pretrained(model, subfolder=VAE_FOLDER, dtype=dtype)
        vae.to(device).eval().requires_grad_(False)
        # One image at a time inside a batch: memory stays that of one photo, and a latent
        # depends on its photo alone, not (through float noise) on its batch mates.
        vae.enable_slicing()
        return cls(vae, identity=model_identity(model, VAE_FOLDER), device=device, dtype=dtype)

    @property
    def vae(self) -> AutoencoderKL:
        """The loaded AutoencoderKL; RuntimeError once closed."""
        if self._vae is None:
            raise RuntimeError("this VaeEncoder was closed")
        return self._vae

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Latents (N, C, H/downscale, W/downscale), float32 on CPU, of same-size images.

        The posterior mean, not a sample: deterministic, so a latent can be keyed by its
        inputs; (mean - shift_factor) * scaling_factor is what the transformer trains on.
        """
        pixels = images_to_tensor(images)
        height, width = pixels.shape[-2:]
        if height % self.downscale or width % self.downscale:
            raise ValueError(f"image size {width}x{height} is not a multiple of {self.downscale}")
        with torch.inference_mode():
            posterior = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
            latents = (posterior.mean - self.shift_factor) * self.scaling_factor
            result = latents.to("cpu", torch.float32)
        _check_finite(result, f"VAE latents in {self.dtype}")
        return result

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1], float32 on CPU, from latents made by ``encode``."""
        with torch.inference_mode():
            scaled = latents.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor
            images = self.vae.decode(scaled).sample
            return images.to("cpu", torch.float32).clamp(-1.0, 1.0)

    def close(self) -> None:
        """Drop the model and give its device memory back."""
        self._vae = None
        _release(self.device)

    def __enter__(self) -> Self:
        """Use as ``with VaeEncoder.load(...) as vae:`` to close it when done."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close on leaving the block."""
        self.close()


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    """Refuse to hand NaN/inf (a 16-bit overflow) to the cache, where it would stay forever."""
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(f"{what} contain NaN or inf: use a wider precision (fp32/bf16)")


# --- T5 -----------------------------------------------------------------------------------


def _eight_bit_kwargs(device: torch.device, offload: bool) -> dict[str, Any]:
    """from_pretrained arguments for an 8-bit T5 (bitsandbytes LLM.int8 on one CUDA card)."""
    missing = []
    if device.type != "cuda":
        missing.append(f"a CUDA device (got {device.type})")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if missing:
        raise ValueError(f"precision '{EIGHT_BIT}' needs {' and '.join(missing)}")
    if offload:
        raise ValueError(f"precision '{EIGHT_BIT}' and offload are alternatives: pick one")
    from transformers import BitsAndBytesConfig

    card = device.index if device.index is not None else torch.cuda.current_device()
    return {
        "dtype": EIGHT_BIT_COMPUTE_DTYPE,
        "quantization_config": BitsAndBytesConfig(load_in_8bit=True),
        "device_map": {"": card},  # the whole model on that one card
    }


def _offload_kwargs(device: torch.device) -> dict[str, Any]:
    """accelerate's device_map="auto", limited to ``device`` plus the CPU.

    The layers that fit go on the card, the rest stay in host RAM and are streamed in for
    each forward pass: T5-XXL in bf16 (9.2 GB) then runs on a 6-8 GB card, slower than fully
    on the card but far faster than on the CPU.
    """
    from accelerate.utils import get_max_memory

    key: int | str = "mps" if device.type == "mps" else (device.index or 0)
    budget = {name: size for name, size in get_max_memory().items() if name in (key, "cpu")}
    return {"device_map": "auto", "max_memory": budget}


def t5_load_kwargs(device: torch.device, precision: str, offload: bool) -> dict[str, Any]:
    """How to call T5EncoderModel.from_pretrained for a device, precision and offload choice.

    offload applies to accelerators only: on the CPU everything is in host RAM already, so
    it is a no-op there.  Without a device_map the model is moved to ``device`` after loading.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown T5 precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == EIGHT_BIT:
        return _eight_bit_kwargs(device, offload)
    dtype = dtype_named(precision)
    check_dtype_supported(device, dtype)
    if offload and device.type != "cpu":
        return {"dtype": dtype, **_offload_kwargs(device)}
    return {"dtype": dtype}


class TextEncoder:
    """PixArt-Sigma's T5 encoder and tokenizer, encoding captions into unpadded embeddings.

    ``encoded_captions`` counts the captions that actually went through the model (unique
    ones per ``encode`` call), so a caller or a test can see that duplicates were skipped.
    """

    def __init__(
        self,
        tokenizer: T5Tokenizer,
        model: T5EncoderModel,
        *,
        identity: str,
        precision: str,
        max_length: int,
    ):
        """Wrap a loaded tokenizer and T5EncoderModel (use ``load``)."""
        self._tokenizer = tokenizer
        self._model: T5EncoderModel | None = model
        self.identity = identity
        self.precision = precision
        self.max_length = max_length
        self.width: int = int(model.config.d_model)
        self.encoded_captions = 0
        # Where inputs go: the embedding layer's device (also right under a device_map).
        self._input_device: torch.device = model.get_input_embeddings().weight.device

    @classmethod
    def load(
        cls,
        model: str,
        *,
        device: torch.device,
        precision: str = "bf16",
        max_length: int = DEFAULT_MAX_LENGTH,
        offload: bool = False,
    ) -> TextEncoder:
        """Load only ``model``'s tokenizer/ and text_encoder/ (never the transformer or VAE).

        precision: "bf16" (default), "fp16", "fp32", or "8bit" (bitsandbytes, CUDA only).
        offload: on a GPU, spread T5 over the card and host RAM (accelerate's
        device_map="auto"); a no-op on the CPU.  ValueError for impossible combinations.
        """
        from transformers import T5EncoderModel, T5Tokenizer

        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        kwargs = t5_load_kwargs(device, precision, offload)
        for subfolder in (TOKENIZER_FOLDER, TEXT_ENCODER_FOLDER):
            _check_subfolder(model, subfolder)
        tokenizer = T5Tokenizer.from_pretrained(model, subfolder=TOKENIZER_FOLDER)
        encoder = T5EncoderModel.from_pretrained(model, subfolder=TEXT_ENCODER_FOLDER, **kwargs)
        if "device_map" not in kwargs:
            encoder.to(device)
        encoder.eval().requires_grad_(False)
        identity = ";".join(
            (
                model_identity(model, TOKENIZER_FOLDER),
                model_identity(model, TEXT_ENCODER_FOLDER),
                f"precision={precision}",
            )
        )
        return cls(
            tokenizer, encoder, identity=identity, precision=precision, max_length=max_length
        )

    @property
    def model(self) -> T5EncoderModel:
        """The loaded T5EncoderModel; RuntimeError once closed."""
        if self._model is None:
            raise RuntimeError("this TextEncoder was closed")
        return self._model

    def _token_ids(self, captions: Sequence[str]) -> list[list[int]]:
        """Token ids of each caption, EOS included, truncated to max_length (EOS kept last)."""
        encoded = self._tokenizer(
            list(captions), truncation=True, max_length=self.max_length, add_special_tokens=True
        )
        return encoded["input_ids"]

    def token_ids(self, caption: str) -> list[int]:
        """The token ids ``caption`` encodes from (EOS last, at most max_length)."""
        return self._token_ids([caption])[0]

    def token_count(self, caption: str) -> int:
        """How many tokens ``caption`` encodes to (EOS included, at most max_length)."""
        return len(self.token_ids(caption))

    def encode(
        self,
        captions: Sequence[str],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[torch.Tensor]:
        """One (tokens, width) bfloat16 CPU tensor per caption, in input order, unpadded.

        Identical captions are encoded once (and share one tensor in the result).  Unique
        captions go through T5 longest first, ``batch_size`` at a time, each batch padded
        only to its longest caption.  ``on_batch(n)`` after each batch: n counts the input
        captions that batch completed, duplicates included, so the calls add up to
        ``len(captions)`` (a progress bar's total).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        copies = Counter(captions)  # first-seen order
        unique = list(copies)
        token_ids = self._token_ids(unique) if unique else []
        # Longest first: the batch that needs the most memory runs first and fails fast.
        order = sorted(range(len(unique)), key=lambda index: -len(token_ids[index]))
        embeddings: dict[str, torch.Tensor] = {}
        for start in range(0, len(order), batch_size):
            members = order[start : start + batch_size]
            outputs = self._forward([token_ids[index] for index in members])
            for index, output in zip(members, outputs, strict=True):
                embeddings[unique[index]] = output
            self.encoded_captions += len(members)
            if on_batch is not None:
                on_batch(sum(copies[unique[index]] for index in members))
        return [embeddings[caption] for caption in captions]

    def _forward(self, batch: list[list[int]]) -> list[torch.Tensor]:
        """Run one batch padded to its longest member; return each row's real tokens."""
        longest = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), longest), self._tokenizer.pad_token_id)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        with torch.inference_mode():
            hidden = self.model(
                input_ids=input_ids.to(self._input_device),
                attention_mask=mask.to(self._input_device),
            ).last_hidden_state
            hidden = hidden.to("cpu", EMBEDDING_DTYPE)
        _check_finite(hidden, f"T5 embeddings in {self.precision}")
        # clone(): each caption's tensor owns its bytes, not a view into the whole batch.
        return [hidden[row, : len(ids)].clone() for row, ids in enumerate(batch)]

    def close(self) -> None:
        """Drop the model and give its device memory back."""
        self._model = None
        _release(self._input_device)

    def __enter__(self) -> Self:
        """Use as ``with TextEncoder.load(...) as t5:`` to close it when done."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close on leaving the block."""
        self.close()
