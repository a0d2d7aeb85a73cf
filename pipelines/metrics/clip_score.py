"""CLIP score (Hessel et al. 2021, ``max(100 * cos(E_image, E_text), 0)``) with torchmetrics' ``CLIPScore``.

The model and processor are loaded here from a local directory (``from_pretrained``, offline) and handed
to torchmetrics as a callable, because torchmetrics only accepts hub names it knows for a string
argument (and wrapped in :class:`TensorFeatures`, because torchmetrics 1.9 expects the transformers 4
return type of ``get_*_features``). The real model is ``openai/clip-vit-large-patch14`` (torchmetrics' default); the stand-in
(:func:`pipelines.standins.clip.build_clip_standin`) is a tiny ``CLIPModel`` of random weights with the real
image preprocessing (224 px) and an offline tokenizer: its scores mean nothing.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def load_clip(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)`` from a local directory, in eval mode on ``device`` (no download)."""
    from transformers import CLIPModel, CLIPProcessor

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}/config.json not found: the CLIP model comes from the fetch_models stage")
    model = CLIPModel.from_pretrained(model_dir, local_files_only=True).to(torch.device(device)).eval()
    processor = CLIPProcessor.from_pretrained(model_dir, local_files_only=True)
    return model, processor


class TensorFeatures(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_image_features``/``get_text_features`` return the projected embeddings as
    tensors. transformers 5 returns a ``BaseModelOutputWithPooling`` (embeddings in ``pooler_output``),
    which torchmetrics 1.9 cannot normalise; older transformers returned the tensor itself."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        return self.model.config

    @staticmethod
    def _tensor(out: Any) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def to_chw_uint8(image: Any) -> Tensor:
    """PIL image, HxWx3 uint8 array or (3, H, W) uint8 tensor -> (3, H, W) uint8 tensor (what torchmetrics takes)."""
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) tensor, got {tuple(image.shape)}")
        return image
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got {arr.dtype} {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def clip_score(images: Sequence[Any], texts: Sequence[str], model_dir: str | Path | None = None,
               device: str | torch.device = "cpu", batch_size: int = 32, *,
               model_and_processor: tuple[Any, Any] | None = None) -> float:
    """Mean CLIP score of image/text pairs with torchmetrics' ``CLIPScore``: ``max(mean(100 cos), 0)``, in [0, 100].

    Give ``model_dir`` (loaded with :func:`load_clip`) or an already loaded ``model_and_processor``.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    if not images:
        raise ValueError("CLIP score of no images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    if model_and_processor is None:
        if model_dir is None:
            raise ValueError("give model_dir or model_and_processor")
        model_and_processor = load_clip(model_dir, device)
    model, processor = model_and_processor
    wrapped = model if isinstance(model, TensorFeatures) else TensorFeatures(model)
    metric = CLIPScore(model_name_or_path=lambda: (wrapped, processor)).to(device)
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            batch = [to_chw_uint8(im).to(device) for im in images[i:i + batch_size]]
            metric.update(batch, list(texts[i:i + batch_size]))
        return float(metric.compute())


def clip_similarities(images: Sequence[Any], texts: Sequence[str], model_and_processor: tuple[Any, Any],
                      device: str | torch.device = "cpu", batch_size: int = 32) -> np.ndarray:
    """``100 * cos(E_image, E_text)`` for every image against every text: an (N_images, N_texts) array.

    The same embeddings as :func:`clip_score` (the processor's image preprocessing; texts padded and cut at
    the text model's positions), so its diagonal on paired inputs is torchmetrics' per-pair score.
    """
    if not images or not texts:
        raise ValueError("CLIP similarities need at least one image and one text")
    model, processor = model_and_processor
    wrapped = model if isinstance(model, TensorFeatures) else TensorFeatures(model)
    device = torch.device(device)
    max_len = wrapped.config.text_config.max_position_embeddings
    with torch.no_grad():
        tok = processor(text=list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_len)
        txt = wrapped.get_text_features(tok["input_ids"].to(device), tok["attention_mask"].to(device))
        img = []
        for i in range(0, len(images), batch_size):
            batch = [to_chw_uint8(im) for im in images[i:i + batch_size]]
            pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
            img.append(wrapped.get_image_features(pixels))
        img_n = torch.nn.functional.normalize(torch.cat(img).float(), dim=-1)
        txt_n = torch.nn.functional.normalize(txt.float(), dim=-1)
        return (100 * img_n @ txt_n.T).cpu().numpy().astype(np.float64)


def prompt_adherence(images: Sequence[Any], prompts: Sequence[str], reference_text: str,
                     model_and_processor: tuple[Any, Any], device: str | torch.device = "cpu",
                     batch_size: int = 32) -> dict:
    """Does each image show its prompt rather than the training domain? (our rule, for overfitting)

    ``clip_score``: torchmetrics' CLIP score of the (image, prompt) pairs, overall and per prompt.
    ``prompt_win_rate``: the share of images more similar (CLIP cosine) to their own prompt than to
    ``reference_text``, a description of the training domain (e.g. "a photo of a person's face"). A model
    that turns "a cat" into a face loses that comparison, so overfitting shows as a falling rate.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    texts = list(dict.fromkeys(prompts))
    sims = clip_similarities(images, [*texts, reference_text], model_and_processor, device, batch_size)
    own = np.array([sims[i, texts.index(p)] for i, p in enumerate(prompts)])
    wins = own > sims[:, -1]
    per_prompt = {}
    for t in texts:
        at = [i for i, p in enumerate(prompts) if p == t]
        per_prompt[t] = {"count": len(at), "win_rate": float(wins[at].mean()),
                         "clip_score": clip_score([images[i] for i in at], [t] * len(at), device=device,
                                                  batch_size=batch_size, model_and_processor=model_and_processor)}
    return {"num_images": len(images), "reference_text": reference_text,
            "clip_score": clip_score(images, prompts, device=device, batch_size=batch_size,
                                     model_and_processor=model_and_processor),
            "prompt_win_rate": float(wins.mean()), "per_prompt": per_prompt,
            "rule": "an image wins when 100*cos(image, its prompt) > 100*cos(image, reference_text) under CLIP"}
