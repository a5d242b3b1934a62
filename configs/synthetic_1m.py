"""A catalogue of 1 million items, end to end on one 2-core, 24 GiB machine (the scale path).

    recsys pipeline --config configs/synthetic_1m.py --workdir runs/synthetic_1m

Short training (the quality need not be high): sparse row-wise updates for the tables, so a
step does not touch 1M rows; evaluation on a seeded subset of users (exact ranking of every
user over 1M items would dominate the run); the index is a ScaNN tree tuned to recall@10 0.95
on validation queries; no ranker (serving orders by the retrieval score).
metrics.json records memory/peak_rss_gib and seconds per stage.
"""

import dataclasses

from recsys.config import (
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RankerConfig,
    ServeConfig,
    TrainConfig,
)


def get_config() -> Config:
    return dataclasses.replace(
        Config(),
        name="synthetic-1m",
        data=DataConfig(num_users=20_000, num_items=1_000_000, interactions_per_user=30,
                        num_clusters=1000, num_genres=16, history_len=20, seed=0),
        model=ModelConfig(embed_dim=32, hidden_dims=(64,), out_dim=32, history_pooling="recency",
                          recency_decay=0.9),
        ranker=RankerConfig(steps=0),  # a short run retrieves too few targets to rank
        train=TrainConfig(batch_size=1024, num_steps=300, learning_rate=0.01,
                          embedding_optimizer="rowwise_adagrad", log_every=50),
        eval=EvalConfig(max_users=2000),
        serve=ServeConfig(num_candidates=200),
    )
