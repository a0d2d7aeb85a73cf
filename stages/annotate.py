"""Stage ``annotate``: SPIGA 68-point landmarks and head pose for every FaceSynthetics face.

Inputs: ``data/raw/facesynthetics`` and ``data/models/spiga``. Output: parquet shards under
``data/interim/facesynthetics/annotations/`` (resumable: a killed run keeps its whole shards) and a
``summary.json`` beside them. The face box is the original rule (the sample's own 70 landmarks, grown by
``box_margin``); a box mostly off the image is skipped as ``box_off_image``. Works under
``accelerate launch`` (each process does its shards; the main process writes the summary).
"""
from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from pipelines.faces.boxes import box_inside_fraction, face_box_from_landmarks
from pipelines.faces.spiga import SpigaAnnotator, crop_face
from pipelines.reports import read_model_manifest, write_json
from pipelines.runtime import init_runtime
from pipelines.shards import Failure, ShardedMap, read_shards, to_tensor_batch
from pipelines.sources.facesynthetics import (
    BOX_OFF_IMAGE,
    FaceSample,
    SampleError,
    list_samples,
    read_image,
    read_landmarks,
)
from stages import config

log = logging.getLogger("stages.annotate")

RAW_DIR = Path("data/raw/facesynthetics")
MODEL_DIR = Path("data/models/spiga")
OUT_DIR = Path("data/interim/facesynthetics/annotations")
SUMMARY = "summary.json"
NONFINITE_OUTPUT = "nonfinite_output"

RESULT_SCHEMA = pa.schema([
    pa.field("landmarks", pa.list_(pa.list_(pa.float32()))),  # 68 x 2, image pixels
    pa.field("headpose", pa.list_(pa.float32())),  # yaw, pitch, roll (deg, SPIGA convention), tx, ty, tz
    pa.field("face_box", pa.list_(pa.float32())),  # x, y, w, h
    pa.field("source_landmarks", pa.list_(pa.list_(pa.float32()))),  # 70 x 2, the sample's own
])


@dataclass(frozen=True)
class AnnotateConfig:
    """The ``annotate`` section of params.yaml."""

    box_margin: float  # px added on every side of the landmarks' min/max box
    min_box_inside: float  # skip a face whose box has less than this share of its area inside the image
    precision: Literal["auto", "fp32", "fp16", "bf16"]
    batch_size: int
    num_workers: int
    shard_size: int

    def validate(self, prefix: str) -> None:
        """Reject values that cannot work, naming the key."""
        config.positive(prefix, batch_size=self.batch_size, shard_size=self.shard_size)
        if self.num_workers < 0:
            raise config.ParamError(f"{prefix}.num_workers: must be >= 0, got {self.num_workers!r}")
        if self.box_margin < 0:
            raise config.ParamError(f"{prefix}.box_margin: must be >= 0, got {self.box_margin!r}")
        if not 0 < self.min_box_inside <= 1:
            raise config.ParamError(f"{prefix}.min_box_inside: must be in (0, 1], got {self.min_box_inside!r}")


def load(sample: FaceSample, image_size: int, box_margin: float, min_box_inside: float) -> dict | Failure:
    """Read one sample and cut SPIGA's crop (runs in DataLoader workers; bad samples become Failures)."""
    try:
        image = read_image(sample.image_path, size=image_size)
        source = read_landmarks(sample.landmarks_path)
    except SampleError as exc:
        return Failure(exc.reason, exc.detail)
    box = face_box_from_landmarks(source, margin=box_margin)
    inside = box_inside_fraction(box, image.shape[1], image.shape[0])
    if inside < min_box_inside:
        return Failure(BOX_OFF_IMAGE, f"{inside:.2f} of the box inside the image (< {min_box_inside})")
    crop, crop_box = crop_face(image, box)
    return {"crop": crop, "crop_box": crop_box, "face_box": box, "source_landmarks": source}


