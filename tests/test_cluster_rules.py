"""The cluster rules that need no cluster: which paths are refused, and why, before any Ray work."""

from __future__ import annotations

import pytest

from segevo_pipeline.cluster import ClusterError, PathUse, in_ray_job, is_uri, refuse_relative


def test_uris_and_absolute_paths_pass_relative_ones_are_refused_naming_the_key():
    refuse_relative([PathUse("train.storage_path", "s3://bucket/runs", True),
                     PathUse("train.output", "/mnt/shared/adapter", True)], "why")
    with pytest.raises(ClusterError, match=r"^train.output 'models/adapter' is relative: because; give an abs"):
        refuse_relative([PathUse("train.output", "models/adapter", True)], "because")
    assert is_uri("gs://b/x") and is_uri("s3://b") and not is_uri("file:///tmp/x") and not is_uri("/abs")
    assert not is_uri("C:/windows")  # a drive letter is not a scheme


def test_a_submitted_job_is_recognised(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert not in_ray_job()
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets for the driver
    assert in_ray_job()
