"""CLIP score on the tiny stand-in CLIP (random weights: the value means nothing, the arithmetic is checked)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.metrics import clip_score as C
from pipelines.standins.clip import build_clip_standin


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return build_clip_standin(tmp_path_factory.mktemp("clip"), seed=0)


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64 + 8 * i, 48, 3), dtype=np.uint8) for i in range(5)]
    texts = ["a face", "a smiling person with glasses", "x", "hello world", "a photo of a woman"]
    return images, texts


def _manual(model, processor, images, texts) -> torch.Tensor:
    """Per-pair 100 * cos(image embedding, text embedding) from CLIPModel.forward."""
    inputs = processor(text=texts, images=[C.to_chw_uint8(i) for i in images], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    return 100 * torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)


def test_standin_loads_offline_with_real_preprocessing(clip_dir):
    model, processor = C.load_clip(clip_dir)
    assert type(model).__name__ == "CLIPModel"
    ip = processor.image_processor
    assert ip.size["shortest_edge"] == 224 and ip.crop_size["height"] == ip.crop_size["width"] == 224
    assert processor.tokenizer.model_max_length == 77
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    with pytest.raises(FileNotFoundError):
        C.load_clip(clip_dir / "missing")


def test_clip_score_matches_manual_and_torchmetrics(clip_dir, pairs):
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    images, texts = pairs
    model, processor = C.load_clip(clip_dir)
    manual = _manual(model, processor, images, texts)
    wrapped = C.TensorFeatures(model)
    per_pair, n = _clip_score_update([C.to_chw_uint8(i) for i in images], texts, wrapped, processor)
    assert n == 5
    torch.testing.assert_close(per_pair, manual, rtol=1e-4, atol=1e-4)
    expected = max(manual.mean().item(), 0.0)  # torchmetrics clamps the mean at 0
    functional = tm_clip_score([C.to_chw_uint8(i) for i in images], texts,
                               model_name_or_path=lambda: (wrapped, processor)).item()
    ours = C.clip_score(images, texts, clip_dir, device="cpu", batch_size=2)
    assert ours == pytest.approx(expected, abs=1e-4) and functional == pytest.approx(expected, abs=1e-4)
    assert 0.0 <= ours <= 100.0
    assert C.clip_score(images, texts, clip_dir, batch_size=5) == pytest.approx(ours, abs=1e-5)  # batch-independent


def test_clip_score_of_matching_embeddings_known_answer(clip_dir, pairs):
    # image-image CLIP score of an image with itself is 100 (cos = 1): a known answer on any weights
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score

    images, _ = pairs
    model, processor = C.load_clip(clip_dir)
    imgs = [C.to_chw_uint8(i) for i in images]
    same = tm_clip_score(imgs, imgs, model_name_or_path=lambda: (C.TensorFeatures(model), processor)).item()
    assert same == pytest.approx(100.0, abs=1e-3)


def test_clip_score_deterministic_and_validates(clip_dir, pairs):
    images, texts = pairs
    pil = [__import__("PIL.Image", fromlist=["Image"]).fromarray(i) for i in images]
    a = C.clip_score(pil, texts, clip_dir)
    assert a == C.clip_score(images, texts, model_and_processor=C.load_clip(clip_dir))
    assert build_clip_standin(clip_dir.parent / "again", seed=0) and \
        C.clip_score(images, texts, clip_dir.parent / "again") == a
    with pytest.raises(ValueError):
        C.clip_score(images, texts[:2], clip_dir)
    with pytest.raises(ValueError):
        C.to_chw_uint8(np.zeros((4, 4), np.float32))


def test_similarities_diagonal_is_the_per_pair_score(clip_dir, pairs):
    images, texts = pairs
    model, processor = C.load_clip(clip_dir)
    sims = C.clip_similarities(images, texts, (model, processor), batch_size=2)
    assert sims.shape == (5, 5)
    np.testing.assert_allclose(np.diag(sims), _manual(model, processor, images, texts).numpy(), atol=1e-3)
    np.testing.assert_allclose(C.clip_similarities(images[:1], texts, (model, processor))[0], sims[0], atol=1e-4)


class ColourCLIP(torch.nn.Module):
    """A CLIP with known embeddings: an image is its mean normalised colour (R, G, B); a text whose first
    character is 'r', 'g' or 'f' points along R, G or B ("face": the reference domain is blue)."""

    def __init__(self, processor):
        super().__init__()
        self.config = type("Config", (), {"text_config": type("Text", (), {"max_position_embeddings": 77})()})()
        self.axis = {processor.tokenizer(w)["input_ids"][1]: i for i, w in enumerate(("red", "green", "face"))}

    def get_image_features(self, pixel_values):
        return pixel_values.mean(dim=(2, 3))

    def get_text_features(self, input_ids, attention_mask=None):
        out = torch.zeros(len(input_ids), 3)
        for row, ids in enumerate(input_ids.tolist()):
            out[row, self.axis[ids[1]]] = 1.0  # ids[0] is BOS
        return out


def test_prompt_adherence_known_answer(clip_dir):
    _, processor = C.load_clip(clip_dir)
    model = ColourCLIP(processor)
    red, blue = (np.zeros((32, 32, 3), np.uint8) for _ in range(2))
    red[..., 0], blue[..., 2] = 255, 255
    # red asked for red: closer to its prompt than to the reference "face" (blue); blue asked for green: not
    out = C.prompt_adherence([red, blue, red], ["red", "green", "red"], "face", (model, processor))
    assert out["prompt_win_rate"] == pytest.approx(2 / 3) and out["num_images"] == 3
    assert out["per_prompt"]["red"]["count"] == 2 and out["per_prompt"]["red"]["win_rate"] == 1.0
    assert out["per_prompt"]["green"]["win_rate"] == 0.0 and out["per_prompt"]["green"]["clip_score"] == 0.0  # negative cos, clamped
    pixels = processor(images=[C.to_chw_uint8(red)], return_tensors="pt")["pixel_values"].mean(dim=(2, 3))[0]
    assert out["per_prompt"]["red"]["clip_score"] == pytest.approx(100 * float(pixels[0] / pixels.norm()), rel=1e-4)
    assert out["clip_score"] == pytest.approx(C.clip_score([red, blue, red], ["red", "green", "red"],
                                                           model_and_processor=(model, processor)))
    # the reference itself as the prompt never wins (strictly closer is required)
    assert C.prompt_adherence([red], ["face"], "face", (model, processor))["prompt_win_rate"] == 0.0
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        C.prompt_adherence([red, blue], ["red"], "face", (model, processor))
