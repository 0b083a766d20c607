"""CLIP scores from a tiny CLIP built at test time, and the reasons a folder is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.tiny_clip import TEXT_POSITIONS, build_tiny_clip
from trainer.clip_score import NOT_CONFIGURED, SCORE_SCALE, ClipScorer, clip_unavailable

COLOURS = {"red": (210, 30, 40), "green": (30, 160, 60), "blue": (20, 40, 220)}
TEXTS = ("a red thing", "the green one on the mat", "blue water in the morning")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def scorer(tiny_clip: Path) -> ClipScorer:
    return ClipScorer.load(tiny_clip, "cpu")


def images() -> list[Image.Image]:
    """Three photos of different sizes (the processor resizes and crops them)."""
    sizes = [(64, 48), (40, 80), (50, 50)]
    return [Image.new("RGB", size, rgb) for size, rgb in zip(sizes, COLOURS.values(), strict=True)]


def every_pair() -> tuple[list[Image.Image], list[str]]:
    """Each image with each text: nine pairs."""
    photos = images()
    return [p for p in photos for _ in TEXTS], [t for _ in photos for t in TEXTS]


def expected_scores(folder: Path, photos: list[Image.Image], texts: list[str]) -> list[float]:
    """CLIPScore computed through the model's separate feature heads, as a cross-check."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder).eval()
    tokens = CLIPTokenizer.from_pretrained(folder)(
        texts, padding=True, truncation=True, max_length=TEXT_POSITIONS, return_tensors="pt"
    )
    pixels = CLIPImageProcessorPil.from_pretrained(folder)(images=photos, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output
        text = model.get_text_features(**tokens).pooler_output
    cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    return [max(SCORE_SCALE * value, 0.0) for value in cosine.tolist()]


def test_scores_are_clip_scores_of_each_pair(scorer: ClipScorer, tiny_clip: Path) -> None:
    photos, texts = every_pair()
    scores = scorer.score(photos, texts)
    assert scores == pytest.approx(expected_scores(tiny_clip, photos, texts), abs=1e-4)
    assert all(0.0 <= score <= SCORE_SCALE for score in scores)
    assert any(score > 0.0 for score in scores)
    assert any(score == 0.0 for score in scores)  # a negative cosine scores 0, as CLIPScore


def test_scores_are_deterministic_and_independent_of_the_batch(
    scorer: ClipScorer, tiny_clip: Path
) -> None:
    photos, texts = every_pair()
    scores = scorer.score(photos, texts)
    assert ClipScorer.load(tiny_clip, "cpu").score(photos, texts) == scores
    one_by_one = [scorer.score([p], [t])[0] for p, t in zip(photos, texts, strict=True)]
    assert one_by_one == pytest.approx(scores, abs=1e-4)


def test_long_prompts_are_cut_to_clips_length(scorer: ClipScorer) -> None:
    photo = images()[:1]
    long = "the green one on the mat " * 20  # far beyond TEXT_POSITIONS tokens
    assert scorer.score(photo, [long]) == scorer.score(photo, [long + "and more words"])


def test_images_and_texts_pair_one_to_one(scorer: ClipScorer) -> None:
    assert scorer.score([], []) == []
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        scorer.score(images()[:2], TEXTS[:1])


def test_unavailable_reasons(tiny_clip: Path, tmp_path: Path) -> None:
    assert clip_unavailable(tiny_clip) is None
    assert clip_unavailable(None) == NOT_CONFIGURED
    assert "no such folder" in (clip_unavailable(tmp_path / "missing") or "")
    assert "no config.json" in (clip_unavailable(tmp_path) or "")

    other = tmp_path / "t5"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert "not a CLIP model folder (model_type 't5'" in (clip_unavailable(other) or "")

    for missing, reason in [
        ("model.safetensors", "no weights"),
        ("tokenizer.json", "no tokenizer"),
        ("preprocessor_config.json", "no image processor"),
    ]:
        broken = shutil.copytree(tiny_clip, tmp_path / f"without-{missing}")
        (broken / missing).unlink()
        assert reason in (clip_unavailable(broken) or ""), missing
        with pytest.raises(ValueError, match=reason):
            ClipScorer.load(broken, "cpu")
