import pytest

from benchmarks.quality import ITEM_ENCODERS, results_name


def test_each_variant_has_its_own_results_file():
    assert results_name([]) == "quality"
    assert results_name(["set=freshness"]) == "quality_freshness"
    assert results_name(["item_encoder=minilm_aligned"]) == "quality_minilm_aligned"
    assert results_name(["set=freshness", "item_encoder=llm"]) == "quality_freshness_llm"


def test_item_encoders_change_the_features_or_stage_1_and_unknown_ones_are_refused():
    assert ITEM_ENCODERS["llm"][0] == ("encoder=llm",) and ITEM_ENCODERS["minilm_aligned"][1] == ("item_contrast=true",)
    with pytest.raises(SystemExit, match="item_encoder"):
        results_name(["item_encoder=bert"])
