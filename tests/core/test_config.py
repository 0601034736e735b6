import dataclasses

import pytest

from core.config import ConfigError, config_from_argv, load_config


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


def test_entry_point_arguments_are_an_optional_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\n")
    assert config_from_argv(Example, [str(path), "epochs=2"]) == Example(lr=0.5, epochs=2)
    assert config_from_argv(Example, ["epochs=3"]) == Example(epochs=3)
    assert config_from_argv(Example, []) == Example()
