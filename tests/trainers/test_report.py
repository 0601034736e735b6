import json

import pytest

from trainers.report import find_metrics, metrics_table, report, split_result


def _write_run(tmp_path):
    models = tmp_path / "models"
    for name, losses, ndcgs in (("sr_no_align", [2.0, 1.5], [0.2, 0.3]), ("lsvcr", [1.8, 1.2], [0.25, 0.4])):
        (models / name).mkdir(parents=True)
        history = [{"epoch": e + 1, "loss": loss, "valid_ndcg@5": ndcg}
                   for e, (loss, ndcg) in enumerate(zip(losses, ndcgs))]
        (models / name / "train.json").write_text(json.dumps({"history": history}))
    (models / "lsvcr_aligned").mkdir()
    (models / "lsvcr_aligned" / "train.json").write_text(json.dumps({"history": [{"epoch": 1, "total_loss": 5.0}]}))
    metrics = {
        "split": "test",
        "protocol": {"negatives": 99, "time_aware": True},
        # Paths as another machine wrote them: the report finds the folders by name next to metrics.json.
        "checkpoints": {"sr_no_align": "/elsewhere/sr_no_align", "lsvcr": "/elsewhere/lsvcr"},
        "metrics": {
            "video": {"popularity": {"count": 10, "ndcg@10": 0.125, "recall@10": 0.5, "mrr@10": 0.1},
                      "lsvcr": {"count": 10, "ndcg@10": 0.3333, "recall@10": 0.7, "mrr@10": 0.25,
                                "ci": {"low": 0.1}},
                      "recent_popularity": {"count": 10, "ndcg@10": 0.2, "coverage": 3}},
            "comment": {"lsvcr": {"count": 4, "ndcg@10": 0.5, "recall@10": None, "mrr@10": 0.5}},
        },
    }
    (models / "metrics.json").write_text(json.dumps(metrics))
    return models


def test_metrics_table_by_hand():
    table = metrics_table({"a": {"count": 3, "mrr@10": 0.5, "ndcg@10": 0.12345, "zeta": 2, "note": "x"},
                           "b": {"count": 3, "ndcg@10": None}})
    # count first, then the known metrics in METRIC_NAMES order, then other numeric keys; strings dropped.
    assert table.splitlines() == [
        "| model | count | ndcg@10 | mrr@10 | zeta |",
        "|---|---:|---:|---:|---:|",
        "| a | 3 | 0.1235 | 0.5000 | 2 |",
        "| b | 3 | - | - | - |",
    ]


def test_split_result_accepts_both_layouts_and_refuses_others():
    tasks, rest = split_result({"split": "test", "checkpoints": {}, "metrics": {"video": {"m": {}}}})
    assert tasks == {"video": {"m": {}}} and rest == {"split": "test"}
    tasks, rest = split_result({"video": {"m": {}}, "comment": {"m": {}}, "protocol": "global"})
    assert set(tasks) == {"video", "comment"} and rest == {"protocol": "global"}
    with pytest.raises(ValueError, match="no per-task metrics"):
        split_result({"split": "test"})


def test_report_writes_tables_and_curves(tmp_path):
    models = _write_run(tmp_path)
    assert find_metrics(tmp_path) == models / "metrics.json"
    path = report(tmp_path)
    assert path == models / "report.md"
    text = path.read_text()
    assert "- **protocol**: `{\"negatives\": 99, \"time_aware\": true}`" in text
    assert "- **split**: test" in text
    assert "| lsvcr | 10 | 0.7000 | 0.3333 | 0.2500 | - |" in text  # recall@10, ndcg@10, mrr@10, coverage
    assert "| recent_popularity | 10 | - | 0.2000 | - | 3 |" in text
    assert "| lsvcr | 4 | - | 0.5000 | 0.5000 |" in text  # the comment task
    for stem in ("curve_loss", "curve_valid_ndcg5", "curve_align_loss"):
        png = models / f"{stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({stem}.png)" in text


def test_report_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        report(tmp_path)


def test_paired_differences_are_a_table_with_verdicts(tmp_path, capsys):
    d = {"diff": 0.01, "ci95": [-0.002, 0.02], "significant": False, "examples": 40, "groups": 12}
    e = {"diff": 0.05, "ci95": [0.03, 0.07], "significant": True, "examples": 40, "groups": 12}
    data = {"video": {"lsvcr": {"ndcg@10": 0.4}, "sr_no_align": {"ndcg@10": 0.39}},
            "paired": {"video": {"lsvcr": {"sr_no_align": d, "recency": e}}}}
    (tmp_path / "metrics.json").write_text(json.dumps(data))
    text = report(tmp_path).read_text()
    assert "| lsvcr | sr_no_align | +0.0100 | [-0.0020, +0.0200] | not significant (interval contains 0) |" in text
    assert "| lsvcr | recency | +0.0500 | [+0.0300, +0.0700] | significant |" in text
    assert "**paired**" not in text  # a table, not a JSON dump
    assert "not significant" in capsys.readouterr().out  # printed too
