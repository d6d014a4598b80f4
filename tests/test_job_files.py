"""Every example job file in jobs/ validates, says how to run it, and holds no secrets.

Run: python -m pytest tests/test_job_files.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.submit import submission_id
from pipeline.config import load_job
from pipeline.planning.manifest import KNOWN_COLUMNS
from tests.test_infra import find_secrets

ROOT = Path(__file__).resolve().parents[1]
JOB_FILES = sorted((ROOT / "jobs").glob("*.yaml"))


def test_the_three_example_jobs_exist() -> None:
    names = {p.name for p in JOB_FILES}
    assert {"caption_dataset.yaml", "nightly_labeling.yaml", "multi_question.yaml"} <= names


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_job_file_validates(path: Path) -> None:
    job = load_job(path)
    assert job.name and job.output.uri and job.model.visual and job.model.llm


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_job_file_says_how_to_run_it(path: Path) -> None:
    header = path.read_text(encoding="utf-8").split("\nname:")[0]
    rel = f"jobs/{path.name}"
    assert f"ziya-batch run {rel}" in header, f"{rel}: header lacks the `ziya-batch run` command"
    assert f"ziya-batch submit {rel}" in header, f"{rel}: header lacks the `submit` command"


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_job_file_holds_no_secrets(path: Path) -> None:
    assert find_secrets(yaml.safe_load(path.read_text(encoding="utf-8"))) == []


def test_each_use_is_configured_as_documented() -> None:
    caption = load_job(ROOT / "jobs/caption_dataset.yaml")
    nightly = load_job(ROOT / "jobs/nightly_labeling.yaml")
    multi = load_job(ROOT / "jobs/multi_question.yaml")
    assert caption.task.kind == "caption"
    assert nightly.task.kind == "vqa" and nightly.run.mode == "incremental"
    assert multi.task.kind == "vqa"
    # The manifest column the VQA files tell users to fill is one the pipeline reads.
    assert "questions" in KNOWN_COLUMNS
    for path in ("jobs/nightly_labeling.yaml", "jobs/multi_question.yaml"):
        assert "`questions`" in (ROOT / path).read_text(encoding="utf-8")


def test_example_jobs_have_distinct_names_and_submission_ids() -> None:
    jobs = [load_job(p) for p in JOB_FILES]
    assert len({j.name for j in jobs}) == len(jobs)
    assert len({submission_id(j) for j in jobs}) == len(jobs)


def test_each_input_kind_has_an_example_job() -> None:
    """The README's inputs, side by side: a manifest, img2dataset's parquet and webdataset
    outputs, and a prefix of images, each with a job file in jobs/."""
    inputs = [load_job(p).input for p in JOB_FILES]
    assert any(i.uri and i.format == "parquet" and not i.columns for i in inputs)
    assert any(i.columns.get("image_bytes") == "jpg" for i in inputs)
    assert any(i.format == "webdataset" for i in inputs)
    assert any(i.images for i in inputs)
