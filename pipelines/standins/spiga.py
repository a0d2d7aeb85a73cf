"""Stand-in for SPIGA's released 300W-public checkpoint ``spiga_300wpublic.pt``: the real architecture
(``spiga.models.spiga.SPIGA``, 68 landmarks, 13 edges) with random weights, at the real size, saved as the
released file is (a plain state dict), so :meth:`pipelines.faces.spiga.SpigaAnnotator.load` reads it strictly.

It builds the released class itself, not the annotator's device-agnostic subclass (same ``__init__``, so the
same parameters, keys and random draws; the subclass only changes the forward pass). The constants below are
facts of the released checkpoint; tests/test_spiga.py checks that they equal :mod:`pipelines.faces.spiga`'s.
This module does not import the annotator, so editing it does not re-run the fetch stages.
"""
from __future__ import annotations

from pathlib import Path

NUM_LANDMARKS = 68
NUM_EDGES = 13
WEIGHTS_FILE = "spiga_300wpublic.pt"


def build_spiga_standin(path: str | Path, seed: int = 0) -> Path:
    """Write a stand-in ``spiga_300wpublic.pt``: the real SPIGA(68, 13) architecture with random weights.

    The file is a plain ``torch.save(state_dict)`` with exactly the keys of the released checkpoint, so
    the real loading code reads it. Random init puts the face's depth (pose ``[5]``) near 0 and the 3D
    face projection explodes (non-finite landmarks), so the pose head ``pose_fc`` is tamed: its weights
    are scaled by 1e-3 and its bias set to a frontal pose at a depth that fills the crop as a real face
    box does. Outputs are then finite, inside the crop and slightly image-dependent, but they mean
    nothing; the compute is that of the real model, so throughput measured with it is honest.
    """
    import torch
    from spiga.models.spiga import SPIGA

    path = Path(path)
    torch.manual_seed(seed)
    model = SPIGA(num_landmarks=NUM_LANDMARKS, num_edges=NUM_EDGES)
    with torch.no_grad():
        model.pose_fc.weight.mul_(1e-3)
        # yaw, pitch, roll = 0 (frontal); x, y = 0 (nose tip on the crop centre); depth 4 (face ~ 1/1.6 of the crop)
        model.pose_fc.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 4.0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path
