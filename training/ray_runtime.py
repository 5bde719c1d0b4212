"""One command's Ray: attach to a cluster at an address, or start a local Ray that dies with the command.

A local Ray gets a short, pid-named temp directory (socket paths are limited; one left by a killed command is
removed by the next) unless the user set ``RAY_TMPDIR``, and its processes (GCS, raylet, agents, workers) are
reaped when the command ends, even by SIGKILL (``recops.processes.reaped``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping

from recops.errors import RecopsError
from recops.files import remove_stale, temp_dir
from recops.processes import reaped

LOCAL_RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}  # setdefault'ed; users override them


@contextlib.contextmanager
def ray_session(
    address: str | None,
    cpus: int | None = None,
    local_env: Mapping[str, str] = LOCAL_RAY_ENV,
    object_store_bytes: int | None = None,
) -> Iterator[None]:
    """Attach to the Ray cluster at ``address``, or start a local Ray of ``cpus`` CPUs (default: the machine's) with
    ``local_env`` set unless already set; always shut it down."""
    import ray

    if ray.is_initialized():
        raise RecopsError("a Ray session is already running in this process; run the command in a fresh process")
    made_tmp = None
    with contextlib.ExitStack() as local:
        if not address:
            for key, value in local_env.items():
                os.environ.setdefault(key, value)
            if not os.environ.get("RAY_TMPDIR"):  # unset or empty: ours to make
                remove_stale(tempfile.gettempdir(), "ray")  # those of killed commands
                made_tmp = os.environ["RAY_TMPDIR"] = str(temp_dir(tempfile.gettempdir(), "ray"))
            local.enter_context(reaped())
        _init(address, cpus, object_store_bytes)
        try:
            yield
        finally:
            ray.shutdown()
    if made_tmp:  # kept (with Ray's logs) when the command failed, until the next one
        del os.environ["RAY_TMPDIR"]
        shutil.rmtree(made_tmp, ignore_errors=True)


def _init(address: str | None, cpus: int | None, object_store_bytes: int | None) -> None:
    import ray

    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        else:
            ray.init(
                num_cpus=cpus or os.cpu_count() or 1,
                include_dashboard=False,
                object_store_memory=object_store_bytes,
                log_to_driver=False,
                logging_level="WARNING",
            )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        ray.shutdown()
        raise RecopsError(f"cannot {'attach to Ray at ' + address if address else 'start a local Ray'}: {exc}") from exc
