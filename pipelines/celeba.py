"""CelebA at 64x64 with its 40 binary attributes: the dataset an attribute-conditioned DDPM trains on.

**Crop and resize** (:func:`square_resize`): each aligned 178x218 image is centre-cropped to the largest
centred square (the 178x178 square 20 px from the top) and resized to 64x64 with PIL's LANCZOS filter.
The original notebook resized 178x218 straight to 64x64, squashing every face vertically by
218/178 = 1.22; a centred square crop keeps the aspect, as the DCGAN / StyleGAN CelebA-64 preparations do.

**Attributes**: ``attributes`` holds the 40 values as 0/1 (the list file's -1 -> 0) in
:data:`~pipelines.sources.celeba.ATTRIBUTES` order. **Splits**: CelebA's official partition
(list_eval_partition.txt), kept. Pure functions of their arguments: stages read params and pass values.
"""
from __future__ import annotations

import io
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pipelines import images
from pipelines.hfdata import DatasetSchema, ParquetShardWriter, write_card
from pipelines.sources import celeba as source
from pipelines.sources.celeba import ATTRIBUTES, PARTITIONS

SPLITS = tuple(PARTITIONS.values())  # train, validation, test
PRETTY_NAME = "CelebA 64x64 with 40 attributes"
LICENSE_NOTE = ("CelebA is available for non-commercial research purposes only, per its agreement "
                "(https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html); the images are not ours to relicense.")

# Skip reasons (they appear in reports; do not rename lightly).
NO_ATTRIBUTES = "no_attributes"  # in the partition, not in the attribute list
NO_PARTITION = "no_partition"  # in the attribute list, not in the partition
SKIP_REASONS = (NO_ATTRIBUTES, NO_PARTITION, images.MISSING_IMAGE, images.CORRUPT_IMAGE,
                images.UNSUPPORTED_IMAGE_MODE)

#: The columns of the CelebA 64x64 dataset
SCHEMA = DatasetSchema(
    features=datasets.Features({
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "attributes": datasets.List(datasets.Value("uint8"), length=len(ATTRIBUTES)),
        "split": datasets.Value("string"),
    }),
    descriptions={
        "id": "the CelebA file name without its extension (`000001`).",
        "image": "the aligned face, centre-cropped to a square and resized (rule below), RGB PNG.",
        "attributes": f"{len(ATTRIBUTES)} values, 1 = the attribute holds, 0 = it does not (CelebA's -1), in the "
                      "order listed below.",
        "split": "CelebA's official partition: `train`, `validation` or `test` (the split the row is in).",
    },
)


def crop_rule(size: int = 64) -> str:
    """The card's sentence for :func:`square_resize` at ``size``."""
    return (f"centre crop to the largest centred square (178x218 -> the 178x178 square 20 px from the top), then "
            f"resize to {size}x{size} with PIL LANCZOS (aspect kept; not a straight 178x218 -> {size}x{size} squash)")


