from pathlib import Path

import pytest

import lsvcr.suite as suite
from lsvcr.suite import MODEL_NAMES, STAGE1, STAGE2, train_all
from trainers.models import ModelSize


def test_names_cover_baselines_and_ablations():
    assert MODEL_NAMES == ("popularity", "sasrec", "sr_no_align", "sr_text_only", "sr_rec_pretrain",
                           "sr_rec_item_pretrain", "lsvcr_no_vc_contrast", "lsvcr_no_time", "lsvcr")
    assert set(STAGE1) == {"sr_rec_pretrain", "sr_rec_item_pretrain", "lsvcr", "lsvcr_no_vc_contrast", "lsvcr_no_time"}
    # The control differs from lsvcr in the LLM alone, and keeps no item contrast even when the run asks every
    # stage 1 for one (item_encoder=minilm_aligned); the second control has it, without the LLM.
    assert STAGE1["sr_rec_pretrain"] == {"llm_mode": "none", "item_contrast": False, "export_item_tables": False}
    assert STAGE1["sr_rec_item_pretrain"] == {"llm_mode": "none", "item_contrast": True, "export_item_tables": False}
    assert STAGE2["sr_rec_pretrain"] == STAGE2["sr_rec_item_pretrain"] == STAGE2["lsvcr"]
    assert STAGE1["lsvcr_no_vc_contrast"] == {"vc_contrast": False}
    # The time ablation drops the time embeddings in both stages (stage 2 loads stage 1 strictly).
    assert STAGE1["lsvcr_no_time"] == STAGE2["lsvcr_no_time"] == {"time_features": False}
    assert STAGE2["sasrec"] == {"model": "sasrec"} and STAGE2["sr_text_only"] == {"text_only": True}


def test_bad_requests_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown models"):
        train_all(tmp_path, tmp_path / "out", models=["gpt"])
    with pytest.raises(ValueError, match="key=value"):
        train_all(tmp_path, tmp_path / "out", models=["sasrec"], finetune=["epochs"])


def test_one_model_size_for_both_stages(tmp_path, monkeypatch):
    """Stage 2 loads stage 1's weights strictly: a size.* override given to either stage reaches both."""
    configs = []
    monkeypatch.setattr(suite, "run_align", lambda config: configs.append(config) or config.out)
    monkeypatch.setattr(suite, "run_finetune", lambda config: configs.append(config) or config.out)
    monkeypatch.setattr(suite, "evaluate", lambda *args, **kwargs: {})
    train_all(tmp_path, tmp_path / "out", models=["lsvcr"], align=["size.hidden=32"],
              finetune=["size.max_history=20", "epochs=1"])
    assert [type(c).__name__ for c in configs] == ["AlignConfig", "FinetuneConfig"]
    assert configs[0].size == configs[1].size == ModelSize(hidden=32, max_history=20)
    assert configs[1].epochs == 1 and configs[1].init == str(tmp_path / "out" / "lsvcr_aligned")


def test_seeds_train_every_model_once_per_seed(tmp_path, monkeypatch):
    configs = []
    monkeypatch.setattr(suite, "run_align", lambda config: configs.append(config) or config.out)
    monkeypatch.setattr(suite, "run_finetune", lambda config: configs.append(config) or config.out)
    evaluated = {}
    monkeypatch.setattr(suite, "evaluate", lambda features, checkpoints, **kw: evaluated.update(checkpoints) or {})
    out = train_all(tmp_path, tmp_path / "out", models=["popularity", "sasrec", "lsvcr"], seeds=2)
    assert sorted(evaluated) == ["lsvcr@seed0", "lsvcr@seed1", "sasrec@seed0", "sasrec@seed1"]
    assert out["metrics"]["seeds"] == 2
    # Stage 1 and stage 2 of a run share its seed; stage 2 starts from that seed's stage 1.
    runs = [(type(c).__name__, c.seed, Path(c.out).name) for c in configs]
    assert runs == [("FinetuneConfig", 0, "sasrec@seed0"), ("FinetuneConfig", 1, "sasrec@seed1"),
                    ("AlignConfig", 0, "lsvcr@seed0_aligned"), ("FinetuneConfig", 0, "lsvcr@seed0"),
                    ("AlignConfig", 1, "lsvcr@seed1_aligned"), ("FinetuneConfig", 1, "lsvcr@seed1")]
    assert configs[-1].init == str(tmp_path / "out" / "lsvcr@seed1_aligned")
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        train_all(tmp_path, tmp_path / "out", models=["sasrec"], seeds=0)


def test_a_stage_1_that_exports_item_tables_trains_and_evaluates_stage_2_over_them(tmp_path, monkeypatch):
    configs, evaluated = [], {}

    def fake_align(config):
        configs.append(config)
        if config.export_item_tables:  # what trainers.align.export_item_tables leaves behind
            (Path(config.out) / suite.ALIGNED_FEATURES).mkdir(parents=True)
            (Path(config.out) / suite.ALIGNED_FEATURES / "manifest.json").write_text("{}")
        return config.out

    monkeypatch.setattr(suite, "run_align", fake_align)
    monkeypatch.setattr(suite, "run_finetune", lambda config: configs.append(config) or config.out)
    monkeypatch.setattr(suite, "evaluate", lambda features, checkpoints, **kw: evaluated.update(kw) or {})
    out = train_all(tmp_path, tmp_path / "out", models=["sr_rec_pretrain", "lsvcr"],
                    align=["llm_mode=lora", "export_item_tables=true"])
    exported = str(tmp_path / "out" / "lsvcr_aligned" / suite.ALIGNED_FEATURES)
    stage2 = {Path(c.out).name: c.features for c in configs if type(c).__name__ == "FinetuneConfig"}
    assert stage2 == {"sr_rec_pretrain": str(tmp_path), "lsvcr": exported}  # the control exports nothing
    assert evaluated["tables"] == {"lsvcr": exported} == out["tables"]
