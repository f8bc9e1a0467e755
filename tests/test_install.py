"""What `make install` promises: DeepSpeed's CPU shared-memory op is prebuilt, never JIT-compiled."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # a python subprocess that starts DeepSpeed's distributed backend

SCRIPT = """
import sys, deepspeed
deepspeed.init_distributed(dist_backend="gloo")
print("LOADED", "deepspeed.ops.comm.deepspeed_shm_comm_op" in sys.modules)
"""


def test_deepspeed_shm_op_is_prebuilt(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "TORCH_EXTENSIONS_DIR": str(ext), "DS_ACCELERATOR": "cpu",
           "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED True" in out.stdout
    assert list(ext.iterdir()) == []  # nothing was compiled at run time
