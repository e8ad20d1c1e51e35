"""Relay's throughput on private RabbitMQ nodes: one node, or a three-node cluster.

Boots `--nodes` private nodes beside the system broker (`tests.private_broker`: their own
names, ports and folders; clustered when more than one), then runs `bench.e2e` with the
services' RELAY_AMQP_URL listing every node (each service connects to one of them, the
quorum queues have a member on each node and their leaders spread over them). Arguments
after `--` go to `bench.e2e`. Needs Debian's rabbitmq-server, as root.

    python -m bench.cluster --nodes 3 -- --stores postgresql --bots one-reply --modes services
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests import private_broker


def main() -> int:
    """Boot the nodes, run the benchmark against them, stop them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, choices=[1, 3], default=3)
    parser.add_argument("e2e", nargs=argparse.REMAINDER, help="-- then bench.e2e's options")
    options = parser.parse_args()
    if not private_broker.available():
        print("needs Debian's rabbitmq-server tools, as root", file=sys.stderr)
        return 2
    with (
        tempfile.TemporaryDirectory(prefix="relay-bench-cluster-") as folder,
        private_broker.private_cluster(Path(folder), size=options.nodes) as nodes,
    ):
        addresses = ",".join(node.url for node in nodes)
        print(f"{options.nodes} node(s): {[node.node for node in nodes]}", flush=True)
        env = {**os.environ, "RELAY_TEST_AMQP_URL": addresses}
        arguments = [a for a in options.e2e if a != "--"]
        return subprocess.run(
            [sys.executable, "-m", "bench.e2e", *arguments], env=env, check=False
        ).returncode


if __name__ == "__main__":
    sys.exit(main())
