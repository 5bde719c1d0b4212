"""Where a run happened: code version, library versions and hardware.

Everything degrades silently: a missing git, library, GPU or NVML leaves its field empty instead of
failing the run that asked.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

# Distribution names to report; the first installed name of each group wins (CPU and GPU builds differ).
LIBRARIES = {
    "recops": ("recops",),
    "torch": ("torch",),
    "torchrec": ("torchrec",),
    "fbgemm_gpu": ("fbgemm-gpu", "fbgemm-gpu-cpu", "fbgemm_gpu_nightly"),
    "ray": ("ray",),
    "numpy": ("numpy",),
    "pandas": ("pandas",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime-gpu", "onnxruntime"),
}
SOURCE_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class CodeVersion:
    git_sha: str | None = None
    dirty: bool = False


@dataclass(frozen=True)
class Environment:
    """Code version, library versions and hardware of one process."""

    code: CodeVersion = field(default_factory=CodeVersion)
    libraries: dict[str, str] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Environment:
        return cls(CodeVersion(**data.get("code", {})), dict(data.get("libraries", {})), dict(data.get("hardware", {})))


def _git(*args: str, cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def code_version(root: Path = SOURCE_ROOT) -> CodeVersion:
    """The git commit of the source tree and whether tracked files differ from it (untracked files don't count)."""
    sha = _git("rev-parse", "HEAD", cwd=root)
    if sha is None:
        return CodeVersion()
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=root)
    return CodeVersion(git_sha=sha.strip(), dirty=bool(status and status.strip()))


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape a model (from package metadata, without importing them)."""
    versions = {"python": platform.python_version()}
    for name, dists in LIBRARIES.items():
        for dist in dists:
            try:
                versions[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where present)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _torch_gpus() -> list[str]:
    torch = sys.modules.get("torch")
    if torch is None:  # don't pay for importing torch just to look
        return []
    try:
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - a broken CUDA setup must not fail the caller
        return []


def _nvml_gpus() -> list[str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            names = [
                pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                for i in range(pynvml.nvmlDeviceGetCount())
            ]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver, no library, no GPU: all mean "none seen"
        return []
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def hardware() -> dict[str, Any]:
    """Host, CPU model and count, memory, and GPU names as torch and NVML see them."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count() or 0,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpus": _torch_gpus(),
        "nvml_gpus": _nvml_gpus(),
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return info


def capture() -> Environment:
    return Environment(code=code_version(), libraries=library_versions(), hardware=hardware())
