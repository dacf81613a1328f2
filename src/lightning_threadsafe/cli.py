"""The ``lightning-threadsafe`` console script.

- ``lightning-threadsafe fit|validate|test|predict --config configs/quickstart.yaml``: a
  ``LightningCLI`` whose data module is any :class:`ThreadedDataModule` subclass
  (``class_path``) and whose model is any ``LightningModule``.
- ``lightning-threadsafe check-dataset <class_path> [--init_args JSON] [--threads N]``:
  runs :func:`check_thread_safety` on a dataset and exits 1 if it is not thread-safe.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning_threadsafe.config import LoaderConfig
from lightning_threadsafe.datamodule import ThreadedDataModule

__all__ = ["ThreadsafeCLI", "check_dataset_main", "main"]


class ThreadsafeCLI(LightningCLI):
    """``LightningCLI`` with ``ThreadedDataModule`` subclasses and any model by ``class_path``.

    Loader knobs are validated before anything is built: a bad value (``num_workers: -3``,
    ``memory_budget: lots``) ends the command with a parser error naming the field.
    """

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        for path, value in _loader_configs(config, "config"):
            try:
                LoaderConfig(**value)
            except (TypeError, ValueError) as exc:
                self.parser.error(f"{path}: {exc}")


def _loader_configs(node: Any, path: str) -> list[tuple[str, dict[str, Any]]]:
    """``(dotted path, fields)`` of every ``loader:`` section that looks like a LoaderConfig."""
    found: list[tuple[str, dict[str, Any]]] = []
    items = vars(node).items() if hasattr(node, "__dict__") and not isinstance(node, type) \
        else node.items() if isinstance(node, dict) else []
    for key, value in items:
        if key == "loader" and value is not None and not isinstance(value, LoaderConfig):
            fields = dict(vars(value)) if hasattr(value, "__dict__") else value
            if isinstance(fields, dict) and "num_workers" in fields:
                fields = {k: v for k, v in fields.items() if not k.startswith("_")}
                found.append((f"{path}.{key}", fields))
                continue
        if hasattr(value, "__dict__") or isinstance(value, dict):
            found.extend(_loader_configs(value, f"{path}.{key}"))
    return found


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"class_path={path!r} must be a dotted path like 'package.module.Class'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"class_path={path!r} cannot be imported: {exc}") from exc


def check_dataset_main(argv: Sequence[str]) -> int:
    """``lightning-threadsafe check-dataset``: returns the exit code (0 safe, 1 unsafe)."""
    from lightning_threadsafe.checker import check_thread_safety

    p = argparse.ArgumentParser(
        prog="lightning-threadsafe check-dataset",
        description="Load a dataset's samples serially and concurrently and report races.",
    )
    p.add_argument("class_path", help="dataset class, e.g. lightning_threadsafe.examples.EMCropDataset")
    p.add_argument("--init_args", default="{}", help="JSON object of constructor arguments")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max_samples", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(list(argv))
    try:
        init_args = json.loads(args.init_args)
    except json.JSONDecodeError as exc:
        p.error(f"--init_args={args.init_args!r} must be a JSON object: {exc}")
    if not isinstance(init_args, dict):
        p.error(f"--init_args={args.init_args!r} must be a JSON object")
    try:
        cls = _import(args.class_path)
    except ValueError as exc:
        p.error(str(exc))
    dataset = cls(**init_args)
    report = check_thread_safety(dataset, threads=args.threads, rounds=args.rounds,
                                 max_samples=args.max_samples)
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else str(report))
    return 0 if report.safe else 1


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code.

    ``args`` defaults to ``sys.argv[1:]``. LightningCLI exits through
    ``SystemExit`` on bad arguments or config values (its message names the field).
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "check-dataset":
        return check_dataset_main(argv[1:])
    ThreadsafeCLI(
        L.LightningModule,
        ThreadedDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
