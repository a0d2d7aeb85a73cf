"""Stage train_ddpm: one attribute-conditioned (or unconditional) face DDPM on data/datasets/celeba (resumable).

``--run NAME --conditioning KIND``: dvc.yaml runs one stage per entry of ``ddpm_runs`` in params.yaml (name ->
conditioning: ``input_channels``, the seed's Linear + extra input channels; ``timestep_embedding``, the
condition added to the timestep embedding; ``none``, the same network unconditioned, the seed's
comparison). Every run shares the ``train_ddpm`` recipe (the seed's: UNet2DModel channels (32, 32, 32, 64),
DDPM 1,000 steps, cosine schedule, MSE on the noise, Adam lr 1e-3, batch 128) and trains classifier-free
guidance for real: a share ``condition_dropout`` of rows gets the null condition (zeros, the presence flag
included, so it differs from "every attribute 0"). Writes:

* models/ddpm/<NAME>/ - the network and its training scheduler (``pipelines.ddpm.load_model`` reads them),
  README.md model card, facecontrol_model.json manifest;
* models/ddpm_checkpoints/<NAME>/checkpoint-<step>/ - accelerate states (dvc ``persist: true``), at most
  ``checkpoints_total_limit`` kept; a rerun after an interruption continues from the newest;
* reports/train/ddpm/<NAME>/ - DVCLive layout: metrics.json, plots/metrics/train/{loss,lr,null_share}.tsv,
  plots/images/validation/step-<k>.png (validation attribute vectors x guidance scales); summary.json and
  summary.provenance.json.

The sample profile trains the seed's network at 32 px for a few steps on the rendered faces: it proves the
pipeline and learns little. Several GPUs:
``accelerate launch --multi_gpu -m stages.train_ddpm --run NAME --conditioning KIND``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from pathlib import Path
from typing import Literal

from pipelines.ddpm import CONDITIONINGS, SAMPLERS
from pipelines.digests import tree_digest
from pipelines.reports import ModelInfo, provenance, split_report, write_model_manifest, write_report
from pipelines.sources.celeba import ATTRIBUTES
from pipelines.training.ddpm import DDPMSettings, attribute_indices, train_ddpm
from stages import config as C

# the params keys this stage reads (dvc.yaml lists the same: tests/test_dvc_deps.py)
PARAMS = ("base.profile", "base.seed", "base.device", "train_ddpm")

DATASET_DIR = Path("data/datasets/celeba")
MODELS_DIR = Path("models/ddpm")
CHECKPOINTS_DIR = Path("models/ddpm_checkpoints")
LOG_DIR = Path("reports/train/ddpm")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SUMMARY_METRICS = ("global_step", "steps_this_run", "seconds", "steps_per_second", "final_loss", "final_lr",
                   "first_loss", "mean_loss_last_steps", "epochs", "train_rows", "num_processes", "finished",
                   "null_share", "uses_standin_models")
log = logging.getLogger("stages.train_ddpm")


@dataclasses.dataclass(frozen=True)
class TrainDDPMConfig:
    """The ``train_ddpm`` section of params.yaml (the seed is ``base.seed``, the device ``base.device``)."""

    resolution: int
    block_out_channels: list[int]
    attention_levels: int
    condition_channels: int
    condition_dropout: float
    num_train_timesteps: int
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"]
    attributes: list[str]  # [] = all 40, in CelebA's order
    learning_rate: float
    train_batch_size: int  # per process
    gradient_accumulation_steps: int
    mixed_precision: C.MixedPrecision
    max_train_steps: int
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    validation_steps: int
    num_validation_images: int
    validation_inference_steps: int
    validation_sampler: Literal["ddpm", "ddim", "dpm"]
    validation_guidance_scales: list[float]
    dataloader_num_workers: int
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"]
    lr_warmup_steps: int
    adam_weight_decay: float
    max_grad_norm: float

    def validate(self, prefix: str = "train_ddpm") -> None:
        """Reject values that cannot work, naming the key."""
        C.positive(prefix, resolution=self.resolution, learning_rate=self.learning_rate,
                   train_batch_size=self.train_batch_size, gradient_accumulation_steps=self.gradient_accumulation_steps,
                   max_train_steps=self.max_train_steps, checkpointing_steps=self.checkpointing_steps,
                   validation_steps=self.validation_steps, validation_inference_steps=self.validation_inference_steps,
                   condition_channels=self.condition_channels, num_train_timesteps=self.num_train_timesteps)
        C.non_negative(prefix, num_validation_images=self.num_validation_images, lr_warmup_steps=self.lr_warmup_steps,
                       dataloader_num_workers=self.dataloader_num_workers, adam_weight_decay=self.adam_weight_decay,
                       max_grad_norm=self.max_grad_norm, attention_levels=self.attention_levels)
        levels = len(self.block_out_channels)
        if levels < 1 or any(c < 1 for c in self.block_out_channels):
            raise C.ParamError(f"{prefix}.block_out_channels: positive channel counts, got {self.block_out_channels!r}")
        if self.resolution % 2 ** (levels - 1):
            raise C.ParamError(f"{prefix}.resolution: {self.resolution} is not divisible by 2^{levels - 1} "
                               f"({levels} levels of block_out_channels)")
        groups = min(32, min(self.block_out_channels))
        if any(c % groups for c in self.block_out_channels):
            raise C.ParamError(f"{prefix}.block_out_channels: every count must be a multiple of {groups} "
                               f"(GroupNorm groups), got {self.block_out_channels!r}")
        if self.attention_levels > levels:
            raise C.ParamError(f"{prefix}.attention_levels: {self.attention_levels} is more than the {levels} levels")
        if not 0.0 <= self.condition_dropout <= 1.0:
            raise C.ParamError(f"{prefix}.condition_dropout: must be in [0, 1], got {self.condition_dropout!r}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise C.ParamError(f"{prefix}.checkpoints_total_limit: must be >= 1 or null, "
                               f"got {self.checkpoints_total_limit!r}")
        try:
            attribute_indices(ATTRIBUTES, self.attributes)
        except ValueError as exc:
            raise C.ParamError(f"{prefix}.attributes: {exc}") from None
        if self.validation_sampler not in SAMPLERS:
            raise C.ParamError(f"{prefix}.validation_sampler: one of {', '.join(SAMPLERS)}")

    def settings(self, seed: int, conditioning: str) -> DDPMSettings:
        """The library's settings for this section, ``base.seed`` and the run's conditioning."""
        fields = dataclasses.asdict(self)
        for key in ("block_out_channels", "attributes", "validation_guidance_scales"):
            fields[key] = tuple(fields[key])
        return DDPMSettings(seed=seed, conditioning=conditioning, **fields)


def run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--run NAME --conditioning KIND``: one entry of ``ddpm_runs`` in params.yaml."""
    parser.add_argument("--run", required=True, metavar="NAME", help="the run's name (a key of ddpm_runs)")
    parser.add_argument("--conditioning", required=True, choices=CONDITIONINGS,
                        help="how the attributes reach the network (the value of ddpm_runs.NAME)")


