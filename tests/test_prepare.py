"""recsys prepare: records are the training examples in order, the spec says what they are, a
half-written or foreign directory never passes for a prepared one, and Beam writes the same."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from recsys import cli
from recsys.config import DataConfig
from recsys.data import dataset, prepare
from recsys.data.batches import example_inputs, storage_order
from recsys.data.grain_input import PreparedData
from recsys.data.schema import DataError
from recsys.data.sources import load_raw

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
CFG = DataConfig(num_users=60, num_items=80, interactions_per_user=12, num_clusters=4,
                 num_genres=5, history_len=6)


@pytest.fixture(scope="module")
def ds():
    return dataset.build(load_raw(CFG), CFG)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> pathlib.Path:
    return prepare.prepare(CFG, tmp_path_factory.mktemp("prep") / "tiny", num_shards=3)


def _all_rows(path):
    data = PreparedData.open(path)
    return data.read(np.arange(data.num_examples))


def test_record_i_is_training_example_i_across_shards(prepared, ds):
    positions = ds.train_positions(CFG.trained_on, CFG.max_examples_per_user)
    spec = json.loads((prepared / prepare.SPEC).read_text())
    assert len(spec["tfds"]["shard_lengths"]) == 3  # TFDS's shards, read as one sequence
    got_positions, got = _all_rows(prepared)
    np.testing.assert_array_equal(got_positions, positions)
    want = example_inputs(ds, positions)
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_above_a_window_records_are_stored_pre_shuffled_a_window_per_shard(ds, tmp_path):
    cfg = dataclasses.replace(CFG, shuffle_window=100)
    out = prepare.prepare(cfg, tmp_path / "windowed")
    positions = ds.train_positions(cfg.trained_on, cfg.max_examples_per_user)
    spec = json.loads((out / prepare.SPEC).read_text())
    assert spec["data"]["shuffle_window"] == 100
    assert all(n <= 100 for n in spec["tfds"]["shard_lengths"])  # a window reads 1-2 shards
    assert len(spec["tfds"]["shard_lengths"]) == -(-len(positions) // 100)
    got_positions, got = _all_rows(out)
    np.testing.assert_array_equal(got_positions,
                                  positions[storage_order(len(positions), 100)])
    assert not np.array_equal(got_positions, positions)
    np.testing.assert_array_equal(got["history"], example_inputs(ds, got_positions)["history"])
    with pytest.raises(DataError, match="data.shuffle_window=100, but the config has "
                                        "data.shuffle_window=2097152"):
        PreparedData.open(out, expect=CFG)


def test_spec_and_tables_describe_the_examples(prepared, ds):
    spec = json.loads((prepared / prepare.SPEC).read_text())
    positions = ds.train_positions(CFG.trained_on, CFG.max_examples_per_user)
    assert spec["num_examples"] == len(positions) and spec["num_events"] == len(ds.seq_items)
    assert spec["history_len"] == CFG.history_len
    assert spec["vocab"]["item_rows"] == ds.items.size
    assert spec["vocab"]["user_rows"] == ds.users.size
    assert spec["vocab"]["user_cardinalities"] == list(ds.features.user_cardinalities)
    assert spec["data"] == prepare.data_fields(CFG) and "prepared" not in spec["data"]
    names = [f["name"] for f in spec["features"]]
    assert names == ["index", "position", *example_inputs(ds, positions[:1])]
    assert {"name": "history", "dtype": "int32", "shape": [CFG.history_len]} in spec["features"]
    data = PreparedData.open(prepared, expect=CFG)
    np.testing.assert_array_equal(data.item_counts, ds.item_counts(positions))
    np.testing.assert_array_equal(data.features.item_genres, ds.features.item_genres)
    np.testing.assert_array_equal(data.features.user_features, ds.features.user_features)
    np.testing.assert_array_equal(data.item_ids[1:], ds.items.ids[1:])
    assert data.features.user_cardinalities == ds.features.user_cardinalities


def test_an_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    out = tmp_path / "prep"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "_write_tables", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(CFG, out)
    assert not out.exists() and (tmp_path / "prep.tmp" / "recsys_examples").is_dir()
    with pytest.raises(DataError, match="no such directory"):
        PreparedData.open(out)
    with pytest.raises(DataError, match="still going or was interrupted"):
        PreparedData.open(tmp_path / "prep.tmp")
    monkeypatch.undo()
    prepare.prepare(CFG, out)  # a new run clears the leftover and finishes
    assert PreparedData.open(out).num_examples > 0 and not (tmp_path / "prep.tmp").exists()


def test_prepare_replaces_a_prepared_directory_but_nothing_else(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a prepared directory"):
        prepare.prepare(CFG, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    out = prepare.prepare(CFG, tmp_path / "p")
    out = prepare.prepare(DataConfig(**{**prepare.data_fields(CFG), "history_len": 3}), out)
    assert PreparedData.open(out).history_len == 3 and not (tmp_path / "p.old").exists()


def _copy(prepared, tmp_path):
    import shutil
    return pathlib.Path(shutil.copytree(prepared, tmp_path / "copy"))


def test_opening_a_mismatching_directory_fails_with_one_clear_line(prepared, tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        PreparedData.open(tmp_path / "nothing")
    with pytest.raises(DataError, match="not a prepared directory, no spec.json; write it with"):
        PreparedData.open(tmp_path)
    other = DataConfig(**{**prepare.data_fields(CFG), "history_len": 9, "num_users": 61})
    with pytest.raises(DataError) as e:
        PreparedData.open(prepared, expect=other)
    assert "data.history_len=6, but the config has data.history_len=9" in str(e.value)
    assert "(and 1 more: num_users)" in str(e.value) and "\n" not in str(e.value)
    copy = _copy(prepared, tmp_path)
    spec = json.loads((copy / prepare.SPEC).read_text())
    (copy / prepare.SPEC).write_text(json.dumps({**spec, "format_version": 99}))
    with pytest.raises(DataError, match="version 99, but this recsys reads"):
        PreparedData.open(copy)
    (copy / prepare.SPEC).write_text(json.dumps({**spec, "num_examples": 5}))
    with pytest.raises(DataError, match="records, but spec.json says 5"):
        PreparedData.open(copy)
    (copy / prepare.SPEC).write_text("{")
    with pytest.raises(DataError, match="spec.json: not JSON"):
        PreparedData.open(copy)
    extra = {"name": "extra", "dtype": "int32", "shape": []}
    (copy / prepare.SPEC).write_text(json.dumps({**spec, "features": spec["features"] + [extra]}))
    with pytest.raises(DataError, match="cannot decode as spec.json's features"):
        PreparedData.open(copy)
    (copy / prepare.SPEC).write_text(json.dumps(spec))
    (copy / prepare.TABLES).unlink()
    with pytest.raises(DataError, match="damaged .*tables.npz.*; prepare it again"):
        PreparedData.open(copy)


def test_a_beam_worker_builds_the_dataset_from_the_data_config(prepared):
    data_json = json.dumps(prepare.data_fields(CFG), sort_keys=True)
    assert data_json not in prepare._DATASETS  # as in a fresh worker process
    try:
        keys, examples = zip(*prepare._chunk_examples(0, data_json))
    finally:
        prepare._DATASETS.pop(data_json, None)
    data = PreparedData.open(prepared)
    assert list(keys) == list(range(data.num_examples))
    rows = np.stack([e[prepare.FEATURE] for e in examples]).view(data._dtype)[:, 0]
    positions, inputs = data.read(np.arange(data.num_examples))
    np.testing.assert_array_equal(rows["position"], positions)
    np.testing.assert_array_equal(rows["history"], inputs["history"])


@pytest.mark.parametrize("window", [None, 100])
def test_beam_direct_runner_writes_the_same_records(prepared, tmp_path, window):
    pytest.importorskip("apache_beam")
    cfg = CFG
    if window:  # stored pre-shuffled, a shard per window, either way
        cfg = dataclasses.replace(CFG, shuffle_window=window)
        prepared = prepare.prepare(cfg, tmp_path / "in_process")
    out = prepare.prepare(cfg, tmp_path / "beam", beam_options=["--runner=DirectRunner"])
    spec_a = json.loads((prepared / prepare.SPEC).read_text())
    spec_b = json.loads((out / prepare.SPEC).read_text())
    assert {**spec_a, "tfds": None} == {**spec_b, "tfds": None}
    (pa, a), (pb, b) = _all_rows(prepared), _all_rows(out)
    np.testing.assert_array_equal(pa, pb)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_cli_prepare(tmp_path, capsys):
    out = tmp_path / "p"
    argv = ["prepare", "--config", TINY, "--out", str(out), "--set", "data.num_users=40"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"written to {out}" in printed and f"--set data.prepared={out}" in printed
    assert PreparedData.open(out).spec["num_users"] == 40
    assert cli.main(["prepare", "--config", TINY, "--out", str(out), "--beam-options", "x"]) == 2
    assert "--beam-options needs --beam" in capsys.readouterr().err
    assert cli.main(["prepare", "--config", TINY, "--out", str(out / "spec.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists and is not a prepared directory" in err[0], err
