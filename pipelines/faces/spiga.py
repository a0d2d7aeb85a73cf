"""SPIGA (Prados-Torreblanca et al., BMVC 2022) 68-point landmarks and head pose, batched and device-aware.

The released ``spiga.inference.framework.SPIGAFramework`` hard-codes ``.cuda()``, runs one image at a
time and downloads its weights on construction. This module keeps the released model
(``spiga.models.spiga.SPIGA``) and reproduces its pre- and post-processing exactly, but:

* :func:`crop_face` is pure numpy/PIL (runs in ``DataLoader`` workers) and bit-identical to
  ``spiga.inference.pretreatment.get_transformers``;
* :class:`SpigaAnnotator` loads a local weights file and runs any number of crops in one forward on
  any device, optionally under autocast;
* :func:`original_inference` is the released one-image path made device-agnostic: the benchmark's
  baseline and the reference the tests compare against.

:meth:`SpigaAnnotator.load` also reads the random-init checkpoint of the real architecture that
:func:`pipelines.standins.spiga.build_spiga_standin` writes (offline runs).

Head pose (``headpose``, 6 numbers per face) is SPIGA's raw pose output:

* ``[0:3]`` Euler angles in degrees, in the order **yaw, pitch, roll**, in SPIGA's convention (the
  one ``spiga.data.loaders.augmentors.utils.rotation_matrix_to_euler`` returns and
  ``spiga.models.gnn.pose_proj.euler_to_rotation_matrix`` consumes): ``(0, 0, 0)`` is a frontal face;
* ``[3:6]`` the translation of SPIGA's mean 3D face (its own units) in the camera of the 64x64
  feature map of the crop (focal length 96 px, principal point at the crop centre); ``[5]`` is depth.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch and spiga are only needed by the model side, not by crop_face in workers
    import torch
    from spiga.models.spiga import SPIGA

DATASET = "300wpublic"
NUM_LANDMARKS = 68
NUM_EDGES = 13  # len(DatabaseStruct('300wpublic').ldm_edges_matrix[0]) - 1, checked by the tests
CROP_SIZE = 256
TARGET_DIST = 1.6
FOCAL_RATIO = 1.5
FTMAP_SIZE = 64
WEIGHTS_FILE = f"spiga_{DATASET}.pt"

# uint8 -> float32 exactly as the framework does it: float64 x / 255, then cast to float32.
_TO_UNIT = (np.arange(256, dtype=np.float64) / 255).astype(np.float32)


def crop_affine(box_xywh: np.ndarray | list[float], crop_size: int = CROP_SIZE,
                target_dist: float = TARGET_DIST) -> np.ndarray:
    """The 2x3 image -> crop affine map of SPIGA's ``TargetCropAug`` for an ``[x, y, w, h]`` box."""
    x, y, w, h = (float(v) for v in box_xywh)
    side = max(w, h) * target_dist
    x -= (side - w) / 2
    y -= (side - h) / 2
    x0, y0 = x + side / 2, y + side / 2
    mu = crop_size / side
    new0 = crop_size / 2
    return np.array([[mu, 0, new0 - mu * x0], [0, mu, new0 - mu * y0]])