def main(argv: list[str] | None = None) -> dict:
    """Run (or resume) one training run; returns the summary written to ``summary.json``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = C.cli(__doc__, argv, run_arguments)
    if not RUN_NAME.fullmatch(args.run):
        raise C.ParamError(f"--run: {args.run!r} must be a plain folder name (letters, digits, '.', '_', '-')")
    base, cfg = C.load(TrainDDPMConfig, "train_ddpm", C.read_params(args.params, PARAMS), args.profile)
    C.check_precision("train_ddpm.mixed_precision", cfg.mixed_precision, base.device)
    device = C.training_device(base.device, "train_ddpm")
    if not (DATASET_DIR / "data").is_dir():
        raise FileNotFoundError(f"{DATASET_DIR} holds no dataset (no data/ folder): run the celeba stage first")
    sample_data = base.profile == "sample"
    out_dir, log_dir = MODELS_DIR / args.run, LOG_DIR / args.run
    settings = cfg.settings(base.seed, args.conditioning)
    summary = train_ddpm(settings, DATASET_DIR, ATTRIBUTES, out_dir, CHECKPOINTS_DIR / args.run, log_dir,
                         cpu=device.type == "cpu",
                         card={"dataset": "celeba (64x64, facecontrol)", "standin_data": sample_data,
                               "note": "Evaluated beside the other runs by the evaluate_ddpm stage."})
    if not summary.get("finished") or not (out_dir / "config.json").is_file():
        return summary  # a non-main process, or stopped early
    note = "trained on faces rendered by code (the offline sample), not CelebA" if sample_data else ""
    info = ModelInfo(name="ddpm", id=f"facecontrol/ddpm/{args.run}", revision=tree_digest(out_dir),
                     source=f"trained by stages.train_ddpm ({args.conditioning}) on {DATASET_DIR}",
                     standin=False, note=note)
    write_model_manifest(out_dir, info)
    null_share = mean_logged(log_dir, "null_share")  # over every step: the measured dropout rate
    summary = {**summary, "null_share": null_share, "conditioning": args.conditioning, "note": note,
               "uses_standin_models": False,
               **provenance([], {"device": summary["device"]}, {"run": args.run, **dataclasses.asdict(cfg)})}
    write_report(log_dir / "summary.json", *split_report(summary, [k for k in SUMMARY_METRICS if k in summary]))
    log.info("train_ddpm %s: %d steps (%s steps/s this run), model in %s", args.run, summary["global_step"],
             f"{summary['steps_per_second']:.3f}" if summary["steps_per_second"] else "n/a", out_dir)
    return summary


def mean_logged(log_dir: Path, name: str) -> float | None:
    """The mean of metric ``name`` over every logged step (None when none was logged)."""
    from pipelines.training.loop import MetricsLog, read_tsv

    path = MetricsLog(log_dir).tsv(name)
    rows = read_tsv(path) if path.is_file() else []
    return sum(v for _, v in rows) / len(rows) if rows else None


if __name__ == "__main__":
    C.run(main)
