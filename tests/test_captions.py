"""Captions: the BLIP stand-in round trip, batching invariance, the original baseline, and the stage."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download: the stand-in must load from disk alone
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from conftest import committed_params

from pipelines.captions import BLIP_MAX_NEW_TOKENS, BlipCaptioner, original_caption  # noqa: E402
from pipelines.reports import ModelInfo, write_model_manifest  # noqa: E402
from pipelines.shards import read_shards  # noqa: E402
from pipelines.standins.blip import BLIP_IMAGE_SIZE, build_blip_standin  # noqa: E402
from stages.config import ParamError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_blip_standin(tmp_path_factory.mktemp("blip"), seed=0)


@pytest.fixture(scope="module")
def captioner(standin_dir: Path) -> BlipCaptioner:
    return BlipCaptioner.load(standin_dir, "cpu", "fp32")


def _images(n: int = 3, size: int = 512) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_standin_saves_and_loads_offline(standin_dir: Path, captioner: BlipCaptioner) -> None:
    names = {p.name for p in standin_dir.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= names
    cfg = captioner.model.config.text_config
    tok = captioner.processor.tokenizer
    # BLIP's token layout: [DEC] is bos, [SEP] ends the caption, [PAD] pads
    assert tok.convert_ids_to_tokens(cfg.bos_token_id) == "[DEC]"
    assert cfg.sep_token_id == tok.sep_token_id and cfg.pad_token_id == tok.pad_token_id == 0
    assert cfg.vocab_size == len(tok)
    ip = captioner.processor.image_processor
    assert ip.size == {"height": BLIP_IMAGE_SIZE, "width": BLIP_IMAGE_SIZE}
    assert captioner.dtype == torch.float32 and not captioner.model.training


def test_preprocess_shape(captioner: BlipCaptioner) -> None:
    pv = captioner.preprocess(_images(1)[0])
    assert pv.shape == (3, BLIP_IMAGE_SIZE, BLIP_IMAGE_SIZE) and pv.dtype == np.float32
    black = captioner.preprocess(np.zeros((512, 512, 3), np.uint8))
    mean, std = np.array(captioner.processor.image_processor.image_mean), np.array(captioner.processor.image_processor.image_std)
    np.testing.assert_allclose(black[:, 0, 0], -mean / std, rtol=1e-5)


def test_precision_recorded_is_the_precision_computed(standin_dir: Path) -> None:
    """bf16 on the CPU computes in bf16 (it used to compute fp32 and record bf16); fp16 there is refused."""
    bf16 = BlipCaptioner.load(standin_dir, "cpu", "bf16")
    assert bf16.dtype == torch.bfloat16 and next(bf16.model.parameters()).dtype == torch.bfloat16
    image = np.full((64, 64, 3), 128, np.uint8)
    assert isinstance(bf16.caption(torch.from_numpy(bf16.preprocess(image))[None])[0], str)
    with pytest.raises(ValueError, match="fp16 on the CPU"):
        BlipCaptioner.load(standin_dir, "cpu", "fp16")


def test_batched_equals_one_at_a_time(captioner: BlipCaptioner) -> None:
    images = _images(3)
    pv = torch.from_numpy(np.stack([captioner.preprocess(im) for im in images]))
    batched = captioner.caption(pv)
    single = [captioner.caption(pv[i:i + 1])[0] for i in range(3)]
    assert len(batched) == 3 and all(isinstance(t, str) and t for t in batched)
    assert batched == single
    assert len(set(batched)) > 1  # the stand-in does look at the image
    # default generation settings: short captions ([DEC] + at most 20 tokens)
    ids = captioner.model.generate(pixel_values=pv)
    assert ids.shape[1] <= 1 + BLIP_MAX_NEW_TOKENS and all(len(t.split()) <= BLIP_MAX_NEW_TOKENS for t in batched)
    # the original build's one-image path gives the same captions
    assert [original_caption(captioner.model, captioner.processor, im, "cpu") for im in images] == single


# --- the stage ---------------------------------------------------------------------------------------

def _stage_tree(tmp: Path, standin_dir: Path, method: str = "blip") -> None:
    params = committed_params()
    params["base"]["device"] = "cpu"
    params["caption"]["method"] = method
    params["caption"].update(batch_size=2, num_workers=0, shard_size=2)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    raw = tmp / "data/raw/facesynthetics"
    raw.mkdir(parents=True)
    for i, im in enumerate(_images(4)):
        Image.fromarray(im).save(raw / f"{i:06d}.png")
    (raw / "000004.png").write_bytes(b"not a png at all")
    model = tmp / "data/models/blip"
    shutil.copytree(standin_dir, model)
    write_model_manifest(model, ModelInfo(name="blip", id="standin/blip-tiny", revision="seed0", source="built by code",
                                          standin=True))


def test_stage_blip(tmp_path: Path, standin_dir: Path, captioner: BlipCaptioner, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import caption

    _stage_tree(tmp_path, standin_dir)
    monkeypatch.chdir(tmp_path)
    caption.main([])
    out = tmp_path / "data/interim/facesynthetics/captions"
    assert sorted(p.name for p in out.glob("shard-*.parquet")) == ["shard-00000.parquet", "shard-00001.parquet",
                                                                    "shard-00002.parquet"]
    rows = read_shards(out).to_pylist()
    assert [r["id"] for r in rows] == [f"{i:06d}" for i in range(5)]
    assert [r["ok"] for r in rows] == [True] * 4 + [False]
    assert rows[4]["error"] == "corrupt_image" and rows[4]["text"] is None
    # the stage gives exactly what the captioner gives on the same images
    images = _images(4)
    expected = captioner.caption(torch.from_numpy(np.stack([captioner.preprocess(im) for im in images])))
    assert [r["text"] for r in rows[:4]] == expected
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"rows": 5, "ok": 4, "failed": 1, "failed_by_reason": {"corrupt_image": 1}}
    assert summary["model"]["id"] == "standin/blip-tiny" and summary["uses_standin_models"] is True
    assert summary["runtime"]["device"] == "cpu" and summary["runtime"]["precision"] == "fp32"
    assert "this_run" not in summary and "throughput" not in summary  # data: no run-dependent figures
    run = json.loads((tmp_path / caption.RUN_REPORT).read_text())  # those are in the run's metrics file
    assert run["this_run"]["items_processed"] == 5 and run["this_run"]["shards_reused"] == 0
    assert run["throughput"]["items_per_second"] > 0 and run["uses_standin_models"] is True

    # a rerun reuses every shard; counts over all shards stay the same
    mtime = (out / "shard-00000.parquet").stat().st_mtime_ns
    again = caption.main([])
    assert again["this_run"]["shards_reused"] == 3 and again["this_run"]["items_processed"] == 0
    assert again["counts"]["ok"] == 4 and (out / "shard-00000.parquet").stat().st_mtime_ns == mtime


def test_stage_none_needs_no_model(tmp_path: Path, standin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import caption

    _stage_tree(tmp_path, standin_dir, method="none")
    shutil.rmtree(tmp_path / "data/models/blip")
    monkeypatch.chdir(tmp_path)
    summary = caption.main([])
    rows = read_shards(tmp_path / "data/interim/facesynthetics/captions").to_pylist()
    assert [r["text"] for r in rows] == [""] * 4 + [None]
    assert summary["model"] is None and summary["uses_standin_models"] is False
    assert summary["counts"] == {"rows": 5, "ok": 4, "failed": 1, "failed_by_reason": {"corrupt_image": 1}}
    assert pq.read_schema(tmp_path / "data/interim/facesynthetics/captions/shard-00000.parquet").field("text").type == "string"


def test_fixed_raw_image_is_captioned_again(tmp_path: Path, standin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A corrupt raw image replaced by a good one is no longer a failure on rerun; a touched one is reused."""
    from stages import caption

    _stage_tree(tmp_path, standin_dir, method="none")
    monkeypatch.chdir(tmp_path)
    caption.main([])
    raw = tmp_path / "data/raw/facesynthetics"
    os.utime(raw / "000000.png")  # same bytes, new mtime
    (raw / "000004.png").write_bytes((raw / "000003.png").read_bytes())
    summary = caption.main([])
    assert summary["this_run"]["items_processed"] == 1 and summary["this_run"]["shards_reused"] == 2
    assert summary["counts"] == {"rows": 5, "ok": 5, "failed": 0, "failed_by_reason": {}}


def test_bad_method_names_the_key(tmp_path: Path, standin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import caption

    _stage_tree(tmp_path, standin_dir, method="gpt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamError, match=r"caption\.method"):
        caption.main([])
    assert not (tmp_path / "data/interim").exists()


def test_help_runs() -> None:
    from stages import caption

    with pytest.raises(SystemExit) as exc:
        caption.main(["--help"])
    assert exc.value.code == 0


def test_worker_load_function_pickles(standin_dir: Path, captioner: BlipCaptioner, tmp_path: Path) -> None:
    """DataLoader workers under the spawn start method (macOS, Windows) need a picklable load function."""
    import functools
    import pickle

    from pipelines.captions import load_caption_input
    from pipelines.sources.facesynthetics import sample_paths

    Image.fromarray(_images(1)[0]).save(tmp_path / "000000.png")
    fn = functools.partial(load_caption_input, image_size=512, image_processor=captioner.processor.image_processor)
    clone = pickle.loads(pickle.dumps(fn))
    sample = sample_paths(tmp_path, "000000")
    assert np.array_equal(clone(sample)["pixel_values"], fn(sample)["pixel_values"])
