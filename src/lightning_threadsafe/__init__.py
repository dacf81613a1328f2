"""lightning-threadsafe: concurrent, thread-safe, self-tuning data loading for Lightning."""

from lightning_threadsafe.config import LoaderConfig
from lightning_threadsafe.errors import LoaderStallError, PotentialDeadlockError, SampleLoadError
from lightning_threadsafe.rng import sample_rng, sample_torch_generator

__version__ = "0.1.0"

__all__ = [
    "LoaderConfig",
    "LoaderStallError",
    "PotentialDeadlockError",
    "SampleLoadError",
    "sample_rng",
    "sample_torch_generator",
]
