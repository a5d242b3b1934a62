"""configs/synthetic_10m.py at a million items: the same path, a minute on 2 cores.

    recsys pipeline --config configs/synthetic_1m.py --workdir runs/synthetic_1m
"""

import dataclasses
import importlib.util
import pathlib


def get_config():
    path = pathlib.Path(__file__).with_name("synthetic_10m.py")
    spec = importlib.util.spec_from_file_location("synthetic_10m", path)
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    cfg = base.get_config()
    return dataclasses.replace(cfg, name="synthetic-1m", data=dataclasses.replace(
        cfg.data, num_users=20_000, num_items=1_000_000))
