"""Smoke config: seconds on 2 CPU cores; used by tests and CI.

    recsys pipeline --config configs/tiny.py --workdir runs/tiny
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
    base = Config()
    return dataclasses.replace(
        base,
        name="tiny",
        data=DataConfig(num_users=300, num_items=400, interactions_per_user=20, num_clusters=8,
                        num_genres=6, history_len=10),
        model=ModelConfig(embed_dim=16, hidden_dims=(32,), out_dim=16),
        ranker=RankerConfig(hidden_dims=(32,), steps=20, batch_size=32, negatives=7),
        train=TrainConfig(batch_size=64, num_steps=40, learning_rate=0.01, log_every=10),
        eval=EvalConfig(ks=(10, 50, 100)),
        serve=ServeConfig(num_candidates=50),
    )
