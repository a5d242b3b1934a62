"""Real data: any MovieLens 100K / 1M / latest directory.

    recsys pipeline --config configs/movielens.py --set data.path=../shared/data/ml-latest-small \
        --workdir runs/ml-small

Retrieval is tuned on the validation split of ml-latest-small (never on test): training uses
the train events and stops early on validation HR@10 (data.trained_on="train"), so the
validation event is never trained on. Chosen by the sweeps in docs/results.md (retrieval,
"Tuning"), each run with `python -m benchmarks.tune`:
  temperature 0.1 (over 0.03 / 0.05); top-128 in-batch hard negatives; 8 index-mined negatives
  per example (ranks 10-100, re-mined every epoch, one search per 4 events of a user); time
  features; no uniform negatives (no gain on validation); history 50 over 100, dropout 0 over
  0.2, learning rate 0.003 over 0.006; recency-weighted history pooling over attention with
  positions (validation HR@10 .1486 vs .1317, 3 seeds, in the full config), decay 0.8 over
  0.7 / 0.9 (.1486 vs .1470 / .1290).
"""

import dataclasses

from recsys.config import Config, DataConfig, ModelConfig, RankerConfig, ServeConfig, TrainConfig


def get_config() -> Config:
    return dataclasses.replace(
        Config(),
        name="movielens",
        data=DataConfig(source="movielens", path="", history_len=50, min_user_events=3,
                        trained_on="train"),
        model=ModelConfig(embed_dim=64, hidden_dims=(128,), out_dim=64,
                          history_pooling="recency", recency_decay=0.8, temperature=0.1,
                          time_features=True),
        # Ranker: few fresh training events (~1k on ml-latest-small), so a small parallel DCN-v2
        # without id embeddings (docs/results.md, ranking).
        ranker=RankerConfig(structure="parallel", embed_dim=4, steps=300, batch_size=64,
                            learning_rate=0.001, negatives=0, events="holdout", holdout_events=3,
                            eval_every=25, patience=6),
        train=TrainConfig(batch_size=512, num_steps=2000, learning_rate=0.003, eval_every=250,
                          early_stopping_patience=3, hard_negatives=128, mined_negatives=8,
                          mine_stride=4),
        serve=ServeConfig(num_candidates=200),
    )
