"""Training a landmark ControlNet on the Hub-layout dataset, with diffusers and accelerate (our own loop).

The recipe is diffusers' ``train_controlnet.py`` (SD 2.1-base, epsilon target, MSE, AdamW, constant lr),
rewritten as a library function so that every choice is a parameter and the run is resumable and exact:

* **Data contract** (:func:`make_transform`): ``image`` -> resize + centre crop -> [-1, 1];
  ``conditioning_image`` -> the same geometry -> [0, 1]; ``text`` -> CLIP token ids (padded to the
  tokenizer's ``model_max_length``). A share ``proportion_empty_prompts`` of prompts is replaced by "".
* **Deterministic order and noise**: the training rows come from an endless stream of per-epoch
  permutations seeded by ``seed`` and the epoch (:func:`sample_indices`); the noise, timesteps, VAE
  sample and empty-prompt draws of micro-step ``m`` on process ``r`` come from a generator seeded by
  ``(seed, m, r)``. So a run resumed from a checkpoint takes exactly the steps an uninterrupted run takes.
* **Precision**: ``accelerate`` autocasts the ControlNet (its weights stay fp32); the frozen VAE, UNet and
  text encoder are cast to fp16/bf16 under mixed precision.
* **Checkpoints** (``accelerator.save_state``) every ``checkpointing_steps`` into
  ``<checkpoints_dir>/checkpoint-<step>``, at most ``checkpoints_total_limit`` kept (oldest removed); the
  next call resumes from the newest complete one automatically, if it was made by the same recipe on the
  same data (:func:`recipe_fingerprint` + :func:`dataset_digest`) and not past ``max_train_steps``.
* **Divergence**: a non-finite loss (or gradient norm, outside fp16's loss scaling) stops the run with
  :class:`NonFiniteTraining`; weights are checked finite before every save, so no NaN model or checkpoint
  is written.
* **Logs** in the DVCLive layout, written here (dvclive itself is not needed): ``<log_dir>/metrics.json``,
  ``<log_dir>/plots/metrics/train/{loss,lr}.tsv`` (``step`` + value columns, one row per optimizer step)
  and validation grids ``<log_dir>/plots/images/validation/step-<k>.png`` + ``latest.png``.
* **Output**: ``save_pretrained`` of the ControlNet (fp32, safetensors; loadable by
  ``ControlNetModel.from_pretrained``) and a ``README.md`` model card.

This module never reads params.yaml: :class:`TrainSettings` is filled by ``stages/train_controlnet.py``.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.digests import tree_digest
from pipelines.errors import PipelineError
from pipelines.generation import generate_images, load_conditions, make_scheduler, sample_grid, seed_for
from pipelines.runtime import seed_everything

log = logging.getLogger("pipelines.training.controlnet")

CHECKPOINT_PREFIX = "checkpoint-"
STEP_FILE = "facecontrol_step.json"  # written last into a checkpoint: its presence marks it complete
METRICS_DIR = Path("plots/metrics/train")
IMAGES_DIR = Path("plots/images/validation")
GRID_CELL_MAX = 256
#: diffusers' default ControlNet condition embedding (SD: VAE downscale 8 = three stride-2 convolutions)
DEFAULT_CONDITIONING_CHANNELS = (16, 32, 96, 256)
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DIVERGED_HINT = "lower train_controlnet.learning_rate, or use train_controlnet.mixed_precision fp32"


class NonFiniteTraining(PipelineError):
    """The loss, the gradients or the weights became NaN or infinite: the run stopped and wrote no model."""


@dataclass(frozen=True)
class TrainSettings:
    """Every knob of a ControlNet training run (the ``train_controlnet`` params section, resolved)."""

    resolution: int = 512
    learning_rate: float = 1e-5
    train_batch_size: int = 4  # per process
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "fp32"  # fp32 | fp16 | bf16 (accelerate calls fp32 "no")
    max_train_steps: int = 25000
    checkpointing_steps: int = 5000
    checkpoints_total_limit: int | None = 2
    validation_steps: int = 5000
    num_validation_images: int = 4
    validation_extra_prompts: tuple[str, ...] = ()  # drawn on the first validation condition, one grid row each
    validation_inference_steps: int = 20
    validation_guidance_scale: float = 7.5
    validation_scheduler: str = "unipc"
    seed: int = 0
    proportion_empty_prompts: float = 0.0
    dataloader_num_workers: int = 0
    lr_scheduler: str = "constant"  # constant | constant_with_warmup | linear | cosine
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0


# --- data -------------------------------------------------------------------------------------------------


def image_transform(resolution: int) -> Callable[[Image.Image], torch.Tensor]:
    """``image`` -> RGB, bilinear resize of the short side to ``resolution``, centre crop, [-1, 1] CHW."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])


