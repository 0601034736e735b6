import numpy as np
import pytest

from benchmarks.align_gpu import STAGE1, _options, joint_batches


def test_joint_batches_cover_every_row_once_and_pad_the_shorter_task_with_none():
    rows = {"video": {"target": np.arange(10), "x": np.arange(10) * 2},
            "comment": {"target": np.arange(4) + 100, "x": np.arange(4)}}
    batches = list(joint_batches(rows, 3, seed=7))
    assert len(batches) == 4  # ceil(10 / 3): the longer task decides
    videos = np.concatenate([v["target"] for v, _ in batches])
    comments = np.concatenate([c["target"] for _, c in batches if c is not None])
    assert sorted(videos) == list(range(10)) and sorted(comments) == [100, 101, 102, 103]
    assert [c is None for _, c in batches] == [False, False, True, True]
    for video, _ in batches:  # columns stay aligned row by row
        assert (video["x"] == video["target"] * 2).all()
    again = list(joint_batches(rows, 3, seed=7))
    assert all((a["target"] == b["target"]).all() for (a, _), (b, _) in zip(batches, again))
    other = np.concatenate([v["target"] for v, _ in joint_batches(rows, 3, seed=8)])
    assert not (other == videos).all()  # the seed decides the order


def test_options_are_typed_and_unknown_or_missing_ones_are_refused():
    opts = _options(STAGE1, ["features=F", "out=O", "seeds=2"])
    assert opts["seeds"] == 2 and opts["batch_size"] == STAGE1["batch_size"]
    with pytest.raises(SystemExit, match="unknown"):
        _options(STAGE1, ["features=F", "out=O", "seedz=2"])
    with pytest.raises(SystemExit, match="required"):
        _options(STAGE1, ["features=F"])


def test_an_adapter_trained_elsewhere_is_pointed_at_this_machines_conversion_of_the_same_gguf(tmp_path):
    import json

    from benchmarks.align_gpu import local_adapter
    from trainers.models.llm import DEFAULT_LLM, resolve_llm_path

    local = resolve_llm_path(DEFAULT_LLM)
    adapter = tmp_path / "run" / "llm" / "lora"
    adapter.mkdir(parents=True)
    digest = local.name.rsplit("-", 1)[-1]
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": f"/gpu/cache/m-{digest}",
                                                             "r": 8}))
    assert local_adapter(tmp_path / "run") == adapter
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config == {"base_model_name_or_path": str(local), "r": 8}
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/gpu/cache/other-0123"}))
    with pytest.raises(SystemExit, match="not the packaged SmolLM2"):
        local_adapter(tmp_path / "run")
