"""The accelerator check: training throughput in float32 and bfloat16, and sharding equality.

    python -m benchmarks.gpu --json docs/gpu.json      # on a GPU (or TPU) machine
    python -m benchmarks.report                         # renders docs/results.md "Accelerator"

One prepared script for a machine that is lent for minutes: it needs only jax, flax, optax,
orbax and numpy besides recsys (no ScaNN, Grain or TFDS: the data are recsys's synthetic
events, the examples are built in memory), and every run is a fresh interpreter, so a failure
names its run and the others still report.

1. Throughput: configs/quickstart.py's towers and synthetic data at `--batch` (8192), one
   process on the default backend, `train.compute_dtype` float32 then bfloat16: end-to-end
   examples/s (the loop's train/examples_per_sec, compile excluded), device-only examples/s
   and the final loss.
2. Sharding equality: the same small model trained with sgd for `--equality-steps` steps on
   the default backend's devices (mesh data x model = all of them x 1) and on 8 CPU devices
   (mesh 4 x 2, `--xla_force_host_platform_device_count=8`), float32 matmuls at full precision
   on both (`jax_default_matmul_precision=highest`: a GPU's default is TF32): the largest
   difference of the per-step losses, against `--tolerance`.

On the nvidia-h200 image (Python 3.12, jax 0.11.2 with CUDA, flax, optax, orbax, tqdm, rich),
recsys travels as the working tree (`PYTHONPATH=.`) and only tensorboardX is missing: carry its
wheel (`pip download --no-deps --only-binary=:all: tensorboardX==2.6.5 -d .whl` here, then
`pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and `PYTHONPATH=.:/tmp/site`
there; the device tool's README has the details). pyproject.toml asks for jax 0.10 (what CI
tests); the image's 0.11.2 with its CUDA plugin is what can run there (the plugin's wheels are
too large to carry), so a GPU run is also recsys's first on jax 0.11.

Writes JSON with: device (platform, device_kind, device_count of the default backend, as the
runs saw it; null if none ran),
throughput ({dtype: run}), bf16_speedup (bfloat16 / float32 end-to-end examples/s),
equality ({accelerator: run, cpu8: run, max_loss_diff, tolerance, equal}), provenance.
Without an accelerator everything runs on the CPU, which checks the script, not a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from benchmarks import provenance

ROOT = provenance.ROOT
QUICKSTART = ROOT / "configs" / "quickstart.py"
# Small and exact: no features or history pooling whose reductions differ by backend beyond
# summation order; sgd so the difference does not grow (see tests/test_sharding.py).
EQUALITY = ("model.embed_dim=16", "model.hidden_dims=(16,)", "model.out_dim=16",
            "model.use_features=false", "model.history_pooling=mean", "train.optimizer=sgd",
            "train.learning_rate=0.5", "train.embedding_optimizer=dense", "train.batch_size=512",
            "train.mined_negatives=0", "train.eval_every=0", "train.checkpoint_every=0")
TIMEOUT_S = 1800


def say(message: str) -> None:
    print(f"gpu: {message}", file=sys.stderr, flush=True)


# The child (its own interpreter) ---------------------------------------------------------------

def child(spec: dict) -> dict:
    """Trains configs/quickstart.py with spec["overrides"]; returns its metrics and losses."""
    import jax

    if spec.get("highest_precision"):
        jax.config.update("jax_default_matmul_precision", "highest")
    from recsys import config as config_lib
    from recsys import sharding
    from recsys.data import dataset
    from recsys.data.sources import load_raw
    from recsys.metrics_log import MetricsLog
    from recsys.train.loop import train_retrieval

    class Losses(MetricsLog):
        def __init__(self, workdir):
            super().__init__(workdir)
            self.losses: list[float] = []

        def write(self, stage, step, scalars):
            if "train/loss" in scalars:
                self.losses.append(float(scalars["train/loss"]))
            super().write(stage, step, scalars)

    cfg = config_lib.apply_overrides(config_lib.load(QUICKSTART),
                                     ["ranker.steps=0", *spec["overrides"]])
    ds = dataset.build(load_raw(cfg.data), cfg.data)
    mesh = sharding.make_mesh(cfg.mesh)
    workdir = pathlib.Path(spec["workdir"])
    with Losses(workdir) as log:
        m = train_retrieval(cfg, ds, workdir, mesh, log=log).metrics
    device = jax.devices()[0]
    return {"platform": device.platform, "device_kind": device.device_kind,
            "devices": jax.device_count(), "mesh": dict(mesh.shape),
            "batch_size": cfg.train.batch_size, "compute_dtype": cfg.train.compute_dtype,
            "steps": int(m["train/steps"]),
            "examples_per_sec": m["train/examples_per_sec"],
            "device_examples_per_sec": m.get("train/device_examples_per_sec"),
            "seconds": m["train/seconds"], "final_loss": m["train/final_loss"],
            "losses": log.losses}


def run(overrides: list[str], *, cpu_devices: int = 0, highest_precision: bool = False) -> dict:
    """`child` in a fresh interpreter: on the default backend, or on `cpu_devices` CPU devices."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if cpu_devices:
        env.update(JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={cpu_devices}")
    with tempfile.TemporaryDirectory(prefix="recsys-gpu-") as tmp:
        spec = {"overrides": overrides, "workdir": str(pathlib.Path(tmp) / "run"),
                "highest_precision": highest_precision}
        code = ("import json, sys; from benchmarks.gpu import child; "
                "print(json.dumps(child(json.loads(sys.argv[1]))))")
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}",
                "overrides": overrides}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8192, help="throughput batch size")
    p.add_argument("--steps", type=int, default=300, help="throughput steps per run")
    p.add_argument("--equality-steps", type=int, default=20)
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest per-step loss difference accelerator vs 8 CPU devices")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)

    # This process never starts a backend: on a GPU, JAX would take most of its memory from the
    # children. The accelerator's runs use all its devices (mesh.data=-1) and say which they are.
    mesh = ["mesh.data=-1", "mesh.model=1"]
    throughput = {}
    for dtype in ("float32", "bfloat16"):
        say(f"throughput: batch {args.batch}, {args.steps} steps, compute_dtype={dtype}")
        throughput[dtype] = run([*mesh, f"train.batch_size={args.batch}",
                                 f"train.num_steps={args.steps}", "train.eval_every=0",
                                 "train.checkpoint_every=0", f"train.log_every={args.steps}",
                                 f"train.compute_dtype={dtype}"])
    ok = [throughput[d].get("examples_per_sec") for d in ("float32", "bfloat16")]
    result: dict = {"throughput": throughput,
                    "bf16_speedup": ok[1] / ok[0] if all(ok) else None}

    steps = [f"train.num_steps={args.equality_steps}", "train.log_every=1", *EQUALITY]
    say(f"sharding equality: {args.equality_steps} sgd steps, all devices x 1 vs 8 CPU devices "
        "4 x 2")
    here = run([*mesh, *steps], highest_precision=True)
    cpu8 = run(["mesh.data=4", "mesh.model=2", *steps], cpu_devices=8, highest_precision=True)
    diff = (max(abs(a - b) for a, b in zip(here["losses"], cpu8["losses"], strict=True))
            if "losses" in here and "losses" in cpu8 else None)
    result["equality"] = {"accelerator": here, "cpu8": cpu8, "max_loss_diff": diff,
                          "tolerance": args.tolerance,
                          "equal": diff is not None and diff <= args.tolerance}
    seen = next((r for r in (*throughput.values(), here) if "platform" in r), None)
    result["device"] = ({"platform": seen["platform"], "device_kind": seen["device_kind"],
                         "device_count": seen["devices"]} if seen else None)
    say(f"device: {result['device']}")
    result["provenance"] = provenance.record()
    provenance.emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
