"""Three Ray nodes (ray.cluster_utils.Cluster, in a process of its own) give the shards one node gives:
planning, the shard tasks and the dedup shuffle spread over the nodes, byte for byte the same result."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import ROOT, shard_digests, vlp, write_config

CLUSTER = textwrap.dedent("""
    import sys
    from cluster.auth import secure_local_token
    secure_local_token()   # token auth on, as vlp's own local Ray
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    print(cluster.address, flush=True)
    sys.stdin.read()          # until the test closes it
    cluster.shutdown()
""")


def test_three_nodes_give_the_shards_of_one(tmp_path, toyweb, reference_run):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("RAY_AUTH_MODE", None)
    nodes = subprocess.Popen([sys.executable, "-c", CLUSTER], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        address = nodes.stdout.readline().strip()
        assert address, "the cluster did not start"
        cfg = write_config(tmp_path / "c.yaml", toyweb, ray={"address": address},
                           prefilter={"min_image_side": 32, "dedup_partitions": 3})
        vlp("run", str(cfg), "--run-dir", str(tmp_path / "run"), timeout=900)
        for stage in ("download", "prefilter"):
            assert shard_digests(tmp_path / "run" / "round-0" / stage) == \
                shard_digests(reference_run.stage(stage).path), stage
    finally:
        nodes.stdin.close()   # the helper shuts its cluster down by its own handle
        nodes.wait(timeout=120)
