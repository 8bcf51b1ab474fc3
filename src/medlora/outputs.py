"""Output directories medlora owns: it writes only into them, and replaces only what it wrote there.

Every command that writes a directory claims it first (`claim_output_dir`), before any work:

* a new or empty directory is taken, and `.medlora-owned.json` records the command and the names and patterns
  of what it writes there (train: `adapter`, `metrics.json`, `checkpoint-*`, ...);
* a directory that holds only what medlora (this command, or another that owns a sub-directory) wrote is
  taken again with `--overwrite` — which then removes those entries, old checkpoints included — or, for a
  resumed run, kept as it is; without either it is refused;
* a directory holding anything else (a user's file, a repository's README, the input data itself), a path
  that is a file, or a directory that contains one of the command's inputs, is refused with one line;
* the directory must be writable: a probe file is created and removed, so a read-only or full file system is
  reported before the work, not after it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Sequence

from medlora.errors import MedloraError

MANIFEST = ".medlora-owned.json"

# what each command writes into its output directory (names and fnmatch patterns, top level only)
WRITES = {
    "train": ("adapter", ".adapter.partial", "metrics.json", "MODEL_CARD.md", "skipped.jsonl", "medlora_phases.jsonl", ".medlora.lock",
              "runs", "checkpoint-*"),
    "eval": ("predictions.jsonl", "summary.json", "skipped.jsonl"),
    "prepare": (".medlora-prepare-*", "dataset_dict.json", "train", "eval", "test", "prepare_summary.json", "skipped.jsonl"),
    "sweep": ("trial-*", "optuna.journal*", "sweep.json", "results.csv", "results.md", "results.png", ".*.tmp.png",
              "best.yaml", ".medlora.lock"),
    "export": ("*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
               "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
               "README.md", "medlora_export.json"),
}


def _owned_patterns(directory: Path) -> tuple[str, ...] | None:
    try:
        data = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        return tuple(data["writes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# what any command may leave behind if killed mid-write: its temporary names (never a user's file name)
TEMPORARY = (".medlora-probe-*", ".*.tmp-*", "*.json.tmp", "*.jsonl.tmp")


def _is_owned(entry: Path, patterns: Iterable[str]) -> bool:
    if entry.name == MANIFEST or any(fnmatch.fnmatch(entry.name, p) for p in (*patterns, *TEMPORARY)):
        return True
    return entry.is_dir() and not entry.is_symlink() and (entry / MANIFEST).is_file()  # another command's dir


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except (ValueError, OSError):
        return False


def check_writable(directory: Path, option: str) -> None:
    """Create `directory` if needed and write (then remove) a 4 kB probe file in it: a read-only, full or missing
    file system is one line before the work, not a traceback after it."""
    probe = Path(directory) / f".medlora-probe-{os.getpid()}"
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"0" * 4096)
    except OSError as err:
        raise MedloraError(f"{option} {directory}: cannot write there ({err.strerror or err})") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def claim_output_dir(path: str | Path, command: str, overwrite: bool = False, keep: bool = False,
                     inputs: Sequence[str | Path] = (), option: str = "--output_dir", before_changes=None) -> Path:
    """Take `path` for `command` (see the module docstring). `keep`: an existing run of this command is kept as
    it is (a resume). `before_changes()` runs once the checks passed and before anything is removed or written
    (train takes its run lock there). Returns the directory, created and writable."""
    directory = Path(path)
    if str(path).strip() == "":
        raise MedloraError(f"{option} is empty; name a directory")
    writes = WRITES[command]
    if directory.is_symlink() and not directory.exists():
        raise MedloraError(f"{option} {directory}: a symbolic link to nothing (or a link loop)")
    if directory.exists() and not directory.is_dir():
        raise MedloraError(f"{option} {directory} is a file, not a directory")
    for item in inputs:
        if item and Path(item).exists() and _inside(Path(item), directory):
            raise MedloraError(f"{option} {directory} holds the input {item}: medlora never writes into its inputs' "
                               "directory; choose another output directory")
    if directory.is_dir():
        owned = _owned_patterns(directory)
        theirs = owned if owned is not None else writes  # a directory from before the manifest: judged by names
        entries = sorted(directory.iterdir(), key=lambda p: p.name)
        foreign = [e.name for e in entries if not _is_owned(e, theirs)]
        if foreign:
            raise MedloraError(f"{option} {directory} holds files medlora did not write "
                               f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); it writes only into "
                               "a new or empty directory, or one it wrote before: choose another")
        ours = [e for e in entries if e.name not in (MANIFEST, ".medlora.lock")]
        if ours and not keep and not overwrite:
            what = "a run" if command == "train" else f"the output of medlora {command}"
            raise MedloraError(f"{directory} already holds {what} ({', '.join(e.name for e in ours[:3])}); pass "
                               "--overwrite true to replace it" + (", --resume_from_checkpoint auto to continue it,"
                                                                   if command == "train" else "")
                               + " or choose another directory")
        if before_changes is not None:
            before_changes()
        if ours and not keep:
            for entry in ours:  # only what medlora wrote: the foreign check above left nothing else
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    elif before_changes is not None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MedloraError(f"{option} {directory}: cannot write there ({err.strerror or err})") from None
        before_changes()
    check_writable(directory, option)
    record = {"command": command, "writes": sorted(set(writes) | set(_owned_patterns(directory) or ())),
              "claimed": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_atomic(directory / MANIFEST, json.dumps(record, indent=1) + "\n")
    return directory


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write to a temporary name beside `path`, then rename: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def claim_output_file(path: str | Path, marker: str, option: str = "--output") -> Path:
    """A file medlora may write: new, or one it wrote before (its first line is `marker`); never an input."""
    target = Path(path)
    if target.is_dir():
        raise MedloraError(f"{option} {target} is a directory; name a file")
    if target.exists():
        try:
            first = target.read_text(encoding="utf-8", errors="replace").splitlines()[:1]
        except OSError as err:
            raise MedloraError(f"{option} {target}: cannot read it ({err.strerror or err})") from None
        if first != [marker]:
            raise MedloraError(f"{option} {target} exists and was not written by medlora; it is never overwritten: "
                               "name a new file")
    if not target.parent.is_dir():
        raise MedloraError(f"{option} {target}: its directory {target.parent} does not exist")
    return target
