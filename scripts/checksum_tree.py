#!/usr/bin/env python3
"""Checksum every file under a folder, several files at once, within a time limit.

    python scripts/checksum_tree.py [-j N] [--timeout S] [-a sha256] [-o FILE] DIR

Writes one ``<hex digest>  <path relative to DIR>`` line per regular file (symbolic
links are not followed), sorted by path: the format of ``sha256sum``, so the
result can be checked later with ``(cd DIR && sha256sum -c) < sums.txt``.

Built on ``alloter_mp.ProcessAlloter``: files are hashed in worker processes (at
most N at once), the first unreadable file ends the run, and ``--timeout`` bounds
the whole run, stopping the hashing in progress.

Exit status: 0 done; 1 a file could not be read; 2 bad arguments; 124 timed out;
130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

try:
    import alloter_mp
except ImportError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import alloter_mp

from alloter_mp.cli import job_limit, seconds

PROG = "checksum_tree.py"
BLOCK = 1 << 20


def hash_file(path: str, algorithm: str = "sha256") -> str:
    """The hex digest of the file at ``path`` (read in 1 MiB blocks)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def regular_files(root: Path) -> Iterator[str]:
    """Every regular file under ``root``, relative to it, sorted; links not followed."""
    found: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                found.append(os.path.relpath(path, root))
    return iter(sorted(found))


def sum_line(digest: str, name: str) -> str:
    """One line in the format of ``sha256sum`` (names with ``\\`` or newline escaped)."""
    if "\\" in name or "\n" in name:
        escaped = name.replace("\\", "\\\\").replace("\n", "\\n")
        return f"\\{digest}  {escaped}\n"
    return f"{digest}  {name}\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked (errors exit with status 2)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Checksum every regular file under DIR in parallel; output in the "
        "format of sha256sum, sorted by path.",
        epilog="example: python scripts/checksum_tree.py -j 8 --timeout 600 -o sums.txt data/\n"
        "check later: (cd data && sha256sum -c) < sums.txt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", metavar="DIR", type=Path, help="the folder to checksum")
    parser.add_argument(
        "-j",
        "--jobs",
        metavar="N",
        type=job_limit,
        default=0,
        help="files hashed at once (default: 0, one per CPU)",
    )
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=seconds,
        help="seconds for the whole run (exit status 124 when they pass)",
    )
    parser.add_argument(
        "-a",
        "--algorithm",
        default="sha256",
        help="any hashlib algorithm: sha256 (default), sha1, md5, blake2b, ...",
    )
    parser.add_argument(
        "-o", "--output", metavar="FILE", type=Path, help="write the sums to FILE instead of stdout"
    )
    args = parser.parse_args(argv)
    if args.algorithm not in hashlib.algorithms_available:
        parser.error(f"unknown algorithm {args.algorithm!r}")
    try:
        hashlib.new(args.algorithm).hexdigest()
    except TypeError:  # shake_* need a length
        parser.error(f"algorithm {args.algorithm!r} has no fixed digest size")
    if not args.directory.is_dir():
        parser.error(f"not a directory: {str(args.directory)!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Checksum the tree; return the exit status."""
    args = parse_args(argv)
    names = list(regular_files(args.directory))
    root = str(args.directory)
    algorithm = args.algorithm
    out = sys.stdout if args.output is None else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
    try:
        with alloter_mp.ProcessAlloter(args.jobs or None, timeout=args.timeout) as alloter:
            digests = alloter.imap(
                lambda name: hash_file(os.path.join(root, name), algorithm), names
            )
            for name, digest in zip(names, digests, strict=True):
                out.write(sum_line(digest, name))
    except alloter_mp.ExecTimeout:
        print(f"{PROG}: timed out after {args.timeout:g} s", file=sys.stderr)
        return 124
    except alloter_mp.TaskError as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        print(f"{PROG}: cannot checksum {names[err.index]!r}: {cause}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
