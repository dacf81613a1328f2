"""lightning-threadsafe: concurrent, thread-safe, self-tuning data loading for PyTorch Lightning.

Import names (see the README for the full contract)::

    from lightning_threadsafe import ThreadedDataLoader, ThreadedDataModule, LoaderConfig
    from lightning_threadsafe.callbacks import LoaderMonitor, AutoTuner
"""

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

__version__ = "0.1.0"

__all__ = [
    "CudaStreamScheduler",
    "DeadlockDetector",
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
    "check_thread_safety",
    "sample_rng",
    "sample_torch_generator",
]
