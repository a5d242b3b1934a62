"""Fills launch/gke/jobset.yaml for a TPU slice or GPU node pool and applies it with kubectl.

    python launch/gke/render.py --name r1 --image IMAGE --num-hosts 4 \
        --tpu tpu-v5-lite-podslice --topology 4x4 --chips-per-host 4 -- \
        recsys train --config configs/quickstart.py --workdir /runs/r1
    python launch/gke/render.py ... --gpu nvidia-h100-80gb --gpus-per-host 8 -- recsys ...

--dry-run prints the kubectl command and the manifest instead of running it. The image must hold
this checkout with `recsys` installed; --workdir should be under --mount-path, a volume every
pod shares (a ReadWriteMany claim, e.g. Filestore).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import string
import subprocess
import sys

TEMPLATE = pathlib.Path(__file__).with_name("jobset.yaml")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="JobSet name (also its pods' DNS subdomain)")
    p.add_argument("--image", required=True)
    p.add_argument("--num-hosts", type=int, required=True, help="pods: one JAX process each")
    p.add_argument("--tpu", help="TPU accelerator, e.g. tpu-v5-lite-podslice")
    p.add_argument("--topology", help="TPU slice topology, e.g. 4x4")
    p.add_argument("--chips-per-host", type=int, default=4)
    p.add_argument("--gpu", help="GPU accelerator, e.g. nvidia-h100-80gb")
    p.add_argument("--gpus-per-host", type=int, default=8)
    p.add_argument("--port", type=int, default=8476, help="coordinator port on pod 0")
    p.add_argument("--claim", default="recsys-runs", help="PersistentVolumeClaim for workdirs")
    p.add_argument("--mount-path", default="/runs")
    p.add_argument("--max-restarts", type=int, default=0, help="JobSet restarts (resume from checkpoints)")
    p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command each pod runs")
    args = p.parse_args(argv)
    args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.command:
        p.error("give the command after --, e.g. -- recsys train --config ... --workdir ...")
    if bool(args.tpu) == bool(args.gpu):
        p.error("give exactly one of --tpu (with --topology) or --gpu")
    if args.tpu and not args.topology:
        p.error("--tpu needs --topology, e.g. 4x4")
    if args.num_hosts < 1:
        p.error("--num-hosts must be >= 1")
    if args.tpu:
        sizes = args.topology.split("x")
        if not all(size.isdigit() for size in sizes):
            p.error(f"--topology {args.topology}: expected sizes like 4x4 or 2x2x4")
        chips = 1
        for size in sizes:
            chips *= int(size)
        if chips != args.num_hosts * args.chips_per_host:
            p.error(f"--topology {args.topology} has {chips} chips, but --num-hosts "
                    f"{args.num_hosts} x --chips-per-host {args.chips_per_host} = "
                    f"{args.num_hosts * args.chips_per_host}")
    return args


def render(args: argparse.Namespace) -> str:
    if args.tpu:
        selector = {"cloud.google.com/gke-tpu-accelerator": args.tpu,
                    "cloud.google.com/gke-tpu-topology": args.topology}
        limits = {"google.com/tpu": args.chips_per_host}
    else:
        selector = {"cloud.google.com/gke-accelerator": args.gpu}
        limits = {"nvidia.com/gpu": args.gpus_per_host}
    fields = {"name": args.name, "image": args.image, "num_hosts": args.num_hosts,
              "port": args.port, "claim": args.claim, "mount_path": args.mount_path,
              "max_restarts": args.max_restarts, "command": json.dumps(args.command),
              "node_selector": json.dumps(selector), "limits": json.dumps(limits)}
    return string.Template(TEMPLATE.read_text()).substitute(fields)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    manifest = render(args)
    kubectl = ["kubectl", "apply", "-f", "-"]
    if args.dry_run:
        print(f"# {' '.join(kubectl)} <<'EOF'\n{manifest}EOF")
        return 0
    return subprocess.run(kubectl, input=manifest, text=True, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
