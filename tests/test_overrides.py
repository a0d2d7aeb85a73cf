"""`dvc exp run -S`: every documented override applied by DVC's own machinery takes effect, and DVC's rewrite of
params.yaml keeps every value what it was (no anchors to mangle, no quoted "no" to turn into False)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import committed_params_text, write_committed_params
from test_config import COMMANDS, STAGES, stage_config

from stages import config as C

ROOT = Path(__file__).resolve().parents[1]


def documented_overrides() -> list[tuple[str, list[str]]]:
    """(where, [-S values]) of every `dvc exp run` the README and the Makefile show."""
    found = []
    for doc in ("README.md", "Makefile"):
        for line in (ROOT / doc).read_text().splitlines():
            for cmd in re.findall(r"dvc exp run[^`#\n]*", line):
                words = shlex.split(cmd)
                sets = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-S", "--set-param")]
                if sets:
                    found.append((f"{doc}: {cmd.strip()}", sets))
    return found


def apply(tmp_path: Path, overrides: list[str]) -> dict:
    """params.yaml after DVC applies ``overrides`` exactly as `dvc exp run -S` does (same function)."""
    from dvc.utils.hydra import apply_overrides

    path = write_committed_params(tmp_path / "params.yaml")
    apply_overrides(path, overrides)
    return C.read_params(path)


def test_the_documented_commands_are_found():
    where = [w for w, _ in documented_overrides()]
    assert any("base.profile=real" in w for w in where if w.startswith("Makefile"))  # make real
    assert len(where) >= 4, where


@pytest.mark.parametrize("where, overrides", documented_overrides(), ids=[w for w, _ in documented_overrides()])
def test_documented_override_takes_effect(tmp_path, where, overrides, one_gpu):
    """Each -S changes what the stages reading that key get, in the profile the command runs; every stage's
    config still parses."""
    params = apply(tmp_path, overrides)
    base = C.load_base(params)
    for override in overrides:
        key, _, raw = override.partition("=")
        expected = yaml.safe_load(raw)
        parts = key.split(".")
        if parts[-1] in C.PROFILES and parts[-1] != base.profile:
            continue  # changes the other profile only
        if parts[-1] in C.PROFILES:
            parts = parts[:-1]
        if parts[0] == "base":
            assert getattr(base, parts[1]) == expected, override
            continue
        section, field = parts[0], parts[1]
        resolved = C.section(params, section, base.profile)
        assert resolved[field] == expected, override
        for name, (_, cls_name, sec) in {**STAGES, **COMMANDS}.items():
            if sec == section and cls_name is not None:
                _, cfg = stage_config(name, params, base.profile)
                got = getattr(cfg, field)
                assert got == expected or (isinstance(got, tuple) and list(got) == expected), f"{name}: {override}"
    for name in {**STAGES, **COMMANDS}:
        stage_config(name, params, base.profile)


def test_dvc_rewrite_keeps_every_value(tmp_path):
    """DVC rewrites the whole file on -S (ruamel, YAML 1.2): anchors are lost and quotes of YAML-1.1 booleans
    such as "no" are dropped, which PyYAML then reads as False. A no-op override must change nothing."""
    committed = yaml.safe_load(committed_params_text())
    after = apply(tmp_path, [f"base.seed={committed['base']['seed']}"])
    assert after == committed


def test_an_unknown_key_is_refused_naming_it(tmp_path):
    from dvc.exceptions import InvalidArgumentError

    with pytest.raises(InvalidArgumentError) as exc:
        apply(tmp_path, ["generate.num_inference_stepz=30"])
    assert "generate.num_inference_stepz" in str(exc.value.__cause__)


def test_a_per_profile_key_can_be_set_for_one_profile(tmp_path):
    params = apply(tmp_path, ["generate.num_inference_steps.real=30"])
    assert C.section(params, "generate", "real")["num_inference_steps"] == 30
    assert C.section(params, "generate", "sample")["num_inference_steps"] == 2


def test_params_hold_no_anchor_and_no_yaml11_boolean_word():
    """What DVC's rewrite would silently change, caught in the file itself."""
    text = committed_params_text()
    code = "\n".join(line.split(" #")[0] for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"(:|-|\[|,)\s*[&*][A-Za-z_]\w*", code), "YAML anchors/aliases: dvc exp run -S drops them"
    words = r"y|Y|yes|Yes|YES|n|N|no|No|NO|on|On|ON|off|Off|OFF"
    assert not re.search(rf"""["']({words})["']""", code), "a quoted YAML 1.1 boolean: -S rewrites it unquoted"


def test_make_real_switches_every_stage(tmp_path, one_gpu):
    """`make real` (the one switch) gives every stage its real configuration."""
    params = apply(tmp_path, ["base.profile=real"])
    for name in {**STAGES, **COMMANDS}:
        base, _ = stage_config(name, params, None)
        assert base.profile in (None, "real")
    assert C.section(params, "fetch_facesynthetics", "real")["source"] == "official"
