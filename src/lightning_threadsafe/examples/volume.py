"""A synthetic electron-microscopy-style 3-D volume, cached on disk in z-chunks.

:func:`make_synthetic_volume` builds a ``uint8`` image that looks like a block of
neural tissue imaged by serial-section EM -- bright cells of slightly different
grey levels, separated by thin dark membranes, with dark organelles, fine
texture, a slow illumination gradient and shot noise -- and its segmentation
target, a binary membrane mask (``1`` on cell boundaries, ``0`` inside cells),
the classic EM boundary-detection task.

Cells are the regions of a weighted Voronoi diagram of jittered-grid seeds,
evaluated on coordinates warped by a smooth random field so that boundaries
curve. The diagram is computed at half resolution (each voxel looks at the 27
nearest grid cells) and upsampled with trilinear interpolation; smoothing uses
separable ``torch.nn.functional.conv3d``. The default 192^3 volume takes about
3 s on two CPU cores and 14 MiB on disk.

On-disk layout (one directory)::

    manifest.json                  # written last; see below
    raw_000.npy  labels_000.npy    # z in [0, chunk_depth)
    raw_001.npy  labels_001.npy    # z in [chunk_depth, 2 * chunk_depth)
    ...

Every ``.npy`` file is a plain C-ordered array, loadable with
``np.load(path, mmap_mode="r")``. ``manifest.json`` records the format version,
shape, chunk depth, seed, dtypes, the chunk z-ranges, the raw intensity mean and
standard deviation (for normalisation) and, for every file, its byte size and a
cheap checksum: the CRC-32 of its first and last 64 KiB. Truncation is always
detected (the size differs); corruption is detected when it touches the header
or the ends of a file.

Concurrency and crash safety:

- A volume is generated into a private temporary directory next to ``root``
  and moved into place with ``os.rename``, manifest included. A killed
  generation therefore leaves only a ``.<name>.tmp-*`` directory (removed by the
  next generation), never a ``root`` that looks valid.
- Generation runs under a lock file (``.<name>.lock`` next to ``root``, created
  with ``O_CREAT | O_EXCL``). Processes that find the volume missing -- e.g. the
  ranks of a DDP job starting together -- wait for the holder (bounded by
  ``lock_timeout``), then find the volume valid and reuse it. The holder touches
  the lock while it works; a lock whose owner process is gone, or that has not
  been touched for ``_STALE_AFTER_S`` seconds, is broken. The lock only avoids
  duplicate work: correctness rests on the atomic rename, so even two
  concurrent generators leave one complete, valid volume.
- Readers that already hold memory maps of an old volume keep reading it after
  a replacement (POSIX keeps unlinked files alive while they are mapped).

Example::

    from lightning_threadsafe.examples import make_synthetic_volume
    import numpy as np

    root = make_synthetic_volume()                   # generated once, then reused
    raw = np.load(root / "raw_000.npy", mmap_mode="r")   # (32, 192, 192) uint8
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import socket
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["make_synthetic_volume"]

# Bump whenever the generator or the layout changes: it is part of the default
# cache directory name and is checked against the manifest.
VOLUME_VERSION = 1
_FORMAT = "lightning_threadsafe.em_volume"
_MANIFEST = "manifest.json"
_CHECK_BYTES = 64 * 1024
_STALE_AFTER_S = 120.0
_MIN_SIDE = 8

# Generator constants, in full-resolution voxels / grey levels.
_CELL = 28.0  # jittered-grid spacing of the cell seeds (~ cell diameter)
_COARSE = 2  # the Voronoi diagram is computed at 1/_COARSE resolution
_MEMBRANE_WIDTH = 1.6  # width of the dark membrane profile
_MASK_THRESHOLD = 2.0  # boundary distance below which a voxel is "membrane"


def make_synthetic_volume(
    root: str | os.PathLike[str] | None = None,
    *,
    shape: Sequence[int] = (192, 192, 192),
    chunk_depth: int = 32,
    seed: int = 0,
    force: bool = False,
    lock_timeout: float = 600.0,
) -> Path:
    """Generate the synthetic EM volume into ``root`` unless a valid copy is there.

    A copy is valid when ``manifest.json`` parses, names this format version,
    ``shape``, ``chunk_depth`` and ``seed``, and every chunk file has the
    recorded byte size and checksum. Otherwise (missing, incomplete, truncated,
    corrupt, other parameters) the volume is regenerated and atomically replaces
    ``root``. Safe to call from several processes at once (see the module
    docstring).

    Args:
        root: directory that holds (or will hold) the volume. ``None`` selects
            ``$LTS_CACHE_DIR`` or ``~/.cache/lightning_threadsafe``, followed by
            ``em_volume_v<version>_<D>x<H>x<W>_c<chunk_depth>_s<seed>``, so
            different parameters never overwrite each other. An existing
            ``root`` that holds anything other than volume files is never
            deleted.
        shape: ``(D, H, W)`` in voxels, each at least 8.
        chunk_depth: slices per ``.npy`` chunk along z (the last chunk may be
            thinner).
        seed: seed of the generator; the same seed gives the same volume on a
            given machine and library version.
        force: regenerate even if a valid copy exists (unless another process
            finished generating it while this call waited for the lock).
        lock_timeout: longest wait, in seconds, for another process that is
            generating the same volume.

    Returns:
        The volume directory (holding ``manifest.json`` and the chunks).

    Raises:
        ValueError / TypeError: an argument is out of range or of the wrong type.
        FileExistsError: ``root`` exists and holds files that are not ours.
        TimeoutError: the lock stayed held for ``lock_timeout`` seconds.
    """
    shape_t = _check_shape(shape)
    if isinstance(chunk_depth, bool) or not isinstance(chunk_depth, int) or chunk_depth < 1:
        raise ValueError(f"chunk_depth={chunk_depth!r} must be a positive int")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative int")
    if not isinstance(lock_timeout, (int, float)) or not lock_timeout > 0:
        raise ValueError(f"lock_timeout={lock_timeout!r} must be a positive number of seconds")
    path = _default_root(shape_t, chunk_depth, seed) if root is None else Path(root)
    path = path.expanduser().absolute()
    params = {"shape": list(shape_t), "chunk_depth": chunk_depth, "seed": seed}

    if not force and _matches(_load_valid_manifest(path), params):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    with _exclusive_lock(lock, timeout=float(lock_timeout)) as waited:
        # Another process may have finished while we waited for the lock.
        if (not force or waited) and _matches(_load_valid_manifest(path), params):
            return path
        _remove_leftovers(path)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            _write_volume(tmp, shape_t, chunk_depth, seed, heartbeat=lambda: _touch(lock))
            _install(tmp, path, params)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# --------------------------------------------------------------------------- cache checks


def _default_root(shape: tuple[int, int, int], chunk_depth: int, seed: int) -> Path:
    base = os.environ.get("LTS_CACHE_DIR") or Path.home() / ".cache" / "lightning_threadsafe"
    d, h, w = shape
    return Path(base) / f"em_volume_v{VOLUME_VERSION}_{d}x{h}x{w}_c{chunk_depth}_s{seed}"


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape={shape!r} must be a sequence of 3 ints") from None
    if len(dims) != 3 or not all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= _MIN_SIDE
        for n in dims
    ):
        raise ValueError(f"shape={shape!r} must be 3 ints, each >= {_MIN_SIDE}")
    return int(dims[0]), int(dims[1]), int(dims[2])


def _checksum(path: Path, size: int) -> str:
    """CRC-32 of the first and last ``_CHECK_BYTES`` of a file (cheap, not cryptographic)."""
    with open(path, "rb") as f:
        crc = zlib.crc32(f.read(_CHECK_BYTES))
        f.seek(max(0, size - _CHECK_BYTES))
        crc = zlib.crc32(f.read(_CHECK_BYTES), crc)
    return f"{crc:08x}"


def _load_valid_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of the volume in ``root`` if it and every chunk check out, else ``None``.

    Checks the format and version, that the chunks tile ``[0, D)`` without gaps,
    and each file's byte size and checksum. Does not check the generation
    parameters (see :func:`_matches`): a dataset may read any valid volume.
    """
    try:
        manifest = json.loads((root / _MANIFEST).read_text())
        if manifest.get("format") != _FORMAT or manifest.get("version") != VOLUME_VERSION:
            return None
        depth = manifest["shape"][0]
        files = manifest["files"]
        z = 0
        for chunk in manifest["chunks"]:
            if chunk["z0"] != z or not chunk["z1"] > z:
                return None
            z = chunk["z1"]
            for name in (chunk["raw"], chunk["labels"]):
                info = files[name]
                file = root / name
                size = file.stat().st_size
                if size != info["bytes"] or _checksum(file, size) != info["crc32"]:
                    return None
        if z != depth:
            return None
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
    return manifest


