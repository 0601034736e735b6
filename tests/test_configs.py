"""Every shipped config under configs/ loads into the dataclass its first line names, with the command line's
paths added, and its values arrive (a file with an unknown key would fail here)."""

from pathlib import Path

import pytest
import yaml

from core.config import ConfigError, load_config
from devtools.generator import GeneratorConfig
from lsvcr.continuous import ContinuousConfig
from lsvcr.demo import DemoConfig
from trainers.align import AlignConfig
from trainers.finetune import FinetuneConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CLASSES = {cls.__name__: cls for cls in (AlignConfig, FinetuneConfig, ContinuousConfig, DemoConfig,
                                          GeneratorConfig)}
# What each command line adds (the paths are never in a shipped file).
PATHS = {"AlignConfig": ["features=f", "out=o"], "FinetuneConfig": ["features=f", "out=o"],
         "ContinuousConfig": ["workdir=w", "registry=r", "consume=false"], "DemoConfig": [],
         "GeneratorConfig": []}
FILES = sorted(CONFIGS.glob("*.yaml"))


def leaves(mapping: dict, prefix: str = ""):
    for key, value in mapping.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_the_common_runs_are_shipped():
    assert {f.name for f in FILES} == {"align-cpu-frozen.yaml", "align-gpu-lora.yaml", "finetune.yaml",
                                       "continuous.yaml", "demo.yaml", "generate-freshness.yaml"}
    listed = (CONFIGS / "README.md").read_text()
    assert all(f"`{f.name}`" in listed for f in FILES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    name = path.read_text().splitlines()[0].removeprefix("# ").split(":")[0]
    config = load_config(CLASSES[name], path, PATHS[name])
    for key, value in leaves(yaml.safe_load(path.read_text())):
        got = config
        for part in key.split("."):
            got = getattr(got, part)
        assert got == value, key


def test_a_bad_key_in_a_file_names_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "finetune.yaml").read_text() + "learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown keys \\['learning_rate'\\]"):
        load_config(FinetuneConfig, bad, PATHS["FinetuneConfig"])
