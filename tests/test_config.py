"""Typed YAML configs: round trip, unknown keys and wrong types are errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from cvxmri.config import from_dict, load_yaml, save_yaml
from cvxmri.errors import CvxmriError, check_settings
from cvxmri.evaluate import EvaluateConfig
from cvxmri.masks import MaskSpec


def test_roundtrip(tmp_path: Path) -> None:
    config = EvaluateConfig(split="val", masks=[MaskSpec("poisson", 6.0, 0.04, (12, 10))])
    save_yaml(config, tmp_path / "c.yaml")
    again = load_yaml(EvaluateConfig, tmp_path / "c.yaml")
    assert again == config
    assert again.masks[0].calib_size == (12, 10)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"splt": "val"}, "unknown key"),
        ({"split": 3}, "expected str"),
        ({"masks": [{"kind": "poisson", "acceleration": "four"}]}, "expected a number"),
        ({"masks": [{"kind": "poisson", "acceleration": 4, "calib_size": [1]}]}, "expected 2"),
        ({"cs": {"lamda": 1e-3, "iters": 3}}, "unknown key"),
        ({"cs": {"iterations": 2.5}}, "expected an integer"),
        ({"methods": "cs"}, "expected a list"),
    ],
)
def test_rejects_bad_configs(data: dict, message: str) -> None:
    with pytest.raises(CvxmriError, match=message):
        from_dict(EvaluateConfig, data)


def test_bad_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("split: [unclosed")
    with pytest.raises(CvxmriError, match="not valid YAML"):
        load_yaml(EvaluateConfig, path)
    with pytest.raises(CvxmriError, match="no such config file"):
        load_yaml(EvaluateConfig, tmp_path / "missing.yaml")


def test_check_settings_names_the_first_broken_rule() -> None:
    owner = SimpleNamespace(k=4, optim=SimpleNamespace(lr=-1.0))
    rules = {"k": (True, "odd"), "optim.lr": (False, "> 0"), "other": (False, "unreached")}
    with pytest.raises(CvxmriError) as caught:
        check_settings("training", owner, rules, "net.")
    assert str(caught.value) == "invalid training setting net.optim.lr=-1.0: must be > 0"
    check_settings("training", owner, {"k": (True, "odd")})  # every rule holds: no error
