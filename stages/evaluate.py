"""Stage evaluate: FID, KID, IS, CLIP score, prompt adherence and control fidelity of one model's generated set.

``python -m stages.evaluate --model NAME`` (one DVC stage per entry of ``generate.models``: ``evaluate@NAME``)
-> reports/metrics/<NAME>.json, so the released ControlNet and ours sit side by side (`dvc metrics show`).
Reads data/generated/<NAME>/ (images + metadata.jsonl, off_distribution.jsonl), the reference statistics of the
real validation images (data/metrics/reference, made once by the reference_stats stage), the dataset's
conditions (landmarks, head pose, captions) and the evaluation models (clean-fid's Inception, CLIP, SPIGA).
The report is small JSON in git (`dvc metrics diff` compares it across commits) and names what makes it
comparable: implementation and version, mode, feature layer, image size, counts, the reference hash, every
model's id and revision, and whether any model was a stand-in (then the numbers mean nothing).
Prompt adherence (our rule, in pipelines.metrics.clip_score.prompt_adherence): the off-distribution images'
CLIP score, and the share more similar to their own prompt than to ``off_distribution_reference_text``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pipelines.evaluation import EvaluationOptions, evaluate_generated
from pipelines.reports import provenance, read_model_manifest, write_json
from pipelines.runtime import init_runtime
from stages import config as C
from stages.annotate import AnnotateConfig
from stages.generate import OUT_ROOT, GenerateConfig, model_argument
from stages.reference_stats import ReferenceStatsConfig, output_paths

DATASET_DIR = Path("data/datasets/facesynthetics_spiga")
MODELS = Path("data/models")
BENCH_DIR = Path("reports/bench")
log = logging.getLogger("stages.evaluate")


@dataclass(frozen=True)
class EvaluateConfig:
    """The ``evaluate`` section of params.yaml."""

    kid_subsets: int
    kid_subset_size: int
    nme_failure_threshold: float
    face_detector: Literal["dlib_hog", "none"]
    face_detector_threshold: float
    face_detector_min_iou: float
    control_resolution: int
    batch_size: int
    num_workers: int
    off_distribution_reference_text: str
    is_splits: int = 10

    def validate(self, prefix: str) -> None:
        C.positive(prefix, kid_subsets=self.kid_subsets, kid_subset_size=self.kid_subset_size,
                   nme_failure_threshold=self.nme_failure_threshold, control_resolution=self.control_resolution,
                   batch_size=self.batch_size, is_splits=self.is_splits)
        if not 0 <= self.face_detector_min_iou <= 1:
            raise C.ParamError(f"{prefix}.face_detector_min_iou: must be in [0, 1], got {self.face_detector_min_iou!r}")
        if self.num_workers < 0:
            raise C.ParamError(f"{prefix}.num_workers: must be >= 0, got {self.num_workers!r}")
        if not self.off_distribution_reference_text.strip():
            raise C.ParamError(f"{prefix}.off_distribution_reference_text: must describe the training domain, got ''")


def main(argv: list[str] | None = None) -> dict:
    """Run the stage; returns the report."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = C.cli(__doc__, argv, model_argument)
    params = C.read_params(args.params)
    base, cfg = C.load(EvaluateConfig, "evaluate", params, args.profile)
    _, gen = C.load(GenerateConfig, "generate", params, args.profile)
    model = args.model
    gen.controlnet_dir(model)  # a ParamError naming the known models for an unknown name
    _, ref = C.load(ReferenceStatsConfig, "reference_stats", params, args.profile)
    _, ann = C.load(AnnotateConfig, "annotate", params, args.profile)
    runtime = init_runtime(base.device, "fp32", base.seed)
    models = [read_model_manifest(MODELS / role) for role in ("inception", "clip", "spiga")]
    npz, js = output_paths(ref.split)
    opts = EvaluationOptions(box_margin=ann.box_margin, **asdict(cfg))
    report = evaluate_generated(OUT_ROOT / model, DATASET_DIR, ref.split, npz, js,
                                MODELS / "inception", MODELS / "clip", MODELS / "spiga" / models[2].id, models, opts,
                                runtime.device)
    report["provenance"] = provenance([], runtime.describe(), {"evaluate": asdict(cfg)})
    if report["uses_standin_models"]:
        report["note"] = "STAND-IN models were used: these numbers check the pipeline and mean nothing"
    path = write_json(Path("reports/metrics") / f"{model}.json", report)
    write_json(BENCH_DIR / f"evaluate_{model}.json", {"model_name": model, "num_images": report["num_images"],
                            "images_per_second": report["throughput"], "device": str(runtime.device),
                            "batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
                            "uses_standin_models": report["uses_standin_models"],
                            "note": "per metric family: Inception features + IS logits, CLIP score, control fidelity "
                                    "(SPIGA + face detector); wall time over the generated set"})
    c, adherence = report["control"], report["prompt_adherence"] or {}
    log.info("evaluate %s: FID %.3f, KID %.5f, IS %.3f, CLIP %.2f, off-distribution prompt win rate %s, "
             "landmark NME %s, face found %s -> %s%s",
             model, report["fid"]["value"], report["kid"]["value"], report["inception_score"]["mean"],
             report["clip_score"]["value"], adherence.get("prompt_win_rate"), c["landmark_nme"]["mean"],
             c["face_detection_rate"], path,
             " (STAND-IN models)" if report["uses_standin_models"] else "")
    return report


if __name__ == "__main__":
    C.run(main)
