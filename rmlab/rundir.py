"""One run per directory: a run never writes into a directory that another live run owns.

- Default run dirs are unique: ``conf/train.yaml`` and ``conf/eval.yaml`` end ``hydra.run.dir`` with
  ``${rmlab.unique:}``, a short suffix drawn once per process (registered by ``import rmlab``), so two runs
  started in the same second get two dirs.
- An explicit dir (``hydra.run.dir=D``) is claimed with a lock, ``claim_run_dir(D)``, at the start of a run: an
  advisory ``flock`` on ``D/.rmlab-run.lock``, held until the process exits. A second run in ``D`` while the
  first lives stops with ``RunDirBusy`` naming the dir, the pid that holds it and what to do. The kernel drops
  the lock when its process dies however it dies, so a SIGKILLed run leaves nothing that blocks
  ``ckpt_path=last`` in the same dir; the pid in the file is only there for the message.
- Multirun job dirs are one flat folder each: ``hydra.sweep.subdir`` is ``${rmlab.job_dir:...}``, the job's number and
  overrides with ``/`` made ``_`` (an override such as ``model.name_or_path=runs/a/export`` would otherwise nest
  the job dir five levels deep) and a name too long for a file system cut, with a hash of the whole kept.
- A new run in a dir that holds an earlier run's outputs (an explicit ``hydra.run.dir`` used again, no
  ``ckpt_path``) first moves them into ``<dir>/previous/<time>/``, ``set_aside_earlier_run``, and says so:
  its config, metrics, CSV, checkpoints and export are kept, not overwritten or renamed ``-v1``.
- Only the launching process claims: the other DDP ranks (``LOCAL_RANK``/``RANK``/``SLURM_PROCID`` > 0) share
  the dir of rank 0 and skip it. Multirun jobs keep Hydra's sweep layout; each job claims its own dir.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import os
import secrets
import socket
import time
from pathlib import Path

from omegaconf import OmegaConf

LOCK_NAME = ".rmlab-run.lock"

_unique: str | None = None
_held: dict[str, RunDirLock] = {}  # this process's claims, by resolved path


def unique_suffix() -> str:
    """A short suffix, drawn once per process: the same value every time it is asked for in this process."""
    global _unique
    if _unique is None:
        _unique = secrets.token_hex(3)
    return _unique


MAX_DIR_NAME = 200  # bytes; file systems allow 255 for one name, and Hydra's own files need no more room


def job_dir_name(num, overrides) -> str:
    """One path component for a multirun job: ``<num>_<overrides>`` with every ``/`` (and ``\\``) made ``_``.

    Hydra's ``override_dirname`` keeps the values as typed, so a path or hub name in an override
    (``model.name_or_path=org/model``) would turn the job dir into nested folders. A name over
    ``MAX_DIR_NAME`` bytes keeps its start and ends with a hash of the whole, so two jobs still differ."""
    name = f"{num}_{overrides or ''}".replace("/", "_").replace("\\", "_")
    if len(name.encode()) > MAX_DIR_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = name.encode()[: MAX_DIR_NAME - 12].decode(errors="ignore") + "~" + digest
    return name


def nested_job_dir(output_dir: str | os.PathLike) -> Path | None:
    """This multirun job's dir as rmlab named it before job dirs were flat (``<sweep dir>/<num>_<overrides>``, a
    ``/`` in an override nesting it), when that is another dir and exists: a sweep started then and resumed now
    with ``ckpt_path=last`` has its checkpoints there (``rmlab.checkpoint.resolve_ckpt_path`` says so). None
    outside a Hydra multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:  # not inside a Hydra app (tests, notebooks)
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    old = Path(hc.sweep.dir) / f"{hc.job.num}_{hc.job.override_dirname or ''}"
    if old.resolve() == Path(output_dir).resolve() or not old.is_dir():
        return None
    return old


def register_resolvers() -> None:
    """``${rmlab.unique:}`` and ``${rmlab.job_dir:num,overrides}`` for the run-dir names in conf/*.yaml.
    Safe to call more than once."""
    if not OmegaConf.has_resolver("rmlab.unique"):
        OmegaConf.register_new_resolver("rmlab.unique", unique_suffix)
    if not OmegaConf.has_resolver("rmlab.job_dir"):
        OmegaConf.register_new_resolver("rmlab.job_dir", job_dir_name)


class RunDirBusy(RuntimeError):
    """Another live process owns the run dir."""


