"""A local run's Ray listens on the loopback only: GCS, raylet, workers and agents (Ray's default binds
them on every interface, and its metrics exporter answers without a token). Real Ray, in a subprocess
so that the session's own Ray (tests/conftest.py) is not the one measured."""
from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import json, os, time, types
    import psutil, ray
    from pipeline.config import RayConfig
    from pipeline.executor import RAY

    with RAY.session(RayConfig(num_cpus=1)):
        @ray.remote
        def pid():
            return os.getpid()
        ray.get(pid.remote())   # a worker is up and serving
        time.sleep(2)           # the agents open their ports after the node starts
        session = os.path.basename(ray._private.worker._global_node.get_session_dir_path())
        mine = [p for p in psutil.process_iter() if p.pid == os.getpid() or session in " ".join(p.cmdline())]
        listening = sorted({(p.name(), c.laddr.ip) for p in mine for c in p.net_connections("inet")
                            if c.status == psutil.CONN_LISTEN})
    print(json.dumps(listening))
""")


def loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return addr.is_loopback or (addr.version == 6 and addr.ipv4_mapped is not None and addr.ipv4_mapped.is_loopback)


def test_a_local_run_listens_on_the_loopback_only(tmp_path):
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    listening = json.loads(out.stdout.strip().splitlines()[-1])
    names = {name for name, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening
    assert [(name, ip) for name, ip in listening if not loopback(ip)] == []
