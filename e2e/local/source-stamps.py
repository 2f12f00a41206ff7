#!/usr/bin/env python3
"""Content-based freshness for the cached cargo target dir.

Cargo decides whether a workspace crate is fresh by comparing its source
files' modification times with its last build's. A fresh clone gives every
file a new mtime, so each CI run rebuilt every workspace crate in four
profiles (clippy, test, debug, release: 7-8 minutes on two cores) even when
nothing had changed since the last run on the machine.

`restore` (before the builds) gives each tracked file whose content is the
same as at the last recorded build the mtime it had then; files that changed
keep theirs (a clone's: now), so cargo rebuilds exactly the crates whose
sources changed. `record` (after the builds succeeded) stores each file's
content hash and mtime.

What this relies on, and checks:
  - the recorded build is the last one in the target dir: if any fingerprint
    there is newer than the record (a `cargo build` outside e2e/test.sh),
    nothing is restored and cargo's own mtime rule applies;
  - one run at a time between `restore` and `record` (e2e/test.sh holds a
    lock over both and the builds between them).
Paths are relative to the repository, so clones at other paths share it.
Test binaries find their sources through the runtime CARGO_MANIFEST_DIR,
not the path compiled into them (e2e/local/run-tests.sh sets it).
"""

import hashlib
import json
import os
import subprocess
import sys


def tracked_files(repo):
    out = subprocess.run(["git", "-C", repo, "ls-files", "-z"], check=True, capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p]


def content_hash(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def built_since(target, when):
    """Whether any fingerprint in the target dir is newer than `when` (ns)."""
    for profile in ("debug", "release"):
        root = os.path.join(target, profile, ".fingerprint")
        if not os.path.isdir(root):
            continue
        for unit in os.scandir(root):
            if not unit.is_dir():
                continue
            for entry in os.scandir(unit.path):
                if entry.stat().st_mtime_ns > when:
                    return entry.path
    return None


def restore(repo, target, record_path, pending_path):
    record = {}
    reason = None
    try:
        recorded_at = os.stat(record_path).st_mtime_ns
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        reason = f"no usable record ({e.__class__.__name__})"
    if reason is None:
        newer = built_since(target, recorded_at)
        if newer:
            reason = f"the target dir was built since the record ({os.path.relpath(newer, target)})"
            record = {}

    restored = changed = 0
    pending = {}
    for rel in tracked_files(repo):
        path = os.path.join(repo, rel)
        if not os.path.isfile(path) or os.path.islink(path):
            continue
        digest = content_hash(path)
        earlier = record.get(rel)
        if earlier and earlier[0] == digest:
            os.utime(path, ns=(earlier[1], earlier[1]))
            restored += 1
        else:
            changed += 1
        pending[rel] = [digest, os.stat(path).st_mtime_ns]
    with open(pending_path, "w", encoding="utf-8") as f:
        json.dump({"files": pending}, f)
    if reason:
        print(f"source stamps: {reason}; cargo's mtimes decide ({changed} files)", file=sys.stderr)
    else:
        print(f"source stamps: {restored} files as at the last build, {changed} changed", file=sys.stderr)


def record(record_path, pending_path):
    with open(pending_path, encoding="utf-8") as f:
        pending = json.load(f)
    # Written anew (not renamed): the record's own mtime marks the end of the builds.
    tmp = record_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(pending, f)
    os.replace(tmp, record_path)
    os.utime(record_path)
    os.remove(pending_path)


def main():
    if len(sys.argv) != 5 or sys.argv[1] not in ("restore", "record"):
        sys.exit("usage: source-stamps.py restore|record REPO TARGET_DIR CACHE_DIR")
    command, repo, target, cache = sys.argv[1:]
    record_path = os.path.join(cache, "source-stamps.json")
    pending_path = os.path.join(cache, "source-stamps.pending.json")
    if command == "restore":
        restore(repo, target, record_path, pending_path)
    else:
        record(record_path, pending_path)


if __name__ == "__main__":
    main()
