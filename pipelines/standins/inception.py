"""Stand-in for clean-fid's Inception TorchScript file ``inception-2015-12-05.pt``: torchvision's Inception-v3
(the real architecture and size) with random weights, wrapped in the real file's TorchScript interface, so
:func:`pipelines.metrics.fid.load_inception` and clean-fid load it exactly like the real file.

The constants below are facts of the real file (tests/test_metrics_fid.py checks that they equal
:mod:`pipelines.metrics.fid`'s); this module does not import the metric code, so editing it does not re-run
the fetch stages.
"""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INCEPTION_FILE = "inception-2015-12-05.pt"  # the file name clean-fid's loader reads
FEATURE_DIM = 2048  # pool3 features
NUM_LOGITS = 1008  # the ImageNet head of the 2015-12-05 graph


class _InceptionTorchScript(nn.Module):
    """The interface of clean-fid's ``inception-2015-12-05.pt``: ``layers`` (299 px input normalised to
    [-1, 1] -> (B, 2048, 1, 1)), ``output`` (Linear 2048 -> 1008) and
    ``forward(img, return_features, use_fp16, no_output_bias)`` that resizes any input to 299 px
    (bilinear ``grid_sample``, as the real file), normalises, and returns features or softmax probabilities."""

    def __init__(self, layers: nn.Sequential):
        super().__init__()
        self.layers = layers
        self.output = nn.Linear(FEATURE_DIM, NUM_LOGITS)

    def forward(self, img: Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> Tensor:
        batch_size, channels, height, width = img.shape
        x = img.to(torch.float16) if use_fp16 else img.to(torch.float32)
        theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
        theta[0, 2] += theta[0, 0] / width - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / height - theta[1, 1] / 299
        theta = theta.unsqueeze(0).repeat(batch_size, 1, 1)
        grid = F.affine_grid(theta, [batch_size, channels, 299, 299], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = (x - 128.0) / 128.0
        features = self.layers(x).reshape(-1, 2048).to(torch.float32)
        if return_features:
            return features
        if no_output_bias:
            logits = F.linear(features, self.output.weight)
        else:
            logits = self.output(features)
        return F.softmax(logits, dim=1)


def build_inception_standin(path: str | Path, seed: int = 0) -> Path:
    """Write a random-weight Inception-v3 as TorchScript at ``path`` (normally ``.../inception-2015-12-05.pt``).

    The blocks are torchvision's ``inception_v3(weights=None, aux_logits=False, init_weights=True)``
    (the real architecture, pool3 2048, ImageNet head 1008: 23.85 M parameters like the real file) wrapped in the real
    file's interface (:class:`_InceptionTorchScript`), so :func:`pipelines.metrics.fid.load_inception` and clean-fid load it
    exactly like the real file and it costs the same compute. Conv weights get He-normal init so
    activations stay O(1) through 94 random layers. Its features mean nothing.

    The archive is the same bytes on every machine (DVC hashes bytes): TorchScript is compiled in a fresh
    interpreter with ``PYTHONHASHSEED=0`` (its generated code lists constants in set order, which the hash seed
    changes), and :func:`reproducible_archive` drops the debug pickles (they hold this machine's source paths).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.environ.get("PYTHONHASHSEED") != "0":
        root = Path(__file__).resolve().parents[2]  # the project, importable in the child
        env = {**os.environ, "PYTHONHASHSEED": "0",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        code = "import sys; from pipelines.standins.inception import build_inception_standin as b; b(sys.argv[1], int(sys.argv[2]))"
        subprocess.run([sys.executable, "-c", code, str(path.resolve()), str(seed)], env=env, check=True)
        return path
    from torchvision.models import inception_v3

    torch.manual_seed(seed)
    tv = inception_v3(weights=None, aux_logits=False, init_weights=True)
    for m in tv.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    layers = nn.Sequential()
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                 "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                 "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
        layers.add_module(name, getattr(tv, name))
    layers.add_module("pool2", nn.AvgPool2d(kernel_size=8, stride=8))
    net = _InceptionTorchScript(layers)
    with torch.no_grad():
        net.output.weight.copy_(tv.fc.weight.new_empty(NUM_LOGITS, FEATURE_DIM).normal_(0, FEATURE_DIM ** -0.5))
        net.output.bias.zero_()
    net.eval()
    scripted = torch.jit.script(net)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(reproducible_archive(buf.getvalue()))
    tmp.replace(path)
    return path


def reproducible_archive(archive: bytes) -> bytes:
    """A TorchScript archive without its ``*.debug_pkl`` records (source ranges with absolute file paths; loading
    does not need them) and with a ``.data/serialization_id`` derived from the records kept."""
    records = []
    with zipfile.ZipFile(io.BytesIO(archive)) as src:
        for info in src.infolist():
            if not info.filename.endswith(".debug_pkl"):
                records.append((info.filename, src.read(info)))
    digest = hashlib.sha256()
    for name, data in records:
        if not name.endswith(".data/serialization_id"):
            digest.update(name.encode() + b"\0" + data)
    serialization_id = str(int(digest.hexdigest(), 16) % 10 ** 40).zfill(40).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name, data in records:
            data = serialization_id if name.endswith(".data/serialization_id") else data
            dst.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return out.getvalue()
