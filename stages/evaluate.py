"""Stage evaluate: FID, KID, IS, CLIP score, prompt adherence and control fidelity of one model's generated set.

``python -m stages.evaluate --model NAME`` (one DVC stage per entry of ``controlnets``: ``evaluate@NAME``)
-> reports/metrics/<NAME>.json, so the released ControlNet and ours sit side by side (`dvc metrics show`), its
details in reports/metrics/<NAME>.provenance.json, and reports/bench/evaluate_<NAME>.json (images/s, with its
.provenance.json).
Reads data/generated/<NAME>/ (images + metadata.jsonl, off_distribution.jsonl), the reference statistics of the
real validation images (data/metrics/reference, made once by the reference_stats stage), the dataset's
conditions (landmarks, head pose, captions) and the evaluation models (clean-fid's Inception, CLIP, SPIGA).
The metrics file is small JSON in git (`dvc metrics diff` compares it across commits): the numbers, counts and
whether any model was a stand-in (then the numbers mean nothing); what makes them comparable (implementation
and version, mode, feature layer, image size, the reference hash, every model's id and revision, packages,
params) is in the .provenance.json beside it.
Prompt adherence (our rule, in pipelines.metrics.clip_score.prompt_adherence): the off-distribution images'
CLIP score, and the share more similar to their own prompt than to ``off_distribution_reference_text``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pipelines.evaluation import REPORT_METRICS, EvaluationOptions, evaluate_generated
from pipelines.metrics.fid import reference_paths
from pipelines.reports import provenance, read_model_manifest, split_report, write_report
from pipelines.runtime import init_runtime
from stages import config as C

# the params keys this stage reads (dvc.yaml lists the same: tests/test_dvc_deps.py): the reference split, and the
# face box margin of the annotator it re-detects landmarks with
PARAMS = ("base.profile", "base.seed", "base.device", "evaluate", "reference_stats.split", "annotate.box_margin")

DATASET_DIR = Path("data/datasets/facesynthetics_spiga")
MODELS = Path("data/models")
GENERATED = Path("data/generated")
REFERENCE_DIR = Path("data/metrics/reference")
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
    args = C.cli(__doc__, argv, C.model_argument)
    params = C.read_params(args.params, PARAMS)
    base, cfg = C.load(EvaluateConfig, "evaluate", params, args.profile)
    model = args.model
    if not (GENERATED / model).is_dir():
        raise FileNotFoundError(f"{GENERATED / model} is missing: run generate@{model} first (dvc repro evaluate@{model})")
    split = C.value(params, "reference_stats.split", base.profile)
    box_margin = C.value(params, "annotate.box_margin", base.profile)
    runtime = init_runtime(base.device, "fp32", base.seed)
    models = [read_model_manifest(MODELS / role) for role in ("inception", "clip", "spiga")]
    npz, js = reference_paths(REFERENCE_DIR, DATASET_DIR.name, split)
    opts = EvaluationOptions(box_margin=box_margin, **asdict(cfg))
    report = evaluate_generated(GENERATED / model, DATASET_DIR, split, npz, js,
                                MODELS / "inception", MODELS / "clip", MODELS / "spiga" / models[2].id, models, opts,
                                runtime.device)
    block = provenance([], runtime.describe(), {"evaluate": asdict(cfg)})  # report["models"] has every model
    report.update(packages=block["packages"], runtime=block["runtime"], params=block["params"])
    if report["uses_standin_models"]:
        report["note"] = "STAND-IN models were used: these numbers check the pipeline and mean nothing"
    path, _ = write_report(Path("reports/metrics") / f"{model}.json",
                           *split_report({k: v for k, v in report.items() if k != "throughput"}, REPORT_METRICS))
    write_report(BENCH_DIR / f"evaluate_{model}.json",
                 {"num_images": report["num_images"], "images_per_second": report["throughput"],
                  "batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
                  "uses_standin_models": report["uses_standin_models"]},
                 {"model_name": model, "device": str(runtime.device), "runtime": block["runtime"],
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
