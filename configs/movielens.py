"""Real data: any MovieLens 100K / 1M / latest directory.

    recsys pipeline --config configs/movielens.py --set data.path=../shared/data/ml-latest-small \
        --workdir runs/ml-small
"""

import dataclasses

from recsys.config import Config, DataConfig, ModelConfig, ServeConfig, TrainConfig


def get_config() -> Config:
    return dataclasses.replace(
        Config(),
        name="movielens",
        data=DataConfig(source="movielens", path="", history_len=50, min_user_events=3),
        model=ModelConfig(embed_dim=64, hidden_dims=(128,), out_dim=64, history_pooling="recency",
                          recency_decay=0.95, temperature=0.05,
                          # Ranker: few fresh training events (~1k on ml-latest-small), so a small
                          # parallel DCN-v2 without id embeddings (docs/results.md, ranking).
                          ranker_structure="parallel", ranker_embed_dim=4),
        train=TrainConfig(batch_size=512, num_steps=2000, learning_rate=0.003, eval_every=250,
                          early_stopping_patience=3, ranker_steps=300, ranker_batch_size=64,
                          ranker_learning_rate=0.001, ranker_negatives=0, ranker_events="holdout",
                          ranker_holdout_events=3, ranker_eval_every=25, ranker_patience=6),
        serve=ServeConfig(num_candidates=200),
    )