def _matches(manifest: dict[str, Any] | None, params: dict[str, Any]) -> bool:
    return manifest is not None and all(manifest.get(k) == v for k, v in params.items())


# --------------------------------------------------------------------------- locking


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)


def _lock_is_stale(lock: Path) -> bool:
    try:
        age = time.time() - lock.stat().st_mtime
        host, pid = lock.read_text().split()
    except (OSError, ValueError):
        # Unreadable or half-written (its owner is between open and write):
        # only its age can tell.
        try:
            return time.time() - lock.stat().st_mtime > _STALE_AFTER_S
        except OSError:
            return False  # gone already: the next O_EXCL attempt decides
    if os.name == "posix" and host == socket.gethostname():
        try:
            os.kill(int(pid), 0)  # signal 0: existence check only
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            pass
    return age > _STALE_AFTER_S


@contextlib.contextmanager
def _exclusive_lock(lock: Path, *, timeout: float) -> Iterator[bool]:
    """Hold ``lock`` (an ``O_CREAT | O_EXCL`` file) for the ``with`` body.

    Yields whether the call had to wait for another holder. Waits by polling
    with a growing interval (<= 0.5 s) up to ``timeout`` seconds, breaking a
    stale lock (see :func:`_lock_is_stale`). Two waiters that both break the
    same stale lock may both proceed; the atomic install keeps that harmless.
    """
    deadline = time.monotonic() + timeout
    delay = 0.02
    waited = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _lock_is_stale(lock):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
                continue
            if time.monotonic() >= deadline:
                try:
                    owner = lock.read_text().strip()
                except OSError:
                    owner = "unknown"
                raise TimeoutError(
                    f"waited {timeout:.0f}s for the lock {lock} (held by {owner!r}); if no "
                    f"other process is generating this volume, delete the lock file"
                ) from None
            waited = True
            time.sleep(delay)  # bounded poll: no cross-process wakeup exists for a plain file
            delay = min(delay * 2, 0.5)
            continue
        try:
            os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
        break
    try:
        yield waited
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)


