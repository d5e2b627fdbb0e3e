"""bench/ingest_scale.py's plan stage on a small simulated index: the index it writes is the one
the workers would write (every row in its study's partition), and the plan tasks it times run."""

from __future__ import annotations

import pyarrow.parquet as pq
from bench_support import load_bench

from hlip.ingest import partitions


def test_simulated_index_partitions_rows_as_the_workers_do_and_plans(tmp_path):
    bench = load_bench("ingest_scale")
    parts = bench.simulated_index(tmp_path, 1000, 4)
    work = tmp_path / "plan-work"
    seen, studies = 0, set()
    for partition, units in parts:
        for unit in units:
            rows = pq.read_table(
                partitions._fragment(work, partitions.INDEX_DIR, partition, unit)
            ).to_pylist()
            assert all(partitions.row_partition(row, 4) == partition for row in rows)
            assert [row["file_id"] for row in rows] == sorted(row["file_id"] for row in rows)
            studies.update(row["StudyInstanceUID"] for row in rows)
        seen += bench._plan_only(partition, units, work)
    template = bench.index_sources([tmp_path / "plan-template"])
    copies = -(-1000 // template.num_rows)
    assert seen == copies * template.num_rows
    assert len(studies) == copies * len(set(template["StudyInstanceUID"].to_pylist()))
