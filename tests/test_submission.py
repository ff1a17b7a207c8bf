"""Submission files against the original's writer (pipeline.npz item 5): precision, cut, rows,
parquet types and compression, file names, atomic writes."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from dwise_jax import submission


def _err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_precision_equals_fixture(pipeline_fixture):
    f, meta = pipeline_fixture
    for m in range(len(meta["fake_dataset"]["mice"])):
        expected = f[f"submission/mouse{m}/precision"]
        got = submission.precision(f[f"fake/mouse{m}/std"])
        assert got.shape == expected.shape and _err(got, expected) < 1e-5


def test_precision_by_hand():
    std = np.array([[1.0, 2.0, 0.0, np.nan], [4.0, 0.001, 1.0, 1.0]], np.float32)
    threshold = 0.01 * np.nanmean(std)
    expected = np.array([[1.0, 0.5, 1 / threshold, 1 / threshold],
                         [0.25, 1 / threshold, 1.0, 1.0]])
    np.testing.assert_allclose(submission.precision(std), expected, rtol=1e-6)


@pytest.mark.parametrize("split", sorted(submission.SPLIT_FILES))
def test_split_file_equals_fixture(pipeline_fixture, tmp_path, split):
    f, meta = pipeline_fixture
    mice = meta["fake_dataset"]["mice"]
    tables = []
    for m, name in enumerate(mice):
        tiers = f[f"fake/mouse{m}/tiers"]
        preds = {int(t): f[f"submission/mouse{m}/pred/{t}"] for t in np.flatnonzero(tiers == split)}
        tables.append(submission.mouse_table(name, f[f"fake/mouse{m}/unit_ids"],
                                             f[f"fake/mouse{m}/std"], preds))
    path = submission.write_tables(submission.split_file(tmp_path, split), tables)
    info = meta["submission"]["splits"][split]
    assert path.name == info["file_name"]
    parquet = pq.ParquetFile(path)
    assert parquet.schema_arrow.names == list(submission.COLUMNS)  # no index column
    nested = "list<element: list<element: double>>"
    assert str(parquet.schema_arrow.field("prediction").type) == nested
    assert str(parquet.schema_arrow.field("neuron_ids").type) == "list<element: int64>"
    group = parquet.metadata.row_group(0)
    assert {group.column(i).compression for i in range(group.num_columns)} == {"BROTLI"}
    table = parquet.read().to_pylist()
    assert [(r["mouse"], r["trial_indices"]) for r in table] == [
        (r["mouse"], r["trial"]) for r in info["rows"]]
    for r, expected in zip(table, info["rows"], strict=True):
        got = np.array(r["prediction"])
        want = f[f"submission/{split}/row{expected['row']:02d}/prediction"]
        assert got.shape == want.shape and got.shape[1] == expected["kept_frames"]
        assert _err(got, want) < 1e-5
        m = expected["mouse_index"]
        assert r["neuron_ids"] == f[f"fake/mouse{m}/unit_ids"].tolist()
    assert [p.name for p in tmp_path.iterdir()] == [info["file_name"]]  # no temporary left


def test_unknown_split_and_neuron_mismatch(tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        submission.split_file(tmp_path, "oracle")
    with pytest.raises(ValueError, match="3 neurons, unit_ids has 2"):
        submission.mouse_table("m", np.array([1, 2]), np.ones((2, 300)), {0: np.ones((3, 300))})


def reference_rows(mouse, unit_ids, std, predictions) -> list[dict]:
    """The rows of one mouse as plain lists, trial by trial: the reference for mouse_table."""
    prec = submission.precision(std)
    return [{"mouse": mouse, "trial_indices": int(t),
             "prediction": submission.trial_prediction(predictions[t], prec).astype(
                 np.float64).tolist(),
             "neuron_ids": [int(u) for u in unit_ids]} for t in sorted(predictions)]


def test_mouse_table_equals_the_rows_in_bounded_memory(pipeline_fixture, tmp_path):
    import pyarrow as pa

    f, meta = pipeline_fixture
    split = "live_test_main"
    tables = []
    for m, name in enumerate(meta["fake_dataset"]["mice"]):
        tiers = f[f"fake/mouse{m}/tiers"]
        preds = {int(t): f[f"submission/mouse{m}/pred/{t}"] for t in np.flatnonzero(tiers == split)}
        args = (name, f[f"fake/mouse{m}/unit_ids"], f[f"fake/mouse{m}/std"], preds)
        table = submission.mouse_table(*args)
        rows = pa.Table.from_pylist(reference_rows(*args), schema=table.schema)
        assert table.equals(rows) and table.num_rows == len(preds)
        tables.append(table)
    # One file from one table per mouse (one row group each): the fixture's rows.
    path = submission.write_tables(submission.split_file(tmp_path, split), tables)
    info = meta["submission"]["splits"][split]
    read = pq.read_table(path).to_pylist()
    assert [(r["mouse"], r["trial_indices"]) for r in read] == [
        (r["mouse"], r["trial"]) for r in info["rows"]]
    for r, expected in zip(read, info["rows"], strict=True):
        want = f[f"submission/{split}/row{expected['row']:02d}/prediction"]
        assert _err(np.array(r["prediction"]), want) < 1e-5
    assert pq.ParquetFile(path).metadata.num_row_groups == len(tables)