def crop_face(image_rgb: np.ndarray, box_xywh: np.ndarray | list[float]) -> tuple[np.ndarray, np.ndarray]:
    """SPIGA's input crop of one face: ``(crop float32 (3, 256, 256) BGR in [0, 1], crop_box (4,))``.

    Bit-identical to the released pretreatment (``Opencv2Pil`` -> ``TargetCrop`` (PIL affine transform,
    nearest resampling) -> ``ToOpencv`` -> ``NormalizeAndPermute``) applied to the BGR version of
    ``image_rgb``, then cast to float32 as ``SPIGAFramework.pretreat`` does. ``crop_box`` is the face box
    ``[x, y, w, h]`` mapped into crop pixels (what the post-processing needs). Pure numpy/PIL.
    """
    image_rgb = np.asarray(image_rgb)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image_rgb.shape} {image_rgb.dtype}")
    affine = crop_affine(box_xywh)
    # spiga.data.loaders.augmentors.utils.get_inverse_transf, verbatim
    inv_a = np.linalg.inv(affine[0:2, 0:2])
    inv = np.zeros((2, 3))
    inv[0:2, 0:2] = inv_a
    inv[:, 2] = -inv_a.dot(affine[:, 2])
    pil = Image.fromarray(image_rgb).transform((CROP_SIZE, CROP_SIZE), Image.AFFINE, inv.flatten())
    bgr = np.asarray(pil)[:, :, ::-1]
    crop = np.ascontiguousarray(_TO_UNIT[bgr].transpose(2, 0, 1))
    # GeometryBaseAug._bbox_affine_trans: the box corners mapped, then their min/max
    x, y, w, h = (float(v) for v in box_xywh)
    corners = np.array([affine.dot(p) for p in ([x, y, 1], [x + w, y, 1], [x, y + h, 1], [x + w, y + h, 1])])
    c0, c1 = corners.min(axis=0), corners.max(axis=0)
    crop_box = np.array((c0[0], c0[1], *(c1 - c0)))
    return crop, crop_box


def crop_to_image(landmarks_crop: np.ndarray, crop_boxes: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Map (B, L, 2) landmarks in crop pixels to image pixels (``SPIGAFramework.postreatment``)."""
    crop_boxes = np.asarray(crop_boxes, dtype=np.float64)[:, None, :]
    boxes = np.asarray(boxes, dtype=np.float64)[:, None, :]
    norm = (np.asarray(landmarks_crop, dtype=np.float64) - crop_boxes[..., 0:2]) / crop_boxes[..., 2:4]
    return norm * boxes[..., 2:4] + boxes[..., 0:2]


def model_3d(ftmap_size: int = FTMAP_SIZE, focal_ratio: float = FOCAL_RATIO) -> tuple[np.ndarray, np.ndarray]:
    """SPIGA's mean 3D face (68, 3) in 300W order and the feature-map camera matrix (3, 3), as
    ``spiga.data.loaders.transforms.AddModel3D`` builds them."""
    from spiga.data.loaders.augmentors.modern_posit import load_world_shape
    from spiga.data.loaders.dl_config import DatabaseStruct

    world, _ = load_world_shape(DatabaseStruct(DATASET).ldm_ids)
    f = ftmap_size * focal_ratio
    cam = np.array([[f, 0, ftmap_size * 0.5], [0, f, ftmap_size * 0.5], [0, 0, 1]])
    return world, cam


def euler_to_rotation(euler: torch.Tensor) -> torch.Tensor:
    """SPIGA's ``pose_proj.euler_to_rotation_matrix`` (same maths, same convention), allocated on the
    input's device in float32, without modifying its input. The released one puts new tensors on the
    input's device only for CUDA, so it fails on MPS."""
    import torch

    e = euler.float()
    yaw, pitch, roll = -(e[:, 0] - 90), -e[:, 1], -(e[:, 2] + 90)
    rad = torch.stack([yaw, pitch, roll], dim=1) * (torch.pi / 180.0)
    cy, sy = torch.cos(rad[:, 0]), torch.sin(rad[:, 0])
    cp, sp = torch.cos(rad[:, 1]), torch.sin(rad[:, 1])
    cr, sr = torch.cos(rad[:, 2]), torch.sin(rad[:, 2])
    zero, one = torch.zeros_like(cy), torch.ones_like(cy)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], dim=1).view(-1, 3, 3)
    rp = torch.stack([cp, -sp, zero, sp, cp, zero, zero, zero, one], dim=1).view(-1, 3, 3)
    rr = torch.stack([one, zero, zero, zero, cr, -sr, zero, sr, cr], dim=1).view(-1, 3, 3)
    return ry @ rp @ rr


