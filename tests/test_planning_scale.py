"""Planning in bounded memory: ids checked by remote tasks, shards cut from Parquet metadata.

The in-process check (`prepare`, small plans) is covered by tests/test_stages.py and
tests/test_inputs.py; here the remote path, which `run` takes for plans above
`ids.IN_PROCESS_ROWS`, runs on the session's real local Ray.

Run: .venv/bin/python -m pytest tests/test_planning_scale.py -q
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import parse_job
from pipeline.planning import ids
from pipeline.planning.manifest import ManifestError, plan


def _job(tmp_path, **over):
    data = {
        "input": {"uri": str(tmp_path / "m")},
        "output": {"uri": str(tmp_path / "out"), "rows_per_shard": 3},
        "task": {"kind": "caption"},
        "model": {"visual": "/m/visual", "llm": "/m/llm"},
    }
    data.update(over)
    return parse_job(data)


def _write(tmp_path, name: str, keys: list, row_group_size: int = 2) -> None:
    (tmp_path / "m").mkdir(exist_ok=True)
    table = pa.table({"id": pa.array(keys, pa.string()), "image": [f"/x/{k}" for k in keys]})
    pq.write_table(table, tmp_path / "m" / name, row_group_size=row_group_size)


@pytest.fixture
def remote_only(monkeypatch):
    """Every plan counts as large: `plan` leaves the ids to the remote check."""
    monkeypatch.setattr(ids, "IN_PROCESS_ROWS", 0)
    monkeypatch.setattr(ids, "ROWS_PER_PARTITION", 4)  # several partitions even for a few rows


def test_large_plans_leave_the_ids_to_run_and_cut_shards_from_metadata(tmp_path, remote_only):
    _write(tmp_path, "a.parquet", ["a0", "a1", "a2", "a3", "a4"])
    _write(tmp_path, "b.parquet", ["b0", "a3"])  # a duplicate across files
    p = plan(_job(tmp_path))
    assert not p.ids_checked  # no id was read in the driver
    assert [(s.start, s.end) for s in p.shards] == [(0, 3), (3, 5), (0, 2)]
    assert p.total_rows == 7


def test_remote_check_names_a_duplicate_across_files(ray_cluster, tmp_path, remote_only):
    _write(tmp_path, "a.parquet", [f"a{i}" for i in range(20)])
    _write(tmp_path, "b.parquet", ["b0", "a13", "b2"])
    p = plan(_job(tmp_path))
    with pytest.raises(
        ManifestError, match=r"1 ids repeat, e.g. 'a13' \(x2\) in .*a.parquet, .*b.parquet"
    ):
        ids.check_unique_ids(p, _job(tmp_path).storage, ray=True)


def test_remote_check_reports_a_null_id_and_passes_unique_ids(ray_cluster, tmp_path, remote_only):
    _write(tmp_path, "a.parquet", [f"a{i}" for i in range(9)])
    _write(tmp_path, "b.parquet", ["b0", "b1"])
    job = _job(tmp_path)
    ids.check_unique_ids(plan(job), job.storage, ray=True)  # unique: no error
    _write(tmp_path, "c.parquet", ["c0", None, "c2"])
    with pytest.raises(ManifestError, match=r"c.parquet: column 'id' is null at row 1"):
        ids.check_unique_ids(plan(job), job.storage, ray=True)


def test_run_checks_the_ids_before_any_model_work(
    ray_cluster, tmp_path, remote_only, tiny_checkpoint
):
    from pipeline.builder import run

    _write(tmp_path, "a.parquet", ["x", "y", "x"])

    def no_model():
        raise AssertionError("the model must not load when the ids repeat")

    with pytest.raises(ManifestError, match="'x' \\(x2\\)"):
        model = {"visual": str(tiny_checkpoint.visual_dir), "llm": str(tiny_checkpoint.llm_dir)}
        run(_job(tmp_path, model=model), loader=no_model)
    assert not (tmp_path / "out" / "shards").exists()
