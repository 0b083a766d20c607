"""A tiny but real PixArt-Sigma model folder, built at test time (nothing is downloaded).

The folder has the diffusers layout of ``PixArt-alpha/PixArt-Sigma-XL-2-1024-MS``
(``model_index.json``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``transformer/``,
``scheduler/``) and is written with ``save_pretrained``, so darkroom loads it through
exactly the ``from_pretrained`` code paths it uses for the real weights.  Everything is
seeded: two builds write byte-identical files.

* VAE: an AutoencoderKL with 4 blocks (downscale 8, like the real SDXL VAE) but 8-16
  channels, so a 1024x1024 photo encodes in well under a second on a CPU.
* Tokenizer: a sentencepiece unigram model trained on the spot from photo-description
  prose, stored like the real one (``spiece.model`` + ``tokenizer_config.json``).
  ``T5Tokenizer(vocab_file=...)`` would silently ignore the file in transformers 5; a folder
  loaded with ``from_pretrained`` converts it properly.
* Text encoder: a 2-layer T5 v1.1-style encoder (gated-gelu), d_model 32.
* Transformer: a 2-layer PixArtTransformer2DModel, micro-conditions off as in Sigma.
* Scheduler: DPM-Solver++ with PixArt-Sigma's linear betas 1e-4..0.02 over 1000 steps.

Also home to the prose generator and tokenizer trainer that ``bench/t5_encode.py`` reuses.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Tests never reach a model hub: every load is from a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import sentencepiece
import torch

SEED = 20240607
PROSE_SENTENCES = 400
VOCAB_SIZE = 600
MAX_LENGTH = 300

# T5's special-token layout: <pad>=0, </s>=1, <unk>=2, then the pieces.
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2

# The VAE: 4 blocks as in the real one (downscale 2**3 = 8), tiny widths.
VAE_CHANNELS = (8, 16, 16, 16)
VAE_GROUPS = 8
LATENT_CHANNELS = 4
VAE_SAMPLE_SIZE = 1024
VAE_SCALING_FACTOR = 0.13025  # the SDXL VAE's, which PixArt-Sigma uses

T5_WIDTH = 32
T5_KV = 8
T5_HEADS = 4
T5_LAYERS = 2
T5_FF = 64
T5_BUCKETS = 32
T5_MAX_DISTANCE = 128

DIT_HEADS = 2
DIT_HEAD_DIM = 8
DIT_LAYERS = 2
DIT_SAMPLE_SIZE = 128
DIT_PATCH = 2
DIT_IN_CHANNELS = LATENT_CHANNELS
DIT_OUT_CHANNELS = 2 * LATENT_CHANNELS  # epsilon + learned variance, as PixArt

TRAIN_STEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02

# --- photo-description prose --------------------------------------------------------------

_SUBJECTS = (
    "an old fisherman",
    "a young woman in a yellow raincoat",
    "two children",
    "a tabby cat",
    "a black labrador",
    "a cyclist",
    "an elderly couple",
    "a street musician",
    "a heron",
    "a red vintage car",
    "a wooden rowing boat",
    "a lighthouse",
    "a market stall",
    "a bowl of ripe cherries",
    "a steaming cup of coffee",
    "a bride",
    "a man with a grey beard",
    "a little girl with braids",
    "a flock of sheep",
    "a stone bridge",
    "a weathered barn",
    "a bunch of sunflowers",
    "a tram",
    "a skateboarder",
    "a mountain hut",
)
_ACTIONS = (
    "sitting on",
    "walking along",
    "leaning against",
    "standing beside",
    "resting near",
    "crossing",
    "waiting at",
    "looking out over",
    "reflected in",
    "half hidden behind",
    "running through",
    "parked next to",
    "drifting across",
    "framed by",
)
_PLACES = (
    "a cobblestone street",
    "the harbour wall",
    "a quiet lake at dawn",
    "a snowy mountain pass",
    "a crowded train station",
    "an empty beach",
    "a pine forest",
    "a field of lavender",
    "the kitchen table",
    "a rain-soaked pavement",
    "a narrow alley",
    "an autumn park",
    "a rocky coastline",
    "the old town square",
    "a wheat field",
    "a foggy riverbank",
    "a sunlit window",
    "a wooden pier",
    "a busy market",
    "a terrace overlooking the sea",
)
_LIGHT = (
    "soft golden hour light",
    "harsh midday sun",
    "the blue hour glow",
    "overcast diffuse light",
    "warm tungsten lamps",
    "dappled light through the leaves",
    "a single window light",
    "backlight that rims the hair",
    "low winter sun",
    "neon signs after the rain",
    "candlelight",
    "morning mist",
)
_STYLE = (
    "shallow depth of field",
    "a wide angle lens",
    "a long telephoto lens",
    "a slow shutter",
    "a high vantage point",
    "a low angle",
    "a centered symmetrical composition",
    "the rule of thirds",
    "leading lines",
    "a tight crop",
    "plenty of negative space",
    "a slight film grain",
)
_COLOUR = (
    "muted earthy tones",
    "deep saturated blues",
    "pastel pinks and creams",
    "warm oranges against cool shadows",
    "black and white with rich contrast",
    "faded vintage colours",
    "vivid greens",
    "a teal and amber palette",
)
_MOOD = (
    "calm and nostalgic",
    "joyful",
    "melancholic",
    "quietly intimate",
    "energetic",
    "mysterious",
    "serene",
    "playful",
    "contemplative",
)
_DETAILS = (
    "fine texture in the stone",
    "soft bokeh in the background",
    "droplets on the glass",
    "a gentle vignette",
    "crisp detail in the eyes",
    "long shadows on the ground",
    "steam rising into the cold air",
    "ripples on the water",
    "freckles and laugh lines",
    "peeling paint on the door",
)
_TEMPLATES = (
    "A photo of {subject} {action} {place}.",
    "{subject_cap} {action} {place}, lit by {light}.",
    "The scene is shot with {style}, giving {detail}.",
    "The colours are {colour}, and the mood feels {mood}.",
    "In the background, {subject} {action} {place} under {light}.",
    "Taken with {style} and {style2}, the image shows {detail}.",
    "{light_cap} falls on {subject}, creating {detail}.",
    "It is a {mood} moment: {subject} {action} {place}.",
)


def photo_sentence(rng: random.Random) -> str:
    """One sentence of plausible photo-description prose (as a vision model would write)."""
    subject = rng.choice(_SUBJECTS)
    light = rng.choice(_LIGHT)
    return rng.choice(_TEMPLATES).format(
        subject=subject,
        subject_cap=subject[0].upper() + subject[1:],
        action=rng.choice(_ACTIONS),
        place=rng.choice(_PLACES),
        light=light,
        light_cap=light[0].upper() + light[1:],
        style=rng.choice(_STYLE),
        style2=rng.choice(_STYLE),
        colour=rng.choice(_COLOUR),
        mood=rng.choice(_MOOD),
        detail=rng.choice(_DETAILS),
    )


def photo_sentences(count: int, seed: int = SEED) -> list[str]:
    """``count`` sentences of photo prose, the same list for the same seed."""
    rng = random.Random(seed)
    return [photo_sentence(rng) for _ in range(count)]


# --- tokenizer ---------------------------------------------------------------------------


def train_sentencepiece(sentences: Iterable[str], vocab_size: int = VOCAB_SIZE) -> bytes:
    """A serialized sentencepiece unigram model with T5's special-token ids, trained now.

    Single-threaded so the result is identical on every run; ``hard_vocab_limit`` off so a
    small corpus yields as many pieces as it supports, up to ``vocab_size``.
    """
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def write_t5_tokenizer(folder: Path, model_proto: bytes, *, max_length: int = MAX_LENGTH) -> Path:
    """Write a tokenizer folder laid out like the real PixArt-Sigma one (spiece.model)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model_proto)
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {
        **special,
        "tokenizer_class": "T5Tokenizer",
        "extra_ids": 0,
        "legacy": True,
        "model_max_length": max_length,
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", special)
    return folder


def _write_json(path: Path, data: dict) -> None:
    """Deterministic JSON (sorted keys) so two builds are byte-identical."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --- models --------------------------------------------------------------------------------


def _save_vae(folder: Path) -> None:
    """A 4-block AutoencoderKL (downscale 8) with tiny widths."""
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    blocks = len(VAE_CHANNELS)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=VAE_GROUPS,
        sample_size=VAE_SAMPLE_SIZE,
        scaling_factor=VAE_SCALING_FACTOR,
    )
    vae.save_pretrained(folder)


def _save_text_encoder(folder: Path, vocab_size: int) -> None:
    """A 2-layer T5 v1.1-style encoder (gated-gelu, untied head) of width T5_WIDTH."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(SEED)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=T5_WIDTH,
        d_kv=T5_KV,
        num_heads=T5_HEADS,
        num_layers=T5_LAYERS,
        d_ff=T5_FF,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=T5_BUCKETS,
        relative_attention_max_distance=T5_MAX_DISTANCE,
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )
    T5EncoderModel(config).eval().save_pretrained(folder)