def condition_transform(resolution: int) -> Callable[[Image.Image], torch.Tensor]:
    """``conditioning_image`` -> the same geometry as :func:`image_transform`, values in [0, 1]."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution), transforms.ToTensor()])


def tokenize(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """CLIP token ids, padded/truncated to the tokenizer's ``model_max_length``: (N, L) long."""
    return tokenizer(list(texts), max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids


def make_transform(tokenizer: Any, resolution: int) -> Callable[[dict], dict]:
    """The per-row transform of the diffusers ControlNet contract: a dataset row (``image``,
    ``conditioning_image``, ``text``) -> ``pixel_values``, ``conditioning_pixel_values``, ``input_ids``."""
    img, cond = image_transform(resolution), condition_transform(resolution)

    def transform(row: dict) -> dict:
        return {"pixel_values": img(row["image"].convert("RGB")),
                "conditioning_pixel_values": cond(row["conditioning_image"].convert("RGB")),
                "input_ids": tokenize(tokenizer, [row["text"]])[0]}

    return transform


class TransformedRows(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` seen through a per-row transform (for a torch ``DataLoader``)."""

    def __init__(self, ds: Any, transform: Callable[[dict], dict]):
        self.ds, self.transform = ds, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return self.transform(self.ds[int(i)])


def collate(rows: list[dict]) -> dict:
    """Stack the transformed rows into a batch."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the ``n`` rows in ``epoch``: ``torch.randperm`` under the seed ``seed * 1_000_003 + epoch``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def sample_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions ``start .. start+count-1`` of the endless stream of epoch permutations of ``n`` rows."""
    if n < 1:
        raise ValueError("no training rows")
    out: list[int] = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        take = min(count - len(out), n - offset)
        out += epoch_permutation(n, seed, epoch)[offset:offset + take]
        pos += take
    return out


def batch_stream(n: int, seed: int, batch_size: int, start_micro_step: int, process_index: int = 0,
                 num_processes: int = 1) -> Iterator[list[int]]:
    """Row indices for each micro-step from ``start_micro_step`` on, this process's share: micro-step ``m``
    takes stream positions ``[m*B*P + r*B, m*B*P + (r+1)*B)``, so the order does not depend on where a run
    was resumed."""
    m = start_micro_step
    while True:
        yield sample_indices(n, seed, (m * num_processes + process_index) * batch_size, batch_size)
        m += 1


def epochs_seen(steps: int, s: TrainSettings, num_processes: int, train_rows: int) -> float:
    """How many passes over ``train_rows`` rows ``steps`` optimizer steps make (the seed: ~1 epoch of the
    100K set matured, 3 overfit)."""
    return steps * s.train_batch_size * s.gradient_accumulation_steps * num_processes / train_rows


def step_generator(seed: int, micro_step: int, process_index: int = 0) -> torch.Generator:
    """The CPU generator for the noise, timesteps, VAE sample and empty prompts of one micro-step."""
    return torch.Generator().manual_seed(seed_for(f"train:{micro_step}:{process_index}", seed))


# --- models -----------------------------------------------------------------------------------------------


def conditioning_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """The condition embedding channels that bring a full-size condition to the latent size: diffusers'
    ``(16, 32, 96, 256)`` (downscale 8: SD's VAE and the stand-in's) cut to ``log2(vae_scale_factor) + 1``
    blocks for a VAE that downscales less (2: ``(16, 32)``)."""
    k = int(round(math.log2(vae_scale_factor)))
    if 2 ** k != vae_scale_factor or not 0 < k < len(DEFAULT_CONDITIONING_CHANNELS):
        raise ValueError(f"VAE downscale {vae_scale_factor} is not 2, 4 or 8")
    return DEFAULT_CONDITIONING_CHANNELS[:k + 1]


@dataclass
class Components:
    """The frozen Stable Diffusion parts, the trained ControlNet and the training noise scheduler."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    unet: Any
    controlnet: Any
    noise_scheduler: Any

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_components(pretrained_dir: str | Path, controlnet_dir: str | Path | None = None, seed: int = 0) -> Components:
    """Load SD's parts from a local folder (a real snapshot or the stand-in) and the ControlNet to train:
    from ``controlnet_dir`` when given, else ``ControlNetModel.from_unet(unet)`` (condition embedding drawn
    under ``torch.manual_seed(seed)``; zero convolutions zero). Training noise: DDPM with the base's
    scheduler config (its ``prediction_type`` decides the target)."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(pretrained_dir)
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"{root} holds no Stable Diffusion model (no model_index.json)")
    vae = AutoencoderKL.from_pretrained(root / "vae")
    unet = UNet2DConditionModel.from_pretrained(root / "unet")
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(root / "scheduler")
    if controlnet_dir is not None:
        controlnet = ControlNetModel.from_pretrained(str(controlnet_dir))
    else:
        torch.manual_seed(seed)
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels(scale))
    return Components(vae, text_encoder, tokenizer, unet, controlnet, noise_scheduler)


def training_loss(c: Components, controlnet: Any, batch: dict, generator: torch.Generator,
                  weight_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ControlNet loss of one batch: encode, add noise at random timesteps, predict with the frozen
    UNet plus the ControlNet's residuals, MSE against the scheduler's target (noise for ``epsilon``, the
    velocity for ``v_prediction``). All randomness comes from ``generator`` (CPU)."""
    device = c.unet.device
    pixel_values = batch["pixel_values"].to(device, weight_dtype)
    with torch.no_grad():
        latents = c.vae.encode(pixel_values).latent_dist.sample(generator=generator)
        latents = latents * c.vae.config.scaling_factor
        enc = c.text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(device, latents.dtype)
    bsz = latents.shape[0]
    timesteps = torch.randint(0, c.noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator).to(device)
    noisy = c.noise_scheduler.add_noise(latents, noise, timesteps)
    cond = batch["conditioning_pixel_values"].to(device, weight_dtype)
    down, mid = controlnet(noisy, timesteps, encoder_hidden_states=enc, controlnet_cond=cond, return_dict=False)
    pred = c.unet(noisy, timesteps, encoder_hidden_states=enc,
                  down_block_additional_residuals=[s.to(weight_dtype) for s in down],
                  mid_block_additional_residual=mid.to(weight_dtype), return_dict=False)[0]
    kind = c.noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = c.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


# --- logs and checkpoints ---------------------------------------------------------------------------------


class MetricsLog:
    """DVCLive-layout logs written without dvclive: one TSV per metric under ``plots/metrics/train/``
    (``step<TAB>name``), the latest values in ``metrics.json`` (``{"step": k, "train": {...}}``)."""

    def __init__(self, log_dir: str | Path):
        self.dir = Path(log_dir)
        (self.dir / METRICS_DIR).mkdir(parents=True, exist_ok=True)

    def tsv(self, name: str) -> Path:
        return self.dir / METRICS_DIR / f"{name}.tsv"

    def log(self, step: int, values: dict[str, float]) -> None:
        """Append one row per metric and rewrite ``metrics.json``."""
        for name, value in values.items():
            path = self.tsv(name)
            new = not path.is_file()
            with open(path, "a") as fh:
                if new:
                    fh.write(f"step\t{name}\n")
                fh.write(f"{step}\t{float(value):.8g}\n")
        self.write_summary(step, values)

    def write_summary(self, step: int, values: dict[str, float], extra: dict | None = None) -> None:
        from pipelines.reports import write_json

        write_json(self.dir / "metrics.json", {"step": step, "train": dict(values), **(extra or {})})

    def truncate(self, last_step: int) -> None:
        """Drop rows after ``last_step`` (logged by an interrupted run past its last checkpoint)."""
        for path in (self.dir / METRICS_DIR).glob("*.tsv"):
            rows = read_tsv(path)
            with open(path, "w") as fh:
                name = path.stem
                fh.write(f"step\t{name}\n")
                for step, value in rows:
                    if step <= last_step:
                        fh.write(f"{step}\t{value:.8g}\n")


def read_tsv(path: str | Path) -> list[tuple[int, float]]:
    """The ``(step, value)`` rows of a metric TSV written by :class:`MetricsLog`."""
    with open(path) as fh:
        reader = csv.reader(fh, delimiter="\t")
        next(reader, None)
        return [(int(r[0]), float(r[1])) for r in reader if r]


#: settings that change what a step computes: a checkpoint made under other values is not resumed
_RECIPE_KEYS = ("resolution", "learning_rate", "train_batch_size", "gradient_accumulation_steps", "mixed_precision",
                "seed", "proportion_empty_prompts", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2",
                "adam_weight_decay", "adam_epsilon", "max_grad_norm")


def dataset_digest(dataset_dir: str | Path) -> str:
    """The training data's identity: :func:`~pipelines.digests.tree_digest` of the dataset folder (every
    file's relative path and bytes: each split's parquet shards and the card), so other rows, another
    train/validation split or re-encoded images give another digest. It reads the whole folder once (the 100K
    set, some 40 GB: tens of seconds, against hours of training)."""
    return tree_digest(dataset_dir)


def recipe_fingerprint(s: TrainSettings, num_processes: int = 1, extra: dict | None = None) -> dict:
    """What a checkpoint must match to be resumed: the recipe, the process count, the schedule length when
    the lr schedule depends on it, and ``extra`` (e.g. the base model's revision)."""
    out: dict[str, Any] = {k: getattr(s, k) for k in _RECIPE_KEYS}
    out["num_processes"] = num_processes
    if s.lr_scheduler in ("linear", "cosine"):
        out["max_train_steps"] = s.max_train_steps
    out.update(extra or {})
    return out


def list_checkpoints(checkpoints_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those holding the step file), oldest first, as ``(step, path)``."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", p.name)
        if m and (p / STEP_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_checkpoints(checkpoints_dir: str | Path, limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``limit`` (None: keep all), and incomplete ones."""
    root = Path(checkpoints_dir)
    removed = []
    if root.is_dir():
        complete = {p for _, p in list_checkpoints(root)}
        for p in root.iterdir():
            if p.name.startswith(CHECKPOINT_PREFIX) and p not in complete and p.is_dir():
                shutil.rmtree(p)
                removed.append(p)
    if limit is not None:
        ckpts = list_checkpoints(root)
        for _, p in ckpts[:max(0, len(ckpts) - limit)]:
            shutil.rmtree(p)
            removed.append(p)
    return removed


# --- validation and card ----------------------------------------------------------------------------------


def validation_pipeline(c: Components, controlnet: Any, scheduler: str) -> Any:
    """``StableDiffusionControlNetPipeline`` over the in-memory parts and the ControlNet being trained."""
    from diffusers import StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, controlnet=controlnet,
        scheduler=make_scheduler(scheduler, c.noise_scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def validation_grid(c: Components, controlnet: Any, conditions: Sequence[Image.Image], prompts: Sequence[str],
                    seeds: Sequence[int], labels: Sequence[str] | None, s: TrainSettings,
                    weight_dtype: torch.dtype) -> Image.Image:
    """(condition | generated) rows for the fixed validation conditions, prompts and seeds; ``labels`` (one
    per row, or None) are written on the rows (see :func:`~pipelines.generation.sample_grid`)."""
    if weight_dtype != torch.float32:
        # a half copy of the ControlNet, so the whole pipeline runs in one dtype (CPU autocast leaves
        # group_norm mixed, and accelerate's fp32 output wrapper would hand fp32 residuals to the half UNet)
        half = type(controlnet).from_config(controlnet.config)
        half.load_state_dict(controlnet.state_dict())
        controlnet = half.to(c.unet.device, weight_dtype)
    pipe = validation_pipeline(c, controlnet, s.validation_scheduler)
    was_training = controlnet.training
    controlnet.eval()
    images = generate_images(pipe, conditions, prompts, seeds, s.resolution, s.validation_inference_steps,
                             s.validation_guidance_scale)
    controlnet.train(was_training)
    return sample_grid(conditions, images, len(images), min(s.resolution, GRID_CELL_MAX), labels)


def write_model_card(out_dir: str | Path, *, base_model: str, dataset: str, settings: TrainSettings, steps: int,
                     metrics: dict, standin: bool, note: str = "") -> Path:
    """``README.md`` for the saved ControlNet: front matter (base model, data, tags) + recipe + metrics."""
    out = Path(out_dir) / "README.md"
    front = {"license": "openrail++", "base_model": base_model, "datasets": [dataset], "library_name": "diffusers",
             "tags": ["controlnet", "stable-diffusion", "face-landmarks", "facecontrol"],
             "inference": False}
    recipe = "\n".join(f"| `{k}` | `{v}` |" for k, v in asdict(settings).items())
    mets = "\n".join(f"| `{k}` | {v:.6g} |" if isinstance(v, float) else f"| `{k}` | {v} |"
                     for k, v in metrics.items())
    warning = ("\n> **STAND-IN RUN.** Trained from random-weight stand-in models on the embedded sample: "
               "this model is meaningless; it only proves the pipeline runs.\n" if standin else "")
    import yaml

    text = f"""---
{yaml.safe_dump(front, sort_keys=True).strip()}
---

# Landmark ControlNet (facecontrol)
{warning}
A ControlNet for `{base_model}` conditioned on 68-point face landmark drawings, trained by the facecontrol
pipeline (`stages/train_controlnet.py`, `pipelines/training/controlnet.py`) on `{dataset}` (split `train`;
columns `image`, `conditioning_image`, `text`). {note}

Load it with diffusers:

```python
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
controlnet = ControlNetModel.from_pretrained("path/to/controlnet_landmarks")
pipe = StableDiffusionControlNetPipeline.from_pretrained("{base_model}", controlnet=controlnet)
```

## Training

Optimizer steps: **{steps}**. Target: the base scheduler's prediction type, MSE loss; ControlNet weights
in fp32, frozen parts in the mixed-precision dtype; AdamW.

| setting | value |
|---|---|
{recipe}

## Metrics (final)

| metric | value |
|---|---|
{mets}
"""
    out.write_text(text)
    return out


# --- the loop ---------------------------------------------------------------------------------------------


def _sync(accelerator: Any) -> None:
    accelerator.wait_for_everyone()


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as the GPU it stands for (the current one), so reports name it."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def check_finite(model: torch.nn.Module, step: int) -> None:
    """Raise :class:`NonFiniteTraining` when a parameter of ``model`` holds a NaN or an infinity (checked
    before every checkpoint and the final save, so none holds such weights)."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise NonFiniteTraining(f"train_controlnet: the ControlNet weight {name} is not finite after step {step}; "
                                    f"no model was written: {DIVERGED_HINT}")


def train_controlnet(settings: TrainSettings, pretrained_dir: str | Path, dataset_dir: str | Path,
                     output_dir: str | Path, checkpoints_dir: str | Path, log_dir: str | Path, *,
                     controlnet_dir: str | Path | None = None, cpu: bool = False,
                     cache_dir: str | Path | None = None, stop_after: int | None = None,
                     card: dict | None = None, identity: dict | None = None,
                     on_step: Callable[[int, Any], None] | None = None) -> dict:
    """Train (or resume) a ControlNet; returns a summary dict.

    Resumes from the newest complete checkpoint under ``checkpoints_dir`` at or before ``max_train_steps``;
    checkpoints past it (a longer earlier run) are removed, so a run never continues past its target and the
    model it saves is the one of ``max_train_steps`` steps. With ``stop_after`` the run stops after that
    optimizer step (as if interrupted: no final save), which the tests use. ``card`` (``base_model``,
    ``dataset``, ``standin``, ``note``) fills the model card. A checkpoint whose :func:`recipe_fingerprint`
    (with ``identity``, e.g. the base model's revision, and the :func:`dataset_digest` of ``dataset_dir``)
    differs from this run's is not resumed: it is discarded (with a warning), as the sharded stages discard
    shards made with other settings. ``cpu``: train on the CPU (``Accelerator(cpu=True)``); else on
    accelerate's device (in one process the current CUDA device, see ``torch.cuda.set_device``). A loss or
    gradient norm that becomes non-finite raises :class:`NonFiniteTraining` (no model is written then).
    The final model replaces ``output_dir`` whole (written beside it, then renamed).
    ``on_step(global_step, controlnet)`` is called on every process after each optimizer step (after that
    step's logging, checkpoint and validation) with the unwrapped ControlNet; a benchmark times steps with it.
    """
    import datasets
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    s = settings
    # the process-wide RNGs (python, numpy, torch) land in every checkpoint's random_states: seeded, a checkpoint
    # is the same file whenever the same run makes it (the training draws themselves use their own generators)
    seed_everything(s.seed)
    accelerator = Accelerator(mixed_precision="no" if s.mixed_precision == "fp32" else s.mixed_precision,
                              gradient_accumulation_steps=s.gradient_accumulation_steps, cpu=cpu)
    weight_dtype = _DTYPES[s.mixed_precision]
    rank, world = accelerator.process_index, accelerator.num_processes
    output_dir, checkpoints_dir, log_dir = Path(output_dir), Path(checkpoints_dir), Path(log_dir)

    c = load_components(pretrained_dir, controlnet_dir, s.seed)
    for m in (c.vae, c.unet, c.text_encoder):
        m.requires_grad_(False)
        m.to(accelerator.device, dtype=weight_dtype)
    c.controlnet.train()
    if s.gradient_checkpointing:
        c.controlnet.enable_gradient_checkpointing()
    multiple = c.vae_scale_factor * 2 ** (len(c.unet.config.block_out_channels) - 1)
    if s.resolution % multiple:
        raise ValueError(f"resolution {s.resolution} must be a multiple of {multiple} for this VAE and UNet")

    optimizer = torch.optim.AdamW(c.controlnet.parameters(), lr=s.learning_rate, betas=(s.adam_beta1, s.adam_beta2),
                                  weight_decay=s.adam_weight_decay, eps=s.adam_epsilon)
    lr_scheduler = get_scheduler(s.lr_scheduler, optimizer, num_warmup_steps=s.lr_warmup_steps * world,
                                 num_training_steps=s.max_train_steps * world)
    controlnet, optimizer, lr_scheduler = accelerator.prepare(c.controlnet, optimizer, lr_scheduler)

    train = datasets.load_dataset(str(dataset_dir), split="train", cache_dir=None if cache_dir is None else str(cache_dir))
    train = train.select_columns(["image", "conditioning_image", "text"])
    if len(train) == 0:
        raise FileNotFoundError(f"{dataset_dir} has no training rows")
    empty_ids = tokenize(c.tokenizer, [""])[0]

    metrics = MetricsLog(log_dir) if accelerator.is_main_process else None
    end = s.max_train_steps if stop_after is None else min(stop_after, s.max_train_steps)
    global_step, resumed_from, fingerprint = 0, None, None
    ckpts = list_checkpoints(checkpoints_dir)
    if ckpts or s.checkpointing_steps <= end:  # hashing the data is only needed to resume or to checkpoint
        data_id = [dataset_digest(dataset_dir) if accelerator.is_main_process else None]
        if world > 1:  # one process reads the data; all get its digest
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(data_id)
        fingerprint = json.loads(json.dumps(recipe_fingerprint(s, world, {**(identity or {}), "dataset": data_id[0]})))
    stale, past, differ = [], [], set()
    for step, path in ckpts:
        saved = json.loads((path / STEP_FILE).read_text()).get("recipe") or {}
        if saved != fingerprint:  # another recipe, base model or dataset: discarded, never mixed
            stale.append(path)
            differ |= {k for k in {*saved, *fingerprint} if saved.get(k) != fingerprint.get(k)}
        elif step > s.max_train_steps:  # made by a longer run: resuming it would go past the target
            past.append(path)
    if stale:
        log.warning("%s: checkpoints were made with another recipe (%s differ); they are discarded", checkpoints_dir,
                    ", ".join(sorted(differ)))
    if past:
        log.info("%s: checkpoints past max_train_steps %d are removed: %s", checkpoints_dir, s.max_train_steps,
                 ", ".join(p.name for p in past))
    if stale or past:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for p in stale + past:
                shutil.rmtree(p)
        accelerator.wait_for_everyone()
        ckpts = [(step, p) for step, p in ckpts if p not in stale + past]
    if ckpts:
        global_step, path = ckpts[-1]
        accelerator.load_state(str(path))
        resumed_from = str(path)
        log.info("resumed from %s (step %d)", path, global_step)
    images_dir = log_dir / IMAGES_DIR
    last = {"loss": float("nan"), "lr": lr_scheduler.get_last_lr()[0]}
    if metrics is not None:  # forget what a previous (interrupted or longer) run logged after this step
        metrics.truncate(global_step)
        if metrics.tsv("loss").is_file() and (rows := read_tsv(metrics.tsv("loss"))) and rows[-1][0] == global_step:
            last["loss"] = rows[-1][1]  # the resumed step's loss, for a run that resumes at its target
        grids = {int(png.stem.split("-")[1]): png for png in images_dir.glob("step-*.png")}
        for step in [k for k in grids if k > global_step]:
            grids.pop(step).unlink()
        latest = images_dir / "latest.png"
        if latest.is_file():  # the newest grid left, not a later step's
            latest.unlink()
            if grids:
                shutil.copyfile(grids[max(grids)], latest)

    val_rows = None
    if accelerator.is_main_process and s.num_validation_images > 0:
        vds = load_conditions(dataset_dir, "validation", s.num_validation_images, cache_dir)
        if len(vds):
            conditions, prompts = list(vds["conditioning_image"]), list(vds["text"])
            seeds = [seed_for(i, s.seed) for i in vds["id"]]
            extra = list(s.validation_extra_prompts)  # e.g. "a cat": an overfitting model draws a face anyway
            val_rows = (conditions + conditions[:1] * len(extra), prompts + extra, seeds + seeds[:1] * len(extra),
                        [""] * len(prompts) + extra if extra else None)  # the extra rows are labelled

    def validate(step: int) -> None:
        if val_rows is None:
            return
        grid = validation_grid(c, accelerator.unwrap_model(controlnet), *val_rows, s, weight_dtype)
        images_dir.mkdir(parents=True, exist_ok=True)
        grid.save(images_dir / f"step-{step}.png")
        grid.save(images_dir / "latest.png")

    loader = torch.utils.data.DataLoader(
        TransformedRows(train, make_transform(c.tokenizer, s.resolution)),
        batch_sampler=batch_stream(len(train), s.seed, s.train_batch_size, global_step * s.gradient_accumulation_steps,
                                   rank, world),
        num_workers=s.dataloader_num_workers, collate_fn=collate)
    batches = iter(loader)

    start_step, t0 = global_step, time.perf_counter()
    while global_step < end:
        losses = []
        for k in range(s.gradient_accumulation_steps):
            micro = global_step * s.gradient_accumulation_steps + k
            gen = step_generator(s.seed, micro, rank)
            batch = next(batches)
            if s.proportion_empty_prompts > 0:
                drop = torch.rand(batch["input_ids"].shape[0], generator=gen) < s.proportion_empty_prompts
                batch["input_ids"][drop] = empty_ids
            last_micro = k == s.gradient_accumulation_steps - 1
            ctx = contextlib.nullcontext() if last_micro else accelerator.no_sync(controlnet)
            with ctx:
                loss = training_loss(c, controlnet, batch, gen, weight_dtype)
                accelerator.backward(loss)  # divides by gradient_accumulation_steps itself
            losses.append(loss.detach())
        # the same value on every process (reduced; the gradients are synchronized): all stop together
        step_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
        if not math.isfinite(step_loss):
            raise NonFiniteTraining(f"train_controlnet: the loss is {step_loss} at step {global_step + 1}; "
                                    f"no model was written: {DIVERGED_HINT}")
        if s.max_grad_norm > 0:
            norm = float(accelerator.clip_grad_norm_(controlnet.parameters(), s.max_grad_norm))
            if not math.isfinite(norm) and s.mixed_precision != "fp16":  # fp16's loss scaler skips such steps
                raise NonFiniteTraining(f"train_controlnet: the gradient norm is {norm} at step {global_step + 1} "
                                        f"(loss {step_loss:.6g}); no model was written: {DIVERGED_HINT}")
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        global_step += 1

        last = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}
        if metrics is not None:
            metrics.log(global_step, last)
        if global_step % s.checkpointing_steps == 0:
            check_finite(accelerator.unwrap_model(controlnet), global_step)
            ckpt = checkpoints_dir / f"{CHECKPOINT_PREFIX}{global_step}"
            _sync(accelerator)
            accelerator.save_state(str(ckpt))
            if accelerator.is_main_process:
                (ckpt / STEP_FILE).write_text(json.dumps({"step": global_step, "recipe": fingerprint}) + "\n")
                prune_checkpoints(checkpoints_dir, s.checkpoints_total_limit)
            _sync(accelerator)
        if accelerator.is_main_process and (global_step % s.validation_steps == 0 or global_step == s.max_train_steps):
            validate(global_step)
        if on_step is not None:
            on_step(global_step, accelerator.unwrap_model(controlnet))
    seconds = time.perf_counter() - t0
    steps_done = global_step - start_step
    finished = global_step == s.max_train_steps
    if finished:
        check_finite(accelerator.unwrap_model(controlnet), global_step)
    _sync(accelerator)

    summary: dict[str, Any] = {
        "global_step": global_step, "steps_this_run": steps_done, "seconds": seconds,
        "steps_per_second": steps_done / seconds if seconds > 0 and steps_done else None,
        "resumed_from": resumed_from, "final_loss": last["loss"], "final_lr": last["lr"],
        "num_processes": world, "mixed_precision": s.mixed_precision, "device": str(_indexed(accelerator.device)),
        "train_rows": len(train), "epochs": epochs_seen(global_step, s, world, len(train)),
        "finished": finished,
        "controlnet_dtype": str(next(accelerator.unwrap_model(controlnet).parameters()).dtype).replace("torch.", ""),
        "frozen_dtype": str(c.unet.dtype).replace("torch.", ""),
    }
    if accelerator.is_main_process and finished:
        staging = output_dir.with_name(f".{output_dir.name}.partial")  # a killed run's is replaced here
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        accelerator.unwrap_model(controlnet).to(torch.float32).save_pretrained(staging, safe_serialization=True)
        rows = read_tsv(metrics.tsv("loss")) if metrics is not None and metrics.tsv("loss").is_file() else []
        tail = [v for _, v in rows[-max(1, min(100, len(rows))):]]
        card_metrics = {"steps": global_step, "final_loss": last["loss"],
                        "mean_loss_last_steps": sum(tail) / len(tail) if tail else float("nan"),
                        "first_loss": rows[0][1] if rows else float("nan")}
        summary.update(card_metrics)
        info = card or {}
        write_model_card(staging, base_model=info.get("base_model", str(pretrained_dir)),
                         dataset=info.get("dataset", str(dataset_dir)), settings=s, steps=global_step,
                         metrics=card_metrics, standin=bool(info.get("standin", False)), note=info.get("note", ""))
        if output_dir.exists():  # an older model (another step count or run): replaced whole, never mixed
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
        if metrics is not None:
            metrics.write_summary(global_step, last, {"mean_loss_last_steps": card_metrics["mean_loss_last_steps"]})
    accelerator.end_training()
    return summary