class RunDirLock:
    """This process's claim on a run dir; ``release()`` (or process exit) gives it up."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        _held.pop(str(self.path), None)
        if fd is None:
            return
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def launching_process() -> bool:
    """False in the processes a launcher added for the other ranks (they share rank 0's run dir)."""
    for var in ("LOCAL_RANK", "RANK", "SLURM_PROCID", "NODE_RANK"):
        value = os.environ.get(var, "0")
        if value.isdigit() and int(value) > 0:
            return False
    return True


def _owner(lock_file: Path) -> dict:
    for _ in range(20):  # the holder writes its pid right after taking the lock
        try:
            text = lock_file.read_text()
            if text.strip():
                return json.loads(text)
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}


def _busy(run_dir: Path, owner: dict) -> RunDirBusy:
    pid, host = owner.get("pid", "?"), owner.get("host", "?")
    since = owner.get("started")
    when = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
    return RunDirBusy(
        f"run dir {run_dir} is in use by another run: pid {pid} on {host}{when} ({LOCK_NAME} there). "
        f"Two runs in one dir would overwrite each other's config, metrics and checkpoints. Wait for it to finish "
        f"or stop it (kill {pid}), then rerun (with ckpt_path=last to resume it); or give this run another dir: "
        f"hydra.run.dir=<new dir>"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_run_dir(path: str | os.PathLike) -> RunDirLock:
    """Claim ``path`` for this run, or raise ``RunDirBusy`` when another live process holds it.

    Call once at the start of a run, after the dir exists. Returns the lock, held until ``release()`` or the
    process exits; a second claim of the same dir by the same process returns the same lock. In the extra
    processes of a multi-process launch (DDP ranks > 0) it claims nothing and returns an empty lock."""
    run_dir = Path(path).resolve()
    if not launching_process():
        return RunDirLock(run_dir, None)
    if str(run_dir) in _held:
        return _held[str(run_dir)]
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_file = run_dir / LOCK_NAME
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise _busy(run_dir, _owner(lock_file)) from None
        # No flock on this file system (some network mounts): judge by the recorded pid, when on this host.
        owner = _owner(lock_file) if lock_file.stat().st_size else {}
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) and owner["pid"] != os.getpid():
            if _alive(owner["pid"]):
                os.close(fd)
                raise _busy(run_dir, owner) from None
    except ImportError:  # no fcntl (Windows): no lock, as before
        pass
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    lock = RunDirLock(run_dir, fd)
    _held[str(run_dir)] = lock
    atexit.register(lock.release)
    return lock


PREVIOUS = "previous"
# Left in place: Hydra's own files (rewritten before rmlab runs; its log is appended to and held open), this run's
# lock, and the earlier runs already set aside.
_STAY = {".hydra", LOCK_NAME, PREVIOUS}


def run_kind(cfg) -> str | None:
    """``train`` or ``eval`` for an rmlab run's config (a mapping with a ``task_name``), None for anything else. By
    what the config holds, not its ``task_name``: the experiments name their own (``experiment=odin_alpaca``'s runs
    are ``odin_alpaca``), and a training config is the one with a ``trainer``."""
    name = cfg.get("task_name") if hasattr(cfg, "get") else None
    if not isinstance(name, str) or not name:
        return None
    return "train" if "trainer" in cfg else "eval"


def set_aside_earlier_run(path: str | os.PathLike, kind: str) -> Path | None:
    """Move an earlier run's outputs out of ``path`` into ``path/previous/<its time>/`` before a new run of the
    same kind (``train``, ``eval``: ``run_kind``) writes there; returns that folder, or None when ``path`` holds no
    earlier rmlab run (no ``config.yaml`` with a ``task_name``) or this is not the launching process. Everything at
    the top of the dir moves except ``_STAY`` and ``*.log``.

    A run of the other kind there (``eval.py`` pointed into a training run's dir) is ``RunDirBusy``: this run would
    write its ``config.yaml`` and ``metrics.json`` over that run's, and setting that run aside would move the
    checkpoints an eval reads."""
    run_dir = Path(path)
    config = run_dir / "config.yaml"
    if not launching_process() or not config.is_file():
        return None
    try:
        earlier = run_kind(OmegaConf.load(config))
    except Exception:  # a config.yaml that is not rmlab's (or is torn): not ours to move
        return None
    if earlier is None:
        return None
    if earlier != kind:
        what = "a training" if earlier == "train" else "an eval"
        raise RunDirBusy(
            f"{run_dir} holds {what} run (its config.yaml): {kind}.py would write its config.yaml and metrics.json "
            f"over that run's. Give this run a dir of its own: leave hydra.run.dir unset (a new dir under outputs/) "
            f"or pass another hydra.run.dir."
        )
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(config.stat().st_mtime))
    dest = run_dir / PREVIOUS / stamp
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir / PREVIOUS / f"{stamp}_{n}"
    dest.mkdir(parents=True)
    for entry in sorted(run_dir.iterdir()):
        if entry.name not in _STAY and not (entry.is_file() and entry.suffix == ".log"):
            entry.rename(dest / entry.name)
    return dest
