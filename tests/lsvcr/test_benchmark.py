import json

from lsvcr.benchmark import write_results


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
