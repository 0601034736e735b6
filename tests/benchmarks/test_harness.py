import json

import pytest

from benchmarks.harness import write_results


def test_results_file_and_markdown_section_are_written_and_replaced(tmp_path):
    write_results("ingest", {"events_per_s": 1234.5, "notes": "first"}, root=tmp_path)
    write_results("serve", {"rps": 10}, root=tmp_path)
    write_results("ingest", {"events_per_s": 999.0}, root=tmp_path)
    result = json.loads((tmp_path / "benchmarks" / "results" / "ingest.json").read_text())
    assert result["events_per_s"] == 999.0
    assert {"machine", "git_commit", "when"} <= set(result)
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert md.count("## ingest") == 1 and md.count("## serve") == 1
    assert "| `events_per_s` | 999 |" in md and "first" not in md
    # The command that made the figures is recorded and heads the section.
    write_results("quality_freshness", {"users": 5}, root=tmp_path, command="lsvcr benchmark quality set=freshness")
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "`lsvcr benchmark quality set=freshness` on " in md and "`lsvcr benchmark ingest` on " in md


def test_nested_metric_tables_stay_in_the_results_file_and_out_of_the_markdown_rows(tmp_path):
    quality = {"video": {"lsvcr": {"ndcg@10": 0.5}}, "users": 20, "notes": "the table"}
    write_results("quality", quality, root=tmp_path)
    result = json.loads((tmp_path / "benchmarks" / "results" / "quality.json").read_text())
    assert result["video"]["lsvcr"]["ndcg@10"] == 0.5
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| `users` | 20 |" in md and "`video`" not in md and "the table" in md


def test_overrides_are_cast_to_the_defaults_types_and_unknown_keys_refused():
    from benchmarks.harness import parse_overrides

    opts = parse_overrides("x", {"users": 10, "workdir": "/tmp", "rate": 0.5}, ["users=20", "rate=2"])
    assert opts == {"users": 20, "workdir": "/tmp", "rate": 2.0}
    with pytest.raises(SystemExit, match="unknown override 'userz'"):
        parse_overrides("x", {"users": 10}, ["userz=1"])
