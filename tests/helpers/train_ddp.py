"""Run ``train_controlnet`` under torchrun on the CPU (gloo) for tests/test_train_multiprocess.py.

Usage: ``torchrun --nproc_per_node 2 tests/helpers/train_ddp.py SD_DIR DATASET_DIR ROOT SETTINGS_JSON``.
Writes ``ROOT/out``, ``ROOT/ckpt``, ``ROOT/logs`` (the training's), and per rank ``ROOT/summary-<rank>.json``
(the returned summary) and ``ROOT/digest-<rank>.txt`` (:func:`state_digest` of the ControlNet after the
last step, taken by the ``on_step`` hook).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any


def state_digest(model: Any) -> str:
    """sha256 of a module's state_dict tensors' bytes, in key order."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(sd_dir: str, dataset_dir: str, root: str, settings_json: str) -> None:
    from pipelines.training.controlnet import TrainSettings, train_controlnet

    settings = TrainSettings(**json.loads(settings_json))
    out, rank = Path(root), int(os.environ["RANK"])

    def on_step(step: int, controlnet: Any) -> None:
        if step == settings.max_train_steps:
            (out / f"digest-{rank}.txt").write_text(state_digest(controlnet))

    summary = train_controlnet(settings, sd_dir, dataset_dir, out / "out", out / "ckpt", out / "logs", cpu=True,
                               cache_dir=out / "hf_cache", on_step=on_step)
    (out / f"summary-{rank}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(*sys.argv[1:])
