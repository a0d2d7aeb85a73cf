"""Stage train_controlnet: train the landmark ControlNet on data/datasets/facesynthetics_spiga (resumable).

Reads data/datasets/facesynthetics_spiga (split ``train`` for training, the first ``num_validation_images``
of ``validation`` by id for the fixed-seed validation grids) and data/models/sd_base (SD 2.1-base in the
real profile; the tiny stand-in at 64 px in the sample profile). The ControlNet starts from the base UNet
(``ControlNetModel.from_unet``). Writes:

* models/controlnet_landmarks/ - ``save_pretrained`` (config.json + diffusion_pytorch_model.safetensors),
  README.md model card, facecontrol_model.json manifest (so ``generate`` can read it like any model);
* models/controlnet_landmarks_checkpoints/checkpoint-<step>/ - accelerate states every
  ``checkpointing_steps`` (dvc ``persist: true``); at most ``checkpoints_total_limit`` kept; a rerun after
  an interruption continues from the newest;
* reports/train/controlnet_landmarks/ - DVCLive layout: metrics.json, plots/metrics/train/{loss,lr}.tsv,
  plots/images/validation/step-<k>.png + latest.png (``persist: true``, so a resumed run keeps its history).

The real profile is the recipe of the released uncannyfaces_25K: SD 2.1-base, 512 px, lr 1e-5, batch 4,
~25K steps, checkpoints and validation every 5,000. Several GPUs:
``accelerate launch --multi_gpu -m stages.train_controlnet`` (``base.launcher``).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from pipelines.model_store import tree_digest
from pipelines.reports import ModelInfo, provenance, read_model_manifest, write_json, write_model_manifest
from pipelines.standins import STANDIN_NOTE
from pipelines.training.controlnet import TrainSettings, train_controlnet
from stages.config import ParamError, cli, load, positive, read_params, run

DATASET_DIR = Path("data/datasets/facesynthetics_spiga")
OUTPUT_DIR = Path("models/controlnet_landmarks")
CHECKPOINTS_DIR = Path("models/controlnet_landmarks_checkpoints")
LOG_DIR = Path("reports/train/controlnet_landmarks")
SUMMARY_FILE = LOG_DIR / "summary.json"
EVALUATION_NOTE = ("Its evaluation beside the released multimodalart/uncannyfaces_25K (FID, KID, IS, CLIP score, "
                   "off-distribution prompt adherence, landmark NME, face detection, pose error) is the facecontrol "
                   "report reports/metrics/controlnet_landmarks.json (stage evaluate@controlnet_landmarks).")
OVERFIT_EPOCHS = 3  # the seed: three epochs of FaceSynthetics overfit ("a cat" still gave a person)
log = logging.getLogger("stages.train_controlnet")


@dataclass(frozen=True)
class TrainControlNetConfig:
    """The ``train_controlnet`` section of params.yaml (the seed is ``base.seed``, the device ``base.device``)."""

    pretrained_model: str  # a local folder written by fetch_generation_models (data/models/sd_base)
    resolution: int
    learning_rate: float
    train_batch_size: int  # per process
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    mixed_precision: Literal["no", "fp16", "bf16"]
    max_train_steps: int
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    validation_steps: int
    num_validation_images: int
    validation_extra_prompts: list[str]  # more grid rows: these prompts on the first validation condition
    validation_inference_steps: int
    validation_guidance_scale: float
    validation_scheduler: Literal["unipc", "ddim", "euler", "dpm"]
    proportion_empty_prompts: float
    dataloader_num_workers: int
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"]
    lr_warmup_steps: int
    adam_weight_decay: float
    max_grad_norm: float

    def validate(self, prefix: str = "train_controlnet") -> None:
        """Reject values that cannot work, naming the key."""
        positive(prefix, resolution=self.resolution, learning_rate=self.learning_rate,
                 train_batch_size=self.train_batch_size, gradient_accumulation_steps=self.gradient_accumulation_steps,
                 max_train_steps=self.max_train_steps, checkpointing_steps=self.checkpointing_steps,
                 validation_steps=self.validation_steps, validation_inference_steps=self.validation_inference_steps)
        if self.resolution % 8:
            raise ParamError(f"{prefix}.resolution: must be a multiple of 8, got {self.resolution}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ParamError(f"{prefix}.checkpoints_total_limit: must be >= 1 or null, got {self.checkpoints_total_limit!r}")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise ParamError(f"{prefix}.proportion_empty_prompts: must be in [0, 1], got {self.proportion_empty_prompts!r}")
        for key in ("num_validation_images", "dataloader_num_workers", "lr_warmup_steps", "adam_weight_decay",
                    "max_grad_norm", "validation_guidance_scale"):
            if getattr(self, key) < 0:
                raise ParamError(f"{prefix}.{key}: must be >= 0, got {getattr(self, key)!r}")

    def settings(self, seed: int) -> TrainSettings:
        """The library's settings for this section and ``base.seed``."""
        fields = asdict(self)
        fields.pop("pretrained_model")
        fields["validation_extra_prompts"] = tuple(fields["validation_extra_prompts"])
        return TrainSettings(seed=seed, **fields)