# --------------------------------------------------------------------------- install


def _is_volume_dir(path: Path) -> bool:
    """Whether ``path`` holds only files this module writes (so it may be replaced)."""
    for entry in path.iterdir():
        name = entry.name
        ours = name == _MANIFEST or (
            name.endswith(".npy") and name.startswith(("raw_", "labels_"))
        )
        if not ours or not entry.is_file():
            return False
    return True


def _remove_leftovers(path: Path) -> None:
    """Remove temporary/trash directories of killed generations (caller holds the lock)."""
    now = time.time()
    for prefix in (f".{path.name}.tmp-", f".{path.name}.trash-"):
        for leftover in path.parent.glob(prefix + "*"):
            # Age guard: a generator whose stale lock was broken may still be writing.
            with contextlib.suppress(OSError):
                if now - leftover.stat().st_mtime > _STALE_AFTER_S:
                    shutil.rmtree(leftover, ignore_errors=True)


def _install(tmp: Path, path: Path, params: dict[str, Any]) -> None:
    """Move the complete volume in ``tmp`` to ``path``, replacing an invalid one."""
    if path.is_symlink() or path.is_file():
        raise FileExistsError(f"root={str(path)!r} exists and is not a directory")
    trash = None
    if path.is_dir():
        if not _is_volume_dir(path):
            raise FileExistsError(
                f"root={str(path)!r} exists and holds files that are not part of a "
                f"synthetic volume; refusing to replace it (pass an empty or new directory)"
            )
        trash = path.parent / f".{path.name}.trash-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(FileNotFoundError):  # a concurrent installer moved it
            os.rename(path, trash)
    try:
        os.rename(tmp, path)
    except OSError:
        # Only reachable when two generators ran (a broken stale lock): keep
        # theirs if it is valid.
        if not _matches(_load_valid_manifest(path), params):
            raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------- generation