def project_points(pts: torch.Tensor, rot: torch.Tensor, trl: torch.Tensor, cam_matrix: torch.Tensor) -> torch.Tensor:
    """SPIGA's ``pose_proj.projectPoints`` (pinhole projection of (B, N, 3) points), on any device."""
    import torch

    proj = cam_matrix.float() @ torch.cat((rot, trl.float().unsqueeze(2)), 2)
    hom = torch.cat((pts.float(), torch.ones_like(pts[:, :, :1], dtype=torch.float32)), 2)
    out = (proj @ hom.transpose(1, 2)).transpose(1, 2)
    return out[:, :, :2] / out[:, :, 2:3]


@functools.cache
def _spiga_class() -> type:
    from spiga.models.spiga import SPIGA

    class DeviceAgnosticSPIGA(SPIGA):
        """The released SPIGA with its pose projection allocated on the input's device (CPU, CUDA, MPS).

        Same parameters and state-dict keys as ``SPIGA``; the backbone step mirrors ``SPIGA.backbone_forward``.
        """

        def backbone_forward(self, data):
            imgs, model3d, cam_matrix = data
            features = self.visual_cnn(imgs)
            pose_raw = features["HGcore"][-1]
            b, c, _, _ = pose_raw.shape
            pose = self.pose_fc(pose_raw.reshape(b, c))
            features["Pose"] = pose.clone()
            rot = euler_to_rotation(pose[:, 0:3])
            pts_proj = project_points(model3d, rot, pose[:, 3:], cam_matrix) / self.visual_res
            return pts_proj, features

    return DeviceAgnosticSPIGA


def new_model() -> SPIGA:
    """The released SPIGA architecture for 300W-public (68 landmarks, 13 edges), random init, made
    device-agnostic (see :func:`euler_to_rotation`)."""
    return _spiga_class()(num_landmarks=NUM_LANDMARKS, num_edges=NUM_EDGES)


