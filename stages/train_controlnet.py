"""Stage train_controlnet: train the landmark ControlNet on data/datasets/facesynthetics_spiga (resumable).

Reads data/datasets/facesynthetics_spiga (split ``train`` for training, the first ``num_validation_images``
of ``validation`` by id for the fixed-seed validation grids) and data/models/sd_base (SD 2.1-base in the
real profile; the tiny stand-in at 64 px in the sample profile). The ControlNet starts from the base UNet
(``ControlNetModel.from_unet``). Writes:

* models/controlnet_landmarks/ - ``save_pretrained`` (config.json + diffusion_pytorch_model.safetensors),
  README.md model card, facecontrol_model.json manifest (so ``generate`` can read it like any model);
* models/controlnet_landmarks_checkpoints/checkpoint-<step>/ - accelerate states every
  ``checkpointing_steps`` (dvc ``persist: true``), each with the ControlNet of that step in ``controlnet/``
  (``ControlNetModel.from_pretrained`` loads it, so an evaluation can compare steps); at most
  ``checkpoints_total_limit`` kept; a rerun after an interruption continues from the newest;
* reports/train/controlnet_landmarks/ - DVCLive layout: metrics.json, plots/metrics/train/{loss,lr}.tsv,
  plots/images/validation/step-<k>.png + latest.png (``persist: true``, so a resumed run keeps its history);
  summary.json (the run's numbers: steps, losses, steps/s, epochs) and summary.provenance.json (resumed_from,
  dtypes, device, models, packages, params).

The real profile is the recipe of the released uncannyfaces_25K: SD 2.1-base, 512 px, lr 1e-5, batch 4,
~25K steps, checkpoints and validation every 5,000. Several GPUs:
``accelerate launch --multi_gpu -m stages.train_controlnet`` (``base.launcher``).
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from pipelines.digests import tree_digest
from pipelines.reports import (
    ModelInfo,
    provenance,
    read_model_manifest,
    split_report,
    write_model_manifest,
    write_report,
)
from pipelines.standins import STANDIN_NOTE
from pipelines.training.controlnet import train_controlnet
from stages.config import cli, load, read_params, run, training_device
from stages.schemas.train_controlnet import (
    OVERFIT_EPOCHS,
    PROMPTS_KEY,
    TrainControlNetConfig,
)

# the params keys this stage reads (dvc.yaml lists the same: tests/test_dvc_deps.py)
PARAMS = ("base.profile", "base.seed", "base.device", "train_controlnet", PROMPTS_KEY)

DATASET_DIR = Path("data/datasets/facesynthetics_spiga")
OUTPUT_DIR = Path("models/controlnet_landmarks")
CHECKPOINTS_DIR = Path("models/controlnet_landmarks_checkpoints")
LOG_DIR = Path("reports/train/controlnet_landmarks")
SUMMARY_FILE = LOG_DIR / "summary.json"  # numbers only; resumed_from, dtypes, models, params: summary.provenance.json
SUMMARY_METRICS = ("global_step", "steps_this_run", "seconds", "steps_per_second", "final_loss", "final_lr",
                   "first_loss", "mean_loss_last_steps", "epochs", "train_rows", "num_processes", "finished",
                   "uses_standin_models")
EVALUATION_NOTE = ("Its evaluation beside the released multimodalart/uncannyfaces_25K (FID, KID, IS, CLIP score, "
                   "off-distribution prompt adherence, landmark NME, face detection, pose error) is the facecontrol "
                   "report reports/metrics/controlnet_landmarks.json (stage evaluate@controlnet_landmarks).")
log = logging.getLogger("stages.train_controlnet")


def main(argv: list[str] | None = None) -> dict:
    """Run (or resume) the training; returns the summary written to ``summary.json``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = cli(__doc__, argv)
    params = read_params(args.params, PARAMS)
    base, cfg = load(TrainControlNetConfig, "train_controlnet", params, args.profile)  # fp16 on the CPU refused
    device = training_device(base.device, "train_controlnet")
    sd_dir = Path(cfg.pretrained_model)
    sd_info = read_model_manifest(sd_dir)
    if not (DATASET_DIR / "data").is_dir():
        raise FileNotFoundError(f"{DATASET_DIR} holds no dataset (no data/ folder): run the assemble stage first")
    settings = cfg.settings(base.seed)
    note = f"STAND-IN base model ({STANDIN_NOTE})." if sd_info.standin else ""
    summary = train_controlnet(settings, sd_dir, DATASET_DIR, OUTPUT_DIR, CHECKPOINTS_DIR, LOG_DIR,
                               cpu=device.type == "cpu", identity={"base_model_revision": sd_info.revision},
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
    write_report(SUMMARY_FILE, *split_report(summary, [k for k in SUMMARY_METRICS if k in summary]))
    log.info("train_controlnet: %d steps (%s steps/s this run), model in %s%s", summary["global_step"],
             f"{summary['steps_per_second']:.3f}" if summary["steps_per_second"] else "n/a", OUTPUT_DIR,
             f" ({note})" if note else "")
    return summary


if __name__ == "__main__":
    run(main)
