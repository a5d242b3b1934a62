"""configs/movielens.py runs unchanged on MovieLens 100K and 1M layouts (only data.path differs)."""

import json
import pathlib

import numpy as np
import pytest

from benchmarks import ablation
from recsys import artifacts, cli
from recsys import config as config_lib

GENRES = ("Action", "Comedy", "Drama", "Romance", "Sci-Fi")


def fake_movielens(root, layout: str, num_users: int = 48, num_items: int = 160,
                   seed: int = 0):
    """Writes a small ml-100k or ml-1m directory: ratings, movies with genres and years, users."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    ratings = []
    for u in range(1, num_users + 1):
        count = int(rng.integers(8, 40))
        for k, item in enumerate(rng.choice(np.arange(1, num_items + 1), count, replace=False)):
            ratings.append((u, int(item), int(rng.integers(1, 6)), 880000000 + 1000 * u + k))
    years = rng.integers(1950, 2000, num_items)
    genre_flags = rng.random((num_items, len(GENRES))) < 0.3
    if layout == "ml-100k":
        (root / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))
        lines = []
        for i in range(num_items):
            flags = "|".join(str(int(f)) for f in [not genre_flags[i].any(), *genre_flags[i]]
                             + [False] * (19 - 1 - len(GENRES)))
            lines.append(f"{i + 1}|Movie {i + 1} ({years[i]})|01-Jan-{years[i]}||http://x|{flags}\n")
        (root / "u.item").write_text("".join(lines), encoding="latin-1")
        (root / "u.user").write_text("".join(
            f"{u}|{rng.integers(10, 70)}|{'MF'[u % 2]}|job{u % 5}|0000{u}\n"
            for u in range(1, num_users + 1)))
    elif layout == "ml-1m":
        (root / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ratings))
        (root / "movies.dat").write_text("".join(
            f"{i + 1}::Movie {i + 1} ({years[i]})::"
            f"{'|'.join(g for g, f in zip(GENRES, genre_flags[i]) if f) or 'Drama'}\n"
            for i in range(num_items)), encoding="latin-1")
        (root / "users.dat").write_text("".join(
            f"{u}::{'MF'[u % 2]}::{[1, 18, 25, 35][u % 4]}::{u % 21}::0000{u}\n"
            for u in range(1, num_users + 1)))
    else:
        raise ValueError(layout)
    return root


@pytest.mark.e2e
@pytest.mark.parametrize("layout, command", [("ml-1m", "pipeline"), ("ml-100k", "train")])
def test_movielens_config_runs_unchanged_on_100k_and_1m_layouts(tmp_path, layout, command,
                                                                 capsys):
    data = fake_movielens(tmp_path / layout, layout)
    workdir = tmp_path / "run"
    # Only data.path differs from the config; the step counts just keep the test short (the
    # whole funnel on one layout, retrieval training on the other).
    sets = [f"data.path={data}", "train.num_steps=4", "train.eval_every=2",
            f"ranker.steps={2 if command == 'pipeline' else 0}"]
    code = cli.main([command, "--config", "configs/movielens.py", "--workdir", str(workdir),
                     *[a for s in sets for a in ("--set", s)]])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["dataset"] == layout and metrics["num_users"] == 48
    assert metrics["train/steps"] == 4
    if command == "pipeline":
        assert 0.0 <= metrics["retrieval/hr@10"] <= 1.0
        assert artifacts.published(workdir / "artifacts") is not None


def test_ablation_rows_that_were_kept_add_up_to_the_config():
    base = config_lib.load("configs/movielens.py")
    last_kept = max(i for i, (_, _, keep) in enumerate(ablation.ROWS) if keep)
    rebuilt = config_lib.apply_overrides(base, ["data.path=x", *ablation.row_overrides(last_kept)])
    assert rebuilt == config_lib.apply_overrides(base, ["data.path=x"])
    # The first row really is the plain model.
    plain = config_lib.apply_overrides(base, ["data.path=x", *ablation.row_overrides(0)])
    assert plain.model.history_pooling == "mean" and not plain.train.logq_correction
    assert plain.train.uniform_negatives == plain.train.mined_negatives == 0


def test_ablation_reuses_a_run_only_for_the_same_configuration_and_code(tmp_path, monkeypatch):
    # A finished run is found again when its resolved config (config file after overrides, as
    # canonical JSON) and the recsys source hash are equal, and never when either changed.
    trained = []

    def fake_test(cfg):
        trained.append(cfg)
        return {"hr@10": 0.1, "hr@50": 0.2, "hr@100": 0.3, "ndcg@10": 0.05, "steps": 1,
                "seconds": 0.0}

    monkeypatch.setattr(ablation, "two_tower_test", fake_test)
    monkeypatch.setattr(ablation.baselines, "run", lambda *a: {
        "popularity": {"test": fake_test(None)}, "ease": {"lambda": 50.0, "test": fake_test(None)}})
    monkeypatch.setattr(ablation.provenance, "source_sha256", lambda: "sources A")
    config = tmp_path / "movielens.py"
    config.write_text(pathlib.Path(ablation.CONFIG).read_text())
    go = lambda previous: ablation.run("data", (0,), previous, log=lambda _: None,
                                       config=str(config))
    first = go(None)
    runs = len(trained)
    assert runs == 2 + len(ablation.ROWS) + len(ablation.CHANGES)  # baselines, then every row
    assert go(first)["rows"] == first["rows"] and len(trained) == runs
    # Later overrides win, so rows whose overrides amount to one config share one key.
    a = ablation.config_for("d", ["model.history_pooling=mean", "model.history_pooling=recency"], 0)
    assert a == ablation.config_for("d", ["model.history_pooling=recency"], 0)
    # A comment in the config file changes nothing; a changed value runs every row again.
    config.write_text(config.read_text() + "\n# a comment\n")
    assert go(first)["rows"] == first["rows"] and len(trained) == runs
    config.write_text(config.read_text().replace("recency_decay=0.8", "recency_decay=0.7"))
    second = go(first)
    assert len(trained) == 2 * runs - 2  # baselines reused: same data and sources
    assert all(c.model.recency_decay == 0.7 for c in trained[runs:])
    # Changed sources run everything again, the baselines too.
    monkeypatch.setattr(ablation.provenance, "source_sha256", lambda: "sources B")
    go(second)
    assert len(trained) == 3 * runs - 2
