import pytest

from lsvcr import cli


def test_jobs_submit_passes_the_stage_and_its_overrides(monkeypatch, capsys):
    from lsvcr import jobs

    calls = []
    monkeypatch.setattr(jobs, "submit", lambda stage, overrides, address=None: calls.append((stage, overrides, address)) or "job-1")
    assert cli.main(["jobs", "submit", "continuous", "workdir=/w", "every_examples=50", "--address", "http://h:1"]) == 0
    assert calls == [("continuous", ["workdir=/w", "every_examples=50"], "http://h:1")]
    assert "job-1" in capsys.readouterr().out


def test_jobs_actions_other_than_submit_and_list_need_a_job_id():
    with pytest.raises(SystemExit, match="JOB_ID"):
        cli.main(["jobs", "logs"])


def test_registry_publish_refuses_a_features_uri_into_a_local_registry(tmp_path):
    from lsvcr.cli import main

    with pytest.raises(SystemExit, match="is a URI, but the registry .* is a local folder"):
        main(["registry", "publish", "--registry", str(tmp_path / "reg"), "--checkpoint", str(tmp_path / "ckpt"),
              "--features", "s3://bucket/features"])
    assert not (tmp_path / "reg").exists()