def make_infer(annotator: SpigaAnnotator):
    """The batch function for :class:`ShardedMap`: one SPIGA forward per batch."""

    def infer(batch: list[dict]) -> list[dict | Failure]:
        crops = to_tensor_batch([s["crop"] for s in batch])
        landmarks, pose = annotator.predict(crops, np.stack([s["crop_box"] for s in batch]),
                                            np.stack([s["face_box"] for s in batch]))
        out: list[dict | Failure] = []
        for s, ldm, hp in zip(batch, landmarks, pose, strict=True):
            if not (np.isfinite(ldm).all() and np.isfinite(hp).all()):
                out.append(Failure(NONFINITE_OUTPUT, "SPIGA returned NaN or inf"))
                continue
            out.append({"landmarks": ldm.astype(np.float32).tolist(), "headpose": hp.astype(np.float32).tolist(),
                        "face_box": np.asarray(s["face_box"], dtype=np.float32).tolist(),
                        "source_landmarks": np.asarray(s["source_landmarks"], dtype=np.float32).tolist()})
        return out

    return infer


def count_rows(out_dir: Path) -> dict:
    """Rows ok and failed (by reason) over all shards of ``out_dir``."""
    table = read_shards(out_dir)
    ok = table.column("ok").to_pylist() if table.num_rows else []
    errors = table.column("error").to_pylist() if table.num_rows else []
    failed = Counter(e for good, e in zip(ok, errors, strict=True) if not good)
    return {"rows": len(ok), "ok": sum(ok), "failed": sum(failed.values()), "failed_by_reason": dict(sorted(failed.items()))}


def main(argv: list[str] | None = None) -> dict | None:
    """Run the stage; return the summary (main process) or None (other processes)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = config.cli(__doc__.splitlines()[0], argv)
    base, cfg = config.load(AnnotateConfig, "annotate", params=config.read_params(args.params), profile=args.profile)
    runtime = init_runtime(base.device, cfg.precision, base.seed)

    samples = list_samples(RAW_DIR)
    info = read_model_manifest(MODEL_DIR)
    weights = MODEL_DIR / info.id
    annotator = SpigaAnnotator.load(weights, runtime.device, runtime.precision)
    run_config = {"model": {"id": info.id, "revision": info.revision}, "precision": runtime.precision,
                  "box_margin": cfg.box_margin, "min_box_inside": cfg.min_box_inside, "image_size": base.image_size}

    mapper = ShardedMap(OUT_DIR, RESULT_SCHEMA, shard_size=cfg.shard_size)
    result = mapper.run(
        samples, [s.id for s in samples],
        functools.partial(load, image_size=base.image_size, box_margin=cfg.box_margin, min_box_inside=cfg.min_box_inside),
        make_infer(annotator), run_config, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
        process_index=runtime.process_index, num_processes=runtime.num_processes, desc="annotate",
        wait=runtime.wait_for_everyone,
    )
    if not runtime.is_main_process:
        return None
    summary = {
        "model": info.to_dict(),
        "uses_standin_model": info.standin,
        "runtime": runtime.describe(),
        "config": {**asdict(cfg), "image_size": base.image_size},
        "counts": count_rows(OUT_DIR),
        "this_run": {"items_processed": result.items_processed, "items_per_second": result.items_per_second,
                     "seconds": result.seconds, "shards_reused": result.shards_reused, "num_shards": result.num_shards,
                     "process": "main process only" if runtime.num_processes > 1 else "all"},
    }
    write_json(OUT_DIR / SUMMARY, summary)
    c = summary["counts"]
    log.info("annotate: %d rows, %d ok, %d failed %s; this run %d items%s, %d shards reused%s", c["rows"], c["ok"],
             c["failed"], c["failed_by_reason"], result.items_processed,
             f" at {result.items_per_second:.2f}/s" if result.items_per_second else "", result.shards_reused,
             " (STAND-IN SPIGA: random weights, landmarks mean nothing)" if info.standin else "")
    return summary


if __name__ == "__main__":
    main()
