"""The README's main job: the whole pipeline on built-in synthetic data, a few minutes on 2 cores.

    recsys pipeline --config configs/quickstart.py --workdir runs/quickstart
"""

import dataclasses

from recsys.config import Config, DataConfig, ModelConfig, RankerConfig, ServeConfig, TrainConfig


def get_config() -> Config:
    return dataclasses.replace(
        Config(),
        name="quickstart",
        data=DataConfig(num_users=20000, num_items=20000, interactions_per_user=30,
                        num_clusters=32, num_genres=16, history_len=20, seed=0),
        model=ModelConfig(embed_dim=32, hidden_dims=(64,), out_dim=32, history_pooling="recency",
                          recency_decay=0.9),
        ranker=RankerConfig(steps=400, batch_size=128),
        train=TrainConfig(batch_size=512, num_steps=1500, learning_rate=0.005, eval_every=500,
                          log_every=50),
        serve=ServeConfig(num_candidates=200),
    )
