"""The attribute-conditioned DDPM (:mod:`pipelines.ddpm`) as a task of the training loop (:mod:`pipelines.training.loop`).

The seed's recipe: CelebA 64x64, ``UNet2DModel`` channels (32, 32, 32, 64), DDPM 1,000 steps with the cosine
schedule, MSE on the noise, Adam lr 1e-3 (the loop's AdamW with weight decay 0), batch 128. What the seed
claimed and did not do is done here: classifier-free guidance trained by condition dropout (a share
``condition_dropout`` of rows gets the null condition, drawn from the micro-step's generator, so a resumed run
drops the same rows) and pixels scaled once to [-1, 1].

* **Data contract** (:class:`RowTransform`): the image column -> RGB, resized to ``resolution`` (bilinear,
  antialiased; the dataset is already square) -> [0, 1] -> [-1, 1] (:func:`pipelines.ddpm.to_model_range`); the
  attributes column -> the ``attributes`` named by the settings (all 40 by default) as float 0/1.
* **Model**: ``save_pretrained`` of the :class:`~pipelines.ddpm.AttributeUNet` and of its training scheduler
  into one folder (``config.json``, ``diffusion_pytorch_model.safetensors``, ``scheduler_config.json``), plus a
  ``README.md`` model card; every checkpoint holds the same in ``checkpoint-<step>/ddpm/``.
* **Validation**: a grid of the first validation rows' attribute vectors, one column per guidance scale
  (fixed seeds, few DDIM steps), so a run's log shows the condition taking hold.

This module never reads params.yaml: :class:`DDPMSettings` is filled by ``stages/train_ddpm.py``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from pipelines import ddpm as D
from pipelines.generation import seed_for
from pipelines.hfdata import load_split_sorted
from pipelines.training.data import TransformedRows, dataset_digest, load_rows
from pipelines.training.loop import LoopSettings, run_training

DIVERGED_HINT = "lower train_ddpm.learning_rate, or use train_ddpm.mixed_precision fp32"


@dataclass(frozen=True)
class DDPMSettings(LoopSettings):
    """Every knob of one DDPM run (the ``train_ddpm`` params section and the run's conditioning, resolved)."""

    learning_rate: float = 1e-3
    train_batch_size: int = 128
    adam_weight_decay: float = 0.0  # the seed's Adam
    resolution: int = 64
    block_out_channels: tuple[int, ...] = D.SEED_CHANNELS
    attention_levels: int = 2
    conditioning: str = "input_channels"  # none | input_channels | timestep_embedding
    condition_channels: int = 5  # input_channels: the seed's Linear(40, 5), here Linear(41, 5) with the flag
    condition_dropout: float = 0.1  # share of rows trained on the null condition (classifier-free guidance)
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    attributes: tuple[str, ...] = ()  # the conditioned attributes, in order; () = all of the dataset's 40
    image_column: str = "image"
    attributes_column: str = "attributes"
    num_validation_images: int = 4
    validation_inference_steps: int = 25
    validation_sampler: str = "ddim"
    validation_guidance_scales: tuple[float, ...] = (0.0, 1.0, 3.0)


#: DDPM settings that change what a step computes (with the loop's: the checkpoint fingerprint)
_RECIPE_KEYS = ("resolution", "block_out_channels", "attention_levels", "conditioning", "condition_channels",
                "condition_dropout", "num_train_timesteps", "beta_schedule", "attributes", "image_column",
                "attributes_column")


def attribute_indices(all_names: Sequence[str], wanted: Sequence[str]) -> list[int]:
    """Positions of ``wanted`` (all when empty) in the dataset's attribute order; an unknown name raises."""
    if not wanted:
        return list(range(len(all_names)))
    unknown = [a for a in wanted if a not in all_names]
    if unknown:
        raise ValueError(f"unknown attributes {', '.join(unknown)}; CelebA's: {', '.join(all_names)}")
    return [list(all_names).index(a) for a in wanted]


class RowTransform:
    """A dataset row -> ``pixel_values`` ((3, R, R) in [-1, 1]) and ``attributes`` ((A,) float 0/1). A class,
    not a closure, so that spawned DataLoader workers can receive it."""

    def __init__(self, resolution: int, indices: Sequence[int], image_column: str = "image",
                 attributes_column: str = "attributes"):
        from torchvision import transforms

        self.columns, self.indices = (image_column, attributes_column), list(indices)
        self.image = transforms.Compose([
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.CenterCrop(resolution), transforms.ToTensor()])

    def __call__(self, row: dict) -> dict:
        image_column, attributes_column = self.columns
        values = torch.as_tensor(row[attributes_column], dtype=torch.float32)[self.indices]
        return {"pixel_values": D.to_model_range(self.image(row[image_column].convert("RGB"))), "attributes": values}


def training_loss(model: Any, scheduler: Any, batch: dict, generator: torch.Generator, condition_dropout: float,
                  conditioned: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The epsilon MSE of one batch: timesteps uniform over the schedule, Gaussian noise, the condition vectors
    with a share ``condition_dropout`` replaced by the null condition. All randomness from ``generator`` (CPU);
    the one part is the share of rows trained on the null condition (logged, so the dropout rate is measured; 1
    for an unconditional network)."""
    x0 = batch["pixel_values"]
    device = next(model.parameters()).device
    noise = torch.randn(x0.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
    noisy = scheduler.add_noise(x0, noise, timesteps)
    kwargs: dict[str, torch.Tensor] = {}
    null_share = torch.tensor(1.0)  # an unconditional network sees no condition: every row is "null"
    if conditioned:
        conditions, dropped = D.drop_conditions(D.condition_vector(batch["attributes"]), condition_dropout, generator)
        kwargs["condition"] = conditions.to(device)
        null_share = dropped.float().mean()
    pred = model(noisy.to(device), timesteps.to(device), return_dict=False, **kwargs)[0]
    return F.mse_loss(pred.float(), noise.to(device), reduction="mean"), {"null_share": null_share}


class DDPMTask:
    """The DDPM's part of a training run (the loop's :class:`~pipelines.training.loop.TrainingTask`)."""

    name = "train_ddpm"
    model_name = "ddpm"
    diverged_hint = DIVERGED_HINT

    def __init__(self, settings: DDPMSettings, dataset_dir: str | Path, attribute_names: Sequence[str],
                 cache_dir: str | Path | None = None, card: dict | None = None):
        s = self.s = settings
        self.dataset_dir, self.card = Path(dataset_dir), card or {}
        self.indices = attribute_indices(attribute_names, s.attributes)
        self.attribute_names = [attribute_names[i] for i in self.indices]
        self.model = D.build_model(len(self.indices), s.conditioning, s.resolution, s.block_out_channels,
                                   s.condition_channels, s.attention_levels, seed=s.seed)
        self.scheduler = D.noise_scheduler(s.num_train_timesteps, s.beta_schedule)
        self.frozen: tuple = ()
        ds = load_rows(self.dataset_dir, "train", {"image_column": s.image_column,
                                                   "attributes_column": s.attributes_column}, cache_dir)
        self.rows = TransformedRows(ds, RowTransform(s.resolution, self.indices, s.image_column, s.attributes_column))
        self.cache_dir = cache_dir
        self._validation: tuple[torch.Tensor, list[int]] | None | bool = False  # False: not read yet

    def recipe(self) -> dict:
        """The DDPM settings in the checkpoint fingerprint."""
        return {k: getattr(self.s, k) for k in _RECIPE_KEYS}

    def data_identity(self) -> str:
        """:func:`~pipelines.training.data.dataset_digest` of the dataset folder."""
        return dataset_digest(self.dataset_dir)

    def loss(self, model: Any, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """:func:`training_loss` with this run's dropout."""
        return training_loss(model, self.scheduler, batch, generator, self.s.condition_dropout,
                             self.model.conditioned)

    def validation_rows(self) -> tuple[torch.Tensor, list[int]] | None:
        """The first ``num_validation_images`` validation rows by id: their attributes and seeds."""
        if self._validation is False:
            self._validation = None
            if self.s.num_validation_images:
                vds = load_split_sorted(self.dataset_dir, "validation", ["id", self.s.attributes_column],
                                        self.s.num_validation_images, self.cache_dir)
                if len(vds):
                    attrs = torch.tensor([list(v) for v in vds[self.s.attributes_column]])[:, self.indices]
                    self._validation = (attrs, [seed_for(i, self.s.seed) for i in vds["id"]])
        return self._validation  # type: ignore[return-value]

    def validate(self, step: int) -> Image.Image | None:
        """Samples for the validation attributes: one row per vector, one column per guidance scale."""
        rows = self.validation_rows()
        if rows is None:
            return None
        attrs, seeds = rows
        sampler = D.sampling_scheduler(self.s.validation_sampler, self.scheduler.config)
        scales = self.s.validation_guidance_scales if self.model.conditioned else (1.0,)
        was_training = self.model.training
        self.model.eval()
        columns = [D.generate(self.model, sampler, attrs if self.model.conditioned else None, seeds,
                              self.s.validation_inference_steps, w) for w in scales]
        self.model.train(was_training)
        return image_grid(torch.stack(columns, dim=1).flatten(0, 1), len(scales))

    def save(self, out_dir: Path) -> None:
        """``save_pretrained`` of the network (fp32, safetensors) and of the training scheduler, one folder."""
        self.model.save_pretrained(out_dir, safe_serialization=True)
        self.scheduler.save_pretrained(out_dir)

    def write_card(self, out_dir: Path, steps: int, metrics: dict) -> None:
        """The model card (:func:`write_model_card`)."""
        write_model_card(out_dir, dataset=self.card.get("dataset", str(self.dataset_dir)), settings=self.s,
                         attributes=self.attribute_names, steps=steps, metrics=metrics,
                         standin_data=bool(self.card.get("standin_data", False)), note=self.card.get("note", ""))


def image_grid(images: torch.Tensor, columns: int) -> Image.Image:
    """``(N, 3, H, W)`` images in [0, 1] as one picture, ``columns`` per row, 2 px gaps."""
    from torchvision.utils import make_grid

    from pipelines.sampling import tensor_to_pil

    return tensor_to_pil(make_grid(images, nrow=columns, padding=2, pad_value=1.0)[None])[0]


def write_model_card(out_dir: str | Path, *, dataset: str, settings: DDPMSettings, attributes: Sequence[str],
                     steps: int, metrics: dict, standin_data: bool, note: str = "") -> Path:
    """``README.md`` for a saved DDPM: front matter, how to sample it with classifier-free guidance, the recipe."""
    import yaml

    out = Path(out_dir) / "README.md"
    front = {"license": "other", "datasets": [dataset], "library_name": "diffusers", "inference": False,
             "tags": ["ddpm", "unconditional-image-generation" if settings.conditioning == "none"
                      else "attribute-conditioned", "celeba", "facecontrol"]}
    recipe = "\n".join(f"| `{k}` | `{v}` |" for k, v in asdict(settings).items())
    mets = "\n".join(f"| `{k}` | {v:.6g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in metrics.items())
    warning = ("\n> **OFFLINE SAMPLE RUN.** Trained for a few steps on cartoon faces rendered by code, not CelebA: "
               "it only proves the pipeline runs.\n" if standin_data else "")
    conditioned = settings.conditioning != "none"
    first = attributes.index("Smiling") if "Smiling" in attributes else 0
    target = f"attributes = torch.zeros(4, {len(attributes)}); attributes[:, {first}] = 1  # {attributes[first]}\n" \
        if conditioned else ""
    usage = (f'{target}images = generate(model, sampling_scheduler("ddim", scheduler.config), '
             f'{"attributes" if conditioned else "None"}, seeds=[0, 1, 2, 3],\n'
             f'                  num_inference_steps=50{", guidance_scale=3.0" if conditioned else ""})')
    text = f"""---
{yaml.safe_dump(front, sort_keys=True).strip()}
---

# {"Attribute-conditioned" if conditioned else "Unconditional"} face DDPM (facecontrol)
{warning}
A pixel-space DDPM at {settings.resolution}x{settings.resolution} trained by the facecontrol pipeline
(`stages/train_ddpm.py`, `pipelines/training/ddpm.py` on the loop of `pipelines/training/loop.py`) on
`{dataset}` (split `train`). Conditioning: `{settings.conditioning}`{f''' on {len(attributes)} attributes plus a
presence flag; null condition all zeros; condition dropout {settings.condition_dropout}''' if conditioned else ''}.
Guidance convention: `eps = eps_null + w (eps_cond - eps_null)` (w = 1: the conditional model; w = 0: the null
condition). {note}

```python
import torch
from pipelines.ddpm import generate, load_model, sampling_scheduler
model, scheduler = load_model("path/to/this/folder")
{usage}
```

## Attributes (condition order)

{", ".join(f"`{a}`" for a in attributes) if conditioned else "none (unconditional)"}

## Training ({steps} steps)

| metric | value |
|---|---|
{mets}

## Recipe

| setting | value |
|---|---|
{recipe}
"""
    out.write_text(text)
    return out


def train_ddpm(settings: DDPMSettings, dataset_dir: str | Path, attribute_names: Sequence[str],
               output_dir: str | Path, checkpoints_dir: str | Path, log_dir: str | Path, *, cpu: bool = False,
               cache_dir: str | Path | None = None, stop_after: int | None = None, card: dict | None = None,
               on_step: Callable[[int, Any], None] | None = None) -> dict:
    """Train (or resume) one DDPM (:class:`DDPMTask` in :func:`~pipelines.training.loop.run_training`, whose
    docstring tells resume, ``stop_after``, ``cpu`` and ``on_step``); returns its summary."""
    task = DDPMTask(settings, dataset_dir, attribute_names, cache_dir=cache_dir, card=card)
    return run_training(task, settings, output_dir, checkpoints_dir, log_dir, cpu=cpu, stop_after=stop_after,
                        on_step=on_step)
