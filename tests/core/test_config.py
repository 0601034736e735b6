import dataclasses

import pytest

from core.config import ConfigError, from_dict, load_config, parse_overrides, require_at_least, to_dict


@dataclasses.dataclass
class Example:
    name: str = "x"
    init: str | None = "ckpt"
    lr: float = 1e-3
    epochs: int = 1
    use_gpu: bool = False
    tags: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.epochs < 1:
            raise ConfigError("epochs must be >= 1")


def test_overrides_are_converted_to_the_declared_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\nepochs: 4\n")
    cfg = load_config(Example, path, ["epochs=7", "init=none", "use_gpu=true", "tags=a,b"])
    assert cfg == Example(lr=0.5, epochs=7, init=None, use_gpu=True, tags=["a", "b"])


def test_unknown_keys_bad_values_and_validation_are_errors():
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config(Example, None, ["epoch=3"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(Example, None, ["epochs=three"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Example, None, ["epochs"])
    with pytest.raises(ConfigError, match=">= 1"):
        load_config(Example, None, {"epochs": 0})


@dataclasses.dataclass
class Size:
    hidden: int = 64
    layers: int = 2

    def __post_init__(self):
        require_at_least(self, 1, "hidden", "layers")


@dataclasses.dataclass
class Stage:
    out: str
    size: Size = dataclasses.field(default_factory=Size)
    lr: float = 1e-3


def test_nested_configs_take_a_yaml_mapping_and_dotted_overrides(tmp_path):
    path = tmp_path / "stage.yaml"
    path.write_text("out: /x\nsize:\n  hidden: 128\n")
    cfg = load_config(Stage, path, ["size.layers=4", "lr=0.5"])
    assert cfg == Stage(out="/x", size=Size(hidden=128, layers=4), lr=0.5)
    # A dotted key in the file or a nested mapping in the overrides means the same.
    path.write_text("out: /x\nsize.hidden: 32\n")
    assert load_config(Stage, path, {"size": {"layers": 3}}).size == Size(hidden=32, layers=3)
    assert from_dict(Stage, to_dict(cfg)) == cfg


def test_errors_name_the_dotted_key():
    with pytest.raises(ConfigError, match=r"size: Size.hidden must be >= 1, got 0"):
        load_config(Stage, None, ["out=/x", "size.hidden=0"])
    with pytest.raises(ConfigError, match=r"size: unknown keys \['hiden'\]"):
        load_config(Stage, None, ["out=/x", "size.hiden=3"])
    with pytest.raises(ConfigError, match=r"size.layers: expected int"):
        load_config(Stage, None, ["out=/x", "size.layers=two"])
    with pytest.raises(ConfigError, match="lr: expected float"):
        load_config(Stage, None, ["out=/x", "lr.x=1"])
    with pytest.raises(ConfigError, match="out"):
        load_config(Stage, None, [])


def test_parse_overrides_is_the_one_key_value_parser():
    assert parse_overrides(["a=1", "b.c=x=y", "a=2"]) == {"a": "2", "b.c": "x=y"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["=1"])