class SpigaAnnotator:
    """SPIGA on one device: batched forward, the framework's post-processing."""

    def __init__(self, model: SPIGA, device: torch.device | str, precision: str = "fp32"):
        import torch

        if precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision {precision!r} is not one of fp32, fp16, bf16")
        self.device = torch.device(device)
        self.precision = precision
        self.model = model.eval().to(self.device)
        world, cam = model_3d()
        self.model3d = torch.tensor(world, dtype=torch.float, device=self.device)
        self.cam_matrix = torch.tensor(cam, dtype=torch.float, device=self.device)

    @classmethod
    def load(cls, weights_path: str | Path, device: torch.device | str, precision: str = "fp32") -> SpigaAnnotator:
        """Load a ``spiga_300wpublic.pt`` state dict (strictly) onto ``device``; nothing is downloaded."""
        import torch

        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"SPIGA weights {path} not found: run the fetch_models stage")
        model = new_model()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        return cls(model, device, precision)

    def forward(self, crops: torch.Tensor) -> dict:
        """The raw SPIGA outputs for a batch of crops (under inference mode and autocast)."""
        import torch

        crops = crops.to(self.device, dtype=torch.float, non_blocking=True)
        b = crops.shape[0]
        inputs = [crops, self.model3d.unsqueeze(0).expand(b, -1, -1), self.cam_matrix.unsqueeze(0).expand(b, -1, -1)]
        with torch.inference_mode(), warnings.catch_warnings():
            # spiga calls affine_grid/grid_sample without align_corners; the default (False) is what it was trained with
            warnings.filterwarnings("ignore", message="Default grid_sample and affine_grid", category=UserWarning)
            if self.precision == "fp32":
                return self.model(inputs)
            dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
            with torch.autocast(device_type=self.device.type, dtype=dtype):
                return self.model(inputs)

    def predict(self, crops: torch.Tensor, crop_boxes: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Landmarks ``(B, 68, 2)`` in image pixels and head pose ``(B, 6)`` for ``B`` crops in one forward.

        ``crops`` come from :func:`crop_face` (stacked), ``crop_boxes`` are its second outputs and ``boxes``
        the ``[x, y, w, h]`` face boxes in the image. Head pose: ``[:3]`` yaw, pitch, roll in degrees
        (SPIGA's convention, frontal = 0), ``[3:]`` translation in the 64x64 feature-map camera (see the
        module docstring). Post-processing is that of ``SPIGAFramework.postreatment`` (float64).
        """
        crop_boxes = np.asarray(crop_boxes, dtype=np.float64).reshape(-1, 4)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if not (len(crops) == len(crop_boxes) == len(boxes)):
            raise ValueError(f"{len(crops)} crops, {len(crop_boxes)} crop boxes, {len(boxes)} boxes")
        if len(crops) == 0:
            return np.zeros((0, NUM_LANDMARKS, 2)), np.zeros((0, 6))
        out = self.forward(crops)
        ldm = out["Landmarks"][-1].float().cpu().numpy() * CROP_SIZE
        pose = out["Pose"].float().cpu().numpy().astype(np.float64)
        return crop_to_image(ldm, crop_boxes, boxes), pose


@functools.cache
def _framework_class() -> type:
    """A subclass of the released ``SPIGAFramework`` (built lazily: spiga's inference package imports
    ``pkg_resources``, cv2 and torchvision)."""
    import spiga.inference.pretreatment as pretreat
    import torch
    from spiga.inference.config import ModelConfig
    from spiga.inference.framework import SPIGAFramework

    class DeviceSPIGAFramework(SPIGAFramework):
        """The released framework with an already-built model on any device (no download, no ``.cuda()``)."""

        def __init__(self, model: SPIGA, device: torch.device | str):  # skips the parent's __init__ (download)
            self.model_cfg = ModelConfig(DATASET, load_model_url=False)
            self.device = torch.device(device)
            self.gpus = [self.device]
            self.transforms = pretreat.get_transformers(self.model_cfg)
            self.model_inputs = ["image", "model3d", "cam_matrix"]
            self.model = model.to(self.device).eval()
            loader_3dm = pretreat.AddModel3D(self.model_cfg.dataset.ldm_ids, ftmap_size=self.model_cfg.ftmap_size,
                                             focal_ratio=self.model_cfg.focal_ratio, totensor=True)
            params_3dm = self._data2device(loader_3dm())
            self.model3d = params_3dm["model3d"]
            self.cam_matrix = params_3dm["cam_matrix"]

        def _data2device(self, data):
            if isinstance(data, list):
                return [self._data2device(v) for v in data]
            if isinstance(data, dict):
                return {k: self._data2device(v) for k, v in data.items()}
            return data.to(self.device, non_blocking=True)

    return DeviceSPIGAFramework


_LAST_FRAMEWORK: list = []  # one slot: the framework of the last (model, device) pair


def original_framework(model: SPIGA, device: torch.device | str):
    """The released ``SPIGAFramework`` around ``model`` on ``device`` (the last one is reused)."""
    import torch

    device = torch.device(device)
    if _LAST_FRAMEWORK and _LAST_FRAMEWORK[0].model is model and _LAST_FRAMEWORK[0].device == device:
        return _LAST_FRAMEWORK[0]
    _LAST_FRAMEWORK[:] = [_framework_class()(model, device)]
    return _LAST_FRAMEWORK[0]


def original_inference(model: SPIGA, image_bgr: np.ndarray, boxes: list | np.ndarray,
                       device: torch.device | str) -> dict:
    """The released one-image path: ``SPIGAFramework.inference(image_bgr, boxes)`` on ``device``.

    Per box: spiga's own transforms, then one forward of all the image's boxes (with autograd on, as
    released), then ``postreatment``. Returns ``{'landmarks': (N, 68, 2), 'headpose': (N, 6)}`` arrays.
    """
    fw = original_framework(model, device)
    feats = fw.inference(np.asarray(image_bgr), [list(map(float, b)) for b in boxes])
    return {"landmarks": np.asarray(feats["landmarks"], dtype=np.float64),
            "headpose": np.asarray(feats["headpose"], dtype=np.float64)}