def tiny_transformer(layers: int = DIT_LAYERS) -> Any:
    """A seeded PixArtTransformer2DModel of ``layers`` blocks wired to the tiny T5's width."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(SEED)
    return PixArtTransformer2DModel(
        num_attention_heads=DIT_HEADS,
        attention_head_dim=DIT_HEAD_DIM,
        in_channels=DIT_IN_CHANNELS,
        out_channels=DIT_OUT_CHANNELS,
        num_layers=layers,
        cross_attention_dim=DIT_HEADS * DIT_HEAD_DIM,
        sample_size=DIT_SAMPLE_SIZE,
        patch_size=DIT_PATCH,
        norm_type="ada_norm_single",
        caption_channels=T5_WIDTH,
        # None would switch micro-conditions ON at sample_size 128: wrong for Sigma.
        use_additional_conditions=False,
    )


def _save_transformer(folder: Path) -> None:
    """A 2-layer PixArtTransformer2DModel wired to the tiny T5's width."""
    tiny_transformer().save_pretrained(folder)


def _save_scheduler(folder: Path) -> None:
    """The scheduler PixArt-Sigma ships: DPM-Solver++ over linear betas, epsilon."""
    from diffusers import DPMSolverMultistepScheduler

    DPMSolverMultistepScheduler(
        num_train_timesteps=TRAIN_STEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="linear",
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
    ).save_pretrained(folder)


def _write_model_index(root: Path) -> None:
    """model_index.json as in the real repository, so PixArtSigmaPipeline can load root."""
    import diffusers

    _write_json(
        root / "model_index.json",
        {
            "_class_name": "PixArtSigmaPipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
            "text_encoder": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "T5Tokenizer"],
            "transformer": ["diffusers", "PixArtTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )


def build_tiny_pixart(root: Path) -> Path:
    """Write a tiny PixArt-Sigma diffusers folder at ``root`` and return ``root``."""
    from transformers import AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    proto = train_sentencepiece(photo_sentences(PROSE_SENTENCES))
    write_t5_tokenizer(root / "tokenizer", proto)
    vocab_size = len(AutoTokenizer.from_pretrained(str(root / "tokenizer")))
    _save_vae(root / "vae")
    _save_text_encoder(root / "text_encoder", vocab_size)
    _save_transformer(root / "transformer")
    _save_scheduler(root / "scheduler")
    _write_model_index(root)
    return root


@pytest.fixture(scope="session")
def tiny_pixart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny PixArt-Sigma model folder, built once per test session."""
    return build_tiny_pixart(tmp_path_factory.mktemp("tiny-pixart"))