def _write_volume(
    out: Path,
    shape: tuple[int, int, int],
    chunk_depth: int,
    seed: int,
    *,
    heartbeat: Callable[[], None],
) -> None:
    raw, labels = _generate(shape, seed)
    heartbeat()
    files: dict[str, dict[str, Any]] = {}
    chunks = []
    for i, z0 in enumerate(range(0, shape[0], chunk_depth)):
        z1 = min(z0 + chunk_depth, shape[0])
        entry = {"z0": z0, "z1": z1, "raw": f"raw_{i:03d}.npy", "labels": f"labels_{i:03d}.npy"}
        for key, array in (("raw", raw), ("labels", labels)):
            file = out / entry[key]
            with open(file, "wb") as f:
                np.save(f, array[z0:z1])
                f.flush()
                os.fsync(f.fileno())
            size = file.stat().st_size
            files[entry[key]] = {"bytes": size, "crc32": _checksum(file, size)}
        chunks.append(entry)
        heartbeat()
    manifest = {
        "format": _FORMAT,
        "version": VOLUME_VERSION,
        "shape": list(shape),
        "chunk_depth": chunk_depth,
        "seed": seed,
        "dtype": {"raw": str(raw.dtype), "labels": str(labels.dtype)},
        "labels": "binary membrane mask: 1 on cell boundaries, 0 inside cells",
        "raw_mean": float(raw.mean()),
        "raw_std": float(raw.std()),
        "checksum": f"crc32 of the first and last {_CHECK_BYTES} bytes, hex",
        "chunks": chunks,
        "files": files,
    }
    # The manifest is written last: a directory without it is never valid.
    with open(out / _MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a ``(D, H, W)`` float tensor (replicate padding)."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = x[None, None]
    for axis in range(3):
        view = [1, 1, 1, 1, 1]
        view[2 + axis] = k.numel()
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r  # F.pad lists the last dim first
        y = F.conv3d(F.pad(y, pad, mode="replicate"), k.view(view))
    return y[0, 0]


def _generate(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The raw ``uint8`` image and the ``uint8`` membrane mask, both of ``shape``."""
    rng = np.random.default_rng(seed)

    def normal(*size: int) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal(size, dtype=np.float32))

    def uniform(lo: float, hi: float, *size: int) -> torch.Tensor:
        return torch.from_numpy(rng.uniform(lo, hi, size).astype(np.float32))

    # Coarse sample k sits at full-resolution index k * _COARSE, so an
    # align_corners upsample maps it back exactly.
    coarse = [(n - 1) // _COARSE + 2 for n in shape]
    axes = [torch.arange(c, dtype=torch.float32) * _COARSE for c in coarse]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)

    # Smooth random warp of the coordinates: curved, irregular cell boundaries.
    warp_grid = [max(2, n // 40 + 2) for n in shape]
    warp = F.interpolate(normal(1, 3, *warp_grid), size=coarse, mode="trilinear",
                         align_corners=True)
    warp = (warp[0].permute(1, 2, 3, 0) * 0.35 * _CELL).clamp(-0.9 * _CELL, 0.9 * _CELL)
    points = (points + warp).reshape(-1, 3)

    # One seed per grid cell, with a 2-cell margin so that the 27-cell search
    # around any (warped) point stays inside the grid.
    grid = [math.ceil(n / _CELL) + 4 for n in shape]
    n_seeds = grid[0] * grid[1] * grid[2]
    cell_index = torch.stack(
        torch.meshgrid(*[torch.arange(g, dtype=torch.float32) for g in grid], indexing="ij"), -1
    )
    seeds = ((cell_index - 2 + uniform(0.1, 0.9, *grid, 3)) * _CELL).reshape(-1, 3)
    weight = uniform(0.8, 1.25, n_seeds)  # multiplicative weights: varied sizes, curved walls
    intensity = uniform(150.0, 210.0, n_seeds)

    home = (points / _CELL).floor().long() + 2
    best = torch.full((points.shape[0],), math.inf)
    second = best.clone()
    owner = torch.zeros(points.shape[0], dtype=torch.long)
    for dz, dy, dx in itertools.product((-1, 0, 1), repeat=3):
        j = ((home[:, 0] + dz) * grid[1] + home[:, 1] + dy) * grid[2] + home[:, 2] + dx
        d = (points - seeds[j]).square().sum(1).sqrt() / weight[j]
        closer = d < best
        second = torch.where(closer, best, torch.minimum(second, d))
        owner = torch.where(closer, j, owner)
        best = torch.where(closer, d, best)
    # Boundary distance: ~twice the distance to the nearest cell wall.
    boundary = (second - best).reshape(coarse)
    cell_grey = intensity[owner].reshape(coarse)
    # Organelles: sparse dark blobs that are not membrane (distractors).
    impulses = torch.from_numpy((rng.random(coarse, dtype=np.float32) < 0.002).astype(np.float32))
    sigma = 1.0
    delta = torch.zeros(7, 7, 7)
    delta[3, 3, 3] = 1.0
    peak = float(_blur(delta, sigma)[3, 3, 3])  # a lone organelle's centre becomes 1
    organelles = (_blur(impulses, sigma) / peak).clamp(0.0, 1.0)

    size = [(c - 1) * _COARSE + 1 for c in coarse]
    fields = torch.stack([boundary, cell_grey, organelles])[None]
    fields = F.interpolate(fields, size=size, mode="trilinear", align_corners=True)
    d, h, w = shape
    boundary, cell_grey, organelles = fields[0, :, :d, :h, :w]
    del fields, points, warp, home

    mask = (boundary < _MASK_THRESHOLD).to(torch.uint8)
    image = cell_grey - 120.0 * torch.exp(-((boundary / _MEMBRANE_WIDTH) ** 2)) - 70.0 * organelles
    image = image + 30.0 * _blur(normal(*shape), 1.0)  # cytoplasm texture
    image = _blur(image, 0.8)  # point-spread function
    # Slow illumination drift and a left-right gradient.
    illumination = F.interpolate(normal(1, 1, 3, 3, 3), size=list(shape), mode="trilinear",
                                 align_corners=True)[0, 0]
    image = image * (1.0 + 0.08 * illumination + 0.08 * torch.linspace(-1.0, 1.0, w))
    image = image + 8.0 * normal(*shape)  # shot noise
    raw = image.round_().clamp_(0, 255).to(torch.uint8)
    return raw.numpy(), mask.numpy()
