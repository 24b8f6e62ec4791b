"""Keep long measurements across machines: a run's finished cell results, without its models, in the repository.

A grid cell on the real-model track takes half an hour of CPU; the SmolLM2 seeds grid and its regime sweep are tens
of hours, more than one machine's lifetime here (runs/ is not kept). `save` copies every finished cell's result and
the run's recorded config from runs/NAME into benchmarks/runs/NAME (tracked, ~0.3 MB a cell); `restore` copies them
back into a fresh runs/NAME, where `qrunlearn run --resume` / `--cell N` skips them and `qrunlearn report --partial`
reads them. Each cell records its target by content (`target_identity`): a target trained again with other bits
makes the restored cells stale, and the run scores them again instead of mixing them in.

    .venv/bin/python benchmarks/archive_runs.py save smollm2-seeds regime-seeds-npo
    .venv/bin/python benchmarks/archive_runs.py restore smollm2-seeds regime-seeds-npo
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs"
ARCHIVE = ROOT / "benchmarks" / "runs"
# what a report is rebuilt from: the finished cells and the run's config; never models, data or reports (--prepare
# rebuilds the data and models, `report` the report), nor a lone --cell's cache of the retrain's reference (measured
# again in a minute where no references cell is done)
KEPT = ("result.json", "config.resolved.json")


def kept_files(run: Path) -> list[Path]:
    return sorted(file for name in KEPT for file in run.rglob(name)
                  if "partial" not in file.relative_to(run).parts and file.is_file())


def copy_tree(source: Path, destination: Path, *, overwrite: bool) -> tuple[int, int]:
    """Copy the kept files of `source` into `destination` at the same relative paths; (copied, skipped)."""
    copied = skipped = 0
    for file in kept_files(source):
        target = destination / file.relative_to(source)
        if target.exists() and (not overwrite or target.read_bytes() == file.read_bytes()):
            skipped += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(file, temporary)
        temporary.replace(target)
        copied += 1
    return copied, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("save", "restore"),
                        help="save: runs/NAME -> benchmarks/runs/NAME (newer results replace older ones); "
                             "restore: benchmarks/runs/NAME -> runs/NAME (files already there are kept)")
    parser.add_argument("names", nargs="+", help="run folders under runs/ (e.g. smollm2-seeds)")
    args = parser.parse_args(argv)
    for name in args.names:
        source, destination = ((RUNS, ARCHIVE) if args.action == "save" else (ARCHIVE, RUNS))
        if not (source / name).is_dir():
            print(f"{source / name}: no such run folder", file=sys.stderr)
            return 2
        copied, skipped = copy_tree(source / name, destination / name, overwrite=args.action == "save")
        print(f"{name}: {copied} file(s) copied to {destination / name}, {skipped} already there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
