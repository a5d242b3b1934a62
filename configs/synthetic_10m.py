"""A catalogue of 10 million items, end to end on one 2-core, 24 GiB machine (the scale path).

    recsys pipeline --config configs/synthetic_10m.py --workdir runs/synthetic_10m

The quickstart's towers and serving depth on a catalogue 500x larger. Short training (the
quality need not be high): sparse row-wise updates for the tables, so a step does not touch
10M rows; evaluation on a seeded subset of users (exact ranking of every user over 10M items
would dominate the run); the index is a ScaNN tree tuned to recall@10 0.95 on validation
queries; no ranker (serving orders by the retrieval score).
metrics.json records memory/peak_rss_gib and seconds per stage.
"""

import dataclasses
import pathlib

from recsys import config


def get_config() -> config.Config:
    quickstart = config.load(pathlib.Path(__file__).with_name("quickstart.py"))
    return dataclasses.replace(
        quickstart,
        name="synthetic-10m",
        data=dataclasses.replace(quickstart.data, num_users=50_000, num_items=10_000_000,
                                 num_clusters=1000),
        ranker=config.RankerConfig(steps=0),  # a short run retrieves too few targets to rank
        train=config.TrainConfig(batch_size=1024, num_steps=300, learning_rate=0.01,
                                 embedding_optimizer="rowwise_adagrad", log_every=50),
        eval=config.EvalConfig(max_users=2000),
    )
