#!/usr/bin/env python3
"""What a checkpoint's flush does to the commits beside it, on this disk alone.

One thread stands for the SQLite writer: it writes 8 KiB into a "WAL" file and
fsyncs it, in a loop (0.8 ms apart). Another stands for the checkpointer: every
20 ms it writes PAGES random 4 KiB pages into a 200 MiB "database" file and
fsyncs it, either at once (MODE burst, what SQLite's checkpoint does) or after
writing them back RUN pages at a time with sync_file_range, waiting for each
run (MODE runs, what lime-server's checkpointer VFS does, store/sqlite/writeback.rs).
Prints the WAL fsyncs' latency percentiles. docs/benchmarks.md has the figures.

Usage: tools/lime-load/flush-contention.py [none|burst|runs] [RUN] [DIR]
  (none: no checkpoints, the disk's own fsync latency; RUN: 8; DIR: /tmp/flush-contention)
"""
import ctypes
import os
import random
import sys
import threading
import time

SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4
PAGES, PAGE, DB_SIZE, WAL_SIZE, SECONDS = 300, 4096, 200 << 20, 4 << 20, 8

mode = sys.argv[1] if len(sys.argv) > 1 else "runs"
run = int(sys.argv[2]) if len(sys.argv) > 2 else 8
work = sys.argv[3] if len(sys.argv) > 3 else "/tmp/flush-contention"
if mode not in ("none", "burst", "runs"):
    sys.exit(__doc__)
libc = ctypes.CDLL("libc.so.6", use_errno=True)
os.makedirs(work, exist_ok=True)
wal = os.open(os.path.join(work, "wal"), os.O_RDWR | os.O_CREAT)
os.ftruncate(wal, WAL_SIZE)
db = os.open(os.path.join(work, "db"), os.O_RDWR | os.O_CREAT)
if os.fstat(db).st_size < DB_SIZE:
    block = os.urandom(1 << 20)
    for i in range(DB_SIZE >> 20):
        os.pwrite(db, block, i << 20)
os.fsync(db)
os.fsync(wal)

stop = False
commits, passes = [], []


def writer():
    offset, frames = 0, os.urandom(8192)
    while not stop:
        started = time.perf_counter()
        os.pwrite(wal, frames, offset)
        os.fsync(wal)
        commits.append(time.perf_counter() - started)
        offset = (offset + len(frames)) % WAL_SIZE
        time.sleep(0.0008)


def write_back(first, last):
    flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
    start, end = first * PAGE, (last + 1) * PAGE
    libc.sync_file_range(db, ctypes.c_longlong(start), ctypes.c_longlong(end - start), flags)


def checkpointer():
    page = os.urandom(PAGE)
    while not stop:
        time.sleep(0.020)
        if mode == "none":
            continue
        pages = sorted(random.randrange(DB_SIZE // PAGE) for _ in range(PAGES))
        started = time.perf_counter()
        for i in range(0, len(pages), run if mode == "runs" else len(pages)):
            chunk = pages[i : i + run] if mode == "runs" else pages
            for n in chunk:
                os.pwrite(db, page, n * PAGE)
            if mode == "runs":
                write_back(chunk[0], chunk[-1])
        os.fsync(db)
        passes.append(time.perf_counter() - started)


threads = [threading.Thread(target=writer), threading.Thread(target=checkpointer)]
for thread in threads:
    thread.start()
time.sleep(SECONDS)
stop = True
for thread in threads:
    thread.join()


def ms(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] * 1000 if values else 0.0


print(
    f"{mode}{f' of {run}' if mode == 'runs' else ''}: {len(commits)} WAL fsyncs, "
    f"p50 {ms(commits, .5):.2f} p90 {ms(commits, .9):.2f} p99 {ms(commits, .99):.2f} "
    f"p99.9 {ms(commits, .999):.2f} ms; {len(passes)} checkpoints of {PAGES} pages, "
    f"p50 {ms(passes, .5):.2f} ms"
)