def square_resize(image: np.ndarray, size: int = 64) -> np.ndarray:
    """Centre-crop an HxWx3 uint8 image to its largest centred square, then resize to ``size`` x ``size`` (LANCZOS)."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {arr.shape} dtype {arr.dtype}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = np.ascontiguousarray(arr[top:top + side, left:left + side])
    return np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.LANCZOS))


def _png(rgb: np.ndarray) -> dict:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _card_body(report: dict, source_note: str) -> str:
    rows, skipped = report["rows"], report["skipped"]
    present = [s for s in SPLITS if rows[s]]
    varying = [a for a in ATTRIBUTES if len({report["prevalence"][s][a] for s in present}) > 1
               or any(0.0 < report["prevalence"][s][a] < 1.0 for s in present)]
    lines = [f"# {PRETTY_NAME}", "", f"Source: {source_note or 'CelebA (img_align_celeba, official lists)'}", "",
             f"License: {LICENSE_NOTE}", "",
             f"Images: {report['crop_rule']}. The original notebook resized 178x218 straight to 64x64, squashing "
             "faces by 218/178 = 1.22; the centred square keeps the aspect, as the DCGAN / StyleGAN CelebA-64 "
             "preparations do.", "",
             "## Columns", "", *SCHEMA.columns_markdown(), "",
             "## Attributes", "",
             "`attributes[i]` is 1 when attribute i holds and 0 when it does not (the list file's 1 / -1), "
             "in list_attr_celeba.txt's order:", ""]
    lines += [f"{i}. `{a}`" for i, a in enumerate(ATTRIBUTES)]
    lines += ["", "Splits: CelebA's official partition (list_eval_partition.txt: 0 `train`, 1 `validation`, "
              "2 `test`), rows sorted by file name within a split.", "",
              "## Counts", "", "| split | rows |", "|---|---|"]
    lines += [f"| {s} | {rows[s]} |" for s in SPLITS] + [f"| total | {rows['total']} |", "",
                                                          "| skipped (reason) | count |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in skipped.items()] + [f"| total | {report['skipped_total']} |", ""]
    lines += [f"`{NO_ATTRIBUTES}`: in the partition but not in the attribute list; `{NO_PARTITION}`: in the "
              "attribute list but not in the partition; the others: the image file (missing, unreadable, or with "
              "no RGB conversion).", ""]
    if present and varying:
        lines += ["## Attribute prevalence", "", "Fraction of rows with the attribute (1), per split, for the "
                  "attributes that vary in this build (the others are constant).", "",
                  "| attribute | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
        lines += [f"| `{a}` | " + " | ".join(f"{report['prevalence'][s][a]:.3f}" for s in present) + " |"
                  for a in varying]
        lines.append("")
    elif present:
        lines += ["Every attribute is constant in this build.", ""]
    lines += [images.describe_conversions(report.get("image_conversions")), "", "## License", "", LICENSE_NOTE, ""]
    return "\n".join(lines)


def build_celeba_dataset(root: str | Path, out_dir: str | Path, *, image_size: int = 64, rows_per_file: int = 1000,
                         max_per_split: int | None = None, source_note: str = "") -> dict:
    """Write the dataset (splits train / validation / test, each sorted by file name) under ``out_dir`` from the
    CelebA files under ``root`` (``root`` or ``root/celeba``, :func:`~pipelines.sources.celeba.celeba_dir`);
    return the report. ``out_dir`` is replaced. ``max_per_split`` caps the rows written per split.

    Skipped, by reason: ``no_attributes`` (in the partition only), ``no_partition`` (in the attribute list only,
    counted once), and the :mod:`pipelines.images` reason of an image that is missing, corrupt or has no RGB
    conversion. Raises ``RuntimeError`` when no row is left.
    """
    if max_per_split is not None and max_per_split < 0:
        raise ValueError(f"max_per_split must be >= 0 or None, got {max_per_split}")
    folder = source.celeba_dir(root)
    _, attrs = source.read_attributes(folder / source.ATTR_FILE)
    partition = source.read_partition(folder / source.PARTITION_FILE)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    skipped[NO_PARTITION] = sum(1 for f in attrs if f not in partition)
    conversions: Counter = Counter()
    counts, nbytes, prevalence = {}, {}, {}
    for split in SPLITS:
        files = sorted(f for f, s in partition.items() if s == split)
        total = np.zeros(len(ATTRIBUTES), dtype=np.int64)
        n = 0
        with ParquetShardWriter(out_dir, split, SCHEMA.features, rows_per_file) as writer:
            for name in tqdm(files, desc=f"celeba {split}", unit="image"):
                if max_per_split is not None and n >= max_per_split:
                    break
                values = attrs.get(name)
                if values is None:
                    skipped[NO_ATTRIBUTES] += 1
                    continue
                try:
                    rgb, note = images.read(folder / source.IMAGE_DIR / name, target=images.RGB)
                except images.ImageError as exc:
                    skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
                    continue
                if note:
                    conversions[note] += 1
                writer.write({"id": Path(name).stem, "image": _png(square_resize(rgb, image_size)),
                              "attributes": [int(v) for v in values], "split": split})
                total += values
                n += 1
        counts[split], nbytes[split] = writer.rows_written, writer.num_bytes
        prevalence[split] = {a: (float(total[i]) / n if n else None) for i, a in enumerate(ATTRIBUTES)}
    if sum(counts.values()) == 0:
        raise RuntimeError(f"no CelebA rows to write from {folder}: skipped {skipped}")
    report: dict[str, Any] = {
        "rows": {**counts, "total": sum(counts.values())},
        "skipped": skipped,
        "skipped_total": sum(skipped.values()),
        "prevalence": prevalence,
        "image_conversions": dict(sorted(conversions.items())),
        "image_size": image_size,
        "crop_rule": crop_rule(image_size),
        "attributes": list(ATTRIBUTES),
        "max_per_split": max_per_split,
        "source_note": source_note,
        "dataset_dir": out_dir.as_posix(),
    }
    splits = {s: counts[s] for s in SPLITS if counts[s]}
    write_card(out_dir, pretty_name=PRETTY_NAME, features=SCHEMA.features, splits=splits,
               split_bytes={s: nbytes[s] for s in splits}, license="other", source_datasets=[],
               task_categories=["unconditional-image-generation"], tags=["faces", "attributes"],
               body_markdown=_card_body(report, source_note))
    return report
