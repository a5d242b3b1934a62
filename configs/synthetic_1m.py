"""configs/synthetic_10m.py at a million items: the same path, a minute on 2 cores.

    recsys pipeline --config configs/synthetic_1m.py --workdir runs/synthetic_1m
"""

import dataclasses
import pathlib

from recsys import config


def get_config() -> config.Config:
    base = config.load(pathlib.Path(__file__).with_name("synthetic_10m.py"))
    return dataclasses.replace(base, name="synthetic-1m", data=dataclasses.replace(
        base.data, num_users=20_000, num_items=1_000_000))
