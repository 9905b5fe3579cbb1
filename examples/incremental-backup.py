#!/usr/bin/env python3
"""Offline incremental backup of a shut-off VM's disk, with nothing but qbitmap's API.

    incremental-backup.py DISK BITMAP BACKUP

BACKUP is the previous backup: a raw file holding DISK's guest data as of the
moment BITMAP was last cleared (or created).  Every range BITMAP marks dirty
is read from DISK, through its backing chain, and written over the same range
of BACKUP, which then holds DISK's guest data as of now.

The bitmap is neither cleared nor replaced: the backup tool that owns the
chain decides when the next increment starts (``qemu-img bitmap --clear``, or
a new bitmap per checkpoint), after it has stored this backup safely.
"""

import os
import sys

import qbitmap

PIECE = 4 << 20  # read and write at most this many bytes at a time


def backup(disk: str, bitmap: str, target: str) -> int:
    """Copy BITMAP's dirty ranges of DISK onto TARGET; return the bytes copied."""
    with qbitmap.open_image(disk) as image:
        if image.writer_running():
            raise qbitmap.ImageBusyError(f"{disk}: a running VM holds it; shut it off first")
        if os.path.getsize(target) != image.virtual_size:
            raise qbitmap.UsageError(f"{target}: not a raw copy of {disk}'s guest data")
        copied = 0
        fd = os.open(target, os.O_WRONLY)
        try:
            # extents() refuses a stale bitmap (in use after a crash): StaleBitmapError.
            for start, length in image.extents(bitmap):
                for offset in range(start, start + length, PIECE):
                    data = image.read(offset, min(PIECE, start + length - offset))
                    os.pwrite(fd, data, offset)
                copied += length
            os.fsync(fd)
        finally:
            os.close(fd)
    return copied


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: incremental-backup.py DISK BITMAP BACKUP", file=sys.stderr)
        return 64
    disk, bitmap, target = argv[1:]
    try:
        copied = backup(disk, bitmap, target)
    except qbitmap.QbitmapError as exc:
        print(f"incremental-backup: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the backup file
        print(f"incremental-backup: {exc}", file=sys.stderr)
        return 1
    print(f"copied {copied} bytes of {bitmap!r} from {disk} to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
