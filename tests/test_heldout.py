"""Done-when of the trainer: the tiny model trains on a cache the encode stage made from real
photos, and its loss falls on held-out photos it never saw.
"""

from __future__ import annotations

from pathlib import Path

from tests.immich_library import make_jpeg
from trainer.cache import Cache
from trainer.config import config_for
from trainer.encode import EncodeConfig, SampleSource, encode_sources
from trainer.evaluate import held_out_loss
from trainer.limits import RunLimits
from trainer.loop import Trainer

# (photo, scale, caption): each at least 1024 px on its short side.
TRAINING = [
    ("astronaut", 2.1, "An astronaut in a white suit in front of a flag."),
    ("chelsea", 3.5, "A ginger tabby cat looking up, soft daylight."),
    ("coffee", 2.7, "A cup of coffee on a saucer, warm light, shallow focus."),
    ("rocket", 2.5, "A rocket on the launch pad under a blue sky."),
]
HELD_OUT = [("stereo_motorcycle", 2.1, "A motorcycle parked in a workshop.")]
STEPS = 40
IMPROVEMENT = 0.9  # held-out loss must end below 90% of where it started


def encode(root: Path, photos: list[tuple[str, float, str]], tiny_pixart: Path) -> Path:
    sources = [
        SampleSource(name, name, caption, lambda n=name, s=scale: make_jpeg(n, scale=s))
        for name, scale, caption in photos
    ]
    config = EncodeConfig(model=str(tiny_pixart), vae_device="cpu", text_device="cpu")
    with Cache.open(root, create=True) as cache:
        report = encode_sources(cache, sources, config, bar=False)
    assert len(report.samples) == len(photos)
    return root


def test_loss_falls_on_held_out_photos(tmp_path: Path, tiny_pixart: Path) -> None:
    training = encode(tmp_path / "train", TRAINING, tiny_pixart)
    held_out = encode(tmp_path / "held-out", HELD_OUT, tiny_pixart)
    config = config_for(
        "cpu-test", model=str(tiny_pixart), cache_dir=training, output_dir=tmp_path / "out",
        device="cpu", learning_rate=1e-3, batch_size=1, checkpoint_every=STEPS,
    )  # fmt: skip
    trainer = Trainer(config)
    with Cache.open(held_out) as unseen:
        before = held_out_loss(trainer.transformer, unseen, seed=1, device=trainer.device)
        trainer.run(RunLimits(until_step=STEPS))
        after = held_out_loss(trainer.transformer, unseen, seed=1, device=trainer.device)
    trainer.close()
    assert after < IMPROVEMENT * before, (before, after)
