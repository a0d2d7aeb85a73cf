"""The ``train_controlnet`` section: read by train_controlnet and bench_train_controlnet."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar, Literal

from pipelines.training.controlnet import TrainSettings
from stages import config as C

# the validation grids also draw the fixed off-distribution prompts: one list, in the generate section
PROMPTS_KEY = "generate.off_distribution_prompts"
OVERFIT_EPOCHS = 3  # the seed: three epochs of FaceSynthetics overfit ("a cat" still gave a person)


@dataclass(frozen=True)
class TrainControlNetConfig:
    """The ``train_controlnet`` section of params.yaml (the seed is ``base.seed``, the device ``base.device``)."""

    FROM_OTHER_SECTIONS: ClassVar[dict[str, str]] = {"validation_extra_prompts": PROMPTS_KEY}

    pretrained_model: str  # a local folder written by fetch_generation_models (data/models/sd_base)
    image_column: str  # the dataset's columns (diffusers' --image_column etc.), checked against it before training
    conditioning_image_column: str
    caption_column: str  # one string per row, or a list (one drawn per sample in training, the first in validation)
    resolution: int
    learning_rate: float
    train_batch_size: int  # per process
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    mixed_precision: C.MixedPrecision
    max_train_steps: int
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    validation_steps: int
    num_validation_images: int
    validation_inference_steps: int
    validation_guidance_scale: float
    validation_scheduler: Literal["unipc", "ddim", "euler", "dpm"]
    proportion_empty_prompts: float
    dataloader_num_workers: int
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"]
    lr_warmup_steps: int
    adam_weight_decay: float
    max_grad_norm: float
    # more grid rows: these prompts on the first validation condition (generate.off_distribution_prompts)
    validation_extra_prompts: list[str] = field(default_factory=list)

    def validate(self, prefix: str = "train_controlnet") -> None:
        """Reject values that cannot work, naming the key."""
        C.positive(prefix, resolution=self.resolution, learning_rate=self.learning_rate,
                 train_batch_size=self.train_batch_size, gradient_accumulation_steps=self.gradient_accumulation_steps,
                 max_train_steps=self.max_train_steps, checkpointing_steps=self.checkpointing_steps,
                 validation_steps=self.validation_steps, validation_inference_steps=self.validation_inference_steps)
        if self.resolution % 8:
            raise C.ParamError(f"{prefix}.resolution: must be a multiple of 8, got {self.resolution}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise C.ParamError(f"{prefix}.checkpoints_total_limit: must be >= 1 or null, got {self.checkpoints_total_limit!r}")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise C.ParamError(f"{prefix}.proportion_empty_prompts: must be in [0, 1], got {self.proportion_empty_prompts!r}")
        for key in ("num_validation_images", "dataloader_num_workers", "lr_warmup_steps", "adam_weight_decay",
                    "max_grad_norm", "validation_guidance_scale"):
            if getattr(self, key) < 0:
                raise C.ParamError(f"{prefix}.{key}: must be >= 0, got {getattr(self, key)!r}")

    def settings(self, seed: int) -> TrainSettings:
        """The library's settings for this section and ``base.seed``."""
        fields = asdict(self)
        fields.pop("pretrained_model")
        fields["validation_extra_prompts"] = tuple(fields["validation_extra_prompts"])
        return TrainSettings(seed=seed, **fields)
