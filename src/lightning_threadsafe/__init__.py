"""lightning-threadsafe: concurrent, thread-safe, self-tuning data loading for PyTorch Lightning.

Import names (see the README for the full contract)::

    from lightning_threadsafe import ThreadedDataLoader, ThreadedDataModule, LoaderConfig
    from lightning_threadsafe.callbacks import LoaderMonitor, AutoTuner
"""

from typing import TYPE_CHECKING

from lightning_threadsafe.bottleneck import Bottleneck, BottleneckDetector, Verdict
from lightning_threadsafe.checker import ThreadSafetyReport, check_thread_safety
from lightning_threadsafe.config import LoaderConfig
from lightning_threadsafe.cuda_stream import CudaStreamScheduler
from lightning_threadsafe.deadlock import DeadlockDetector
from lightning_threadsafe.errors import LoaderStallError, PotentialDeadlockError, SampleLoadError
from lightning_threadsafe.loader import ThreadedDataLoader
from lightning_threadsafe.manager import ThreadSafetyManager
from lightning_threadsafe.memory import MemoryGovernor
from lightning_threadsafe.resources import ThreadLocalResource, ThreadSafeResource
from lightning_threadsafe.rng import sample_rng, sample_torch_generator
from lightning_threadsafe.tuning import HillClimbTuner

if TYPE_CHECKING:
    from lightning_threadsafe.datamodule import ThreadedDataModule

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The Lightning layer is imported on first use, so `import lightning_threadsafe`
    # stays cheap for plain-PyTorch users (importing lightning takes seconds).
    if name == "ThreadedDataModule":
        from lightning_threadsafe.datamodule import ThreadedDataModule

        return ThreadedDataModule
    raise AttributeError(f"module 'lightning_threadsafe' has no attribute {name!r}")

__all__ = [
    "Bottleneck",
    "BottleneckDetector",
    "CudaStreamScheduler",
    "DeadlockDetector",
    "HillClimbTuner",
    "LoaderConfig",
    "LoaderStallError",
    "MemoryGovernor",
    "PotentialDeadlockError",
    "SampleLoadError",
    "ThreadLocalResource",
    "ThreadSafeResource",
    "ThreadSafetyManager",
    "ThreadSafetyReport",
    "ThreadedDataLoader",
    "ThreadedDataModule",
    "Verdict",
    "check_thread_safety",
    "sample_rng",
    "sample_torch_generator",
]