def trains_on_cpu(device: str, stage: str) -> bool:
    """Whether the training loop will run on the CPU for ``base.device`` (``cpu``, or ``auto`` without CUDA);
    a :class:`ParamError` names ``stage`` for a device accelerate cannot train on."""
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ParamError(f"base.device: {device!r}: {stage} runs on cpu or cuda (via accelerate)")
    return device == "cpu" or not torch.cuda.is_available()


def main(argv: list[str] | None = None) -> dict:
    """Run (or resume) the training; returns the summary written to ``summary.json``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = cli(__doc__, argv)
    base, cfg = load(TrainControlNetConfig, "train_controlnet", read_params(args.params), args.profile)
    sd_dir = Path(cfg.pretrained_model)
    sd_info = read_model_manifest(sd_dir)
    if not (DATASET_DIR / "data").is_dir():
        raise FileNotFoundError(f"{DATASET_DIR} holds no dataset (no data/ folder): run the assemble stage first")
    if cfg.mixed_precision == "fp16" and trains_on_cpu(base.device, "train_controlnet"):
        raise ParamError("train_controlnet.mixed_precision: fp16 needs a CUDA GPU (accelerate autocasts no fp16 on the "
                         "CPU, and the half frozen parts would meet the fp32 ControlNet); use bf16 or no on the CPU")
    settings = cfg.settings(base.seed)
    note = f"STAND-IN base model ({STANDIN_NOTE})." if sd_info.standin else ""
    summary = train_controlnet(settings, sd_dir, DATASET_DIR, OUTPUT_DIR, CHECKPOINTS_DIR, LOG_DIR,
                               cpu=base.device == "cpu", identity={"base_model_revision": sd_info.revision},
                               card={"base_model": sd_info.id, "dataset": "facesynthetics_spiga",
                                     "standin": sd_info.standin, "note": f"{note} {EVALUATION_NOTE}".strip()})
    if not summary.get("finished") or not (OUTPUT_DIR / "config.json").is_file():
        return summary  # a non-main process, or stopped early
    info = ModelInfo(name="controlnet", id="facecontrol/controlnet_landmarks", revision=tree_digest(OUTPUT_DIR),
                     source=f"trained by stages.train_controlnet from {sd_info.id} on {DATASET_DIR}",
                     standin=sd_info.standin, note=note)
    write_model_manifest(OUTPUT_DIR, info)
    if summary["epochs"] > OVERFIT_EPOCHS:
        log.warning("train_controlnet: %d steps = %.1f epochs of %d training rows; the seed's model overfit at %d "
                    "epochs (prompts ignored): check the off-distribution prompt win rate",
                    summary["global_step"], summary["epochs"], summary["train_rows"], OVERFIT_EPOCHS)
    summary = {**summary, "note": note, **provenance([sd_info], {"device": summary["device"]}, asdict(cfg))}
    write_json(SUMMARY_FILE, summary)
    log.info("train_controlnet: %d steps (%s steps/s this run), model in %s%s", summary["global_step"],
             f"{summary['steps_per_second']:.3f}" if summary["steps_per_second"] else "n/a", OUTPUT_DIR,
             f" ({note})" if note else "")
    return summary


if __name__ == "__main__":
    run(main)
