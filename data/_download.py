"""Shared by the data/prepare_*.py scripts: a cached download, checked reading of upstream records,
atomic writes, and the one-line summary.

Standard library only. A bad upstream record is an error naming the file and line (or record);
rows skipped on purpose are counted by the caller and printed, never dropped silently. A download
goes to <file>.part and is renamed when complete, so a killed download never looks finished; an
output file goes to <file>.tmp and is renamed the same way.
"""

import json
import os
import urllib.request

CACHE = os.path.join(os.environ.get("PLAINRLHF_CACHE", os.path.expanduser("~/.cache/plainrlhf")), "data")


def download(url, dest):
    """Fetch url to dest unless dest exists; return dest. A short or failed download is an error."""
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    print(f"downloading {url} -> {dest}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(dest + ".part", "wb") as f:
            expected = r.headers.get("Content-Length")
            n = 0
            while chunk := r.read(1 << 20):
                f.write(chunk)
                n += len(chunk)
    except OSError as e:  # URLError, HTTPError and socket timeouts are all OSErrors
        raise RuntimeError(f"download of {url} failed ({e}); pass --src with a local copy to skip it") from None
    if expected is not None and n != int(expected):
        raise RuntimeError(f"download of {url} stopped at {n} of {expected} bytes; left in {dest}.part, rerun")
    os.replace(dest + ".part", dest)
    return dest


def json_lines(path, f):
    """(line number, object) for each non-blank line of the binary file f; a bad line names path:line."""
    for n, raw in enumerate(f, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError as e:  # bad JSON or bad UTF-8
            raise ValueError(f"{path}:{n}: not a JSON line ({e}); a bad download or a changed format?") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        yield n, row


def field(row, key, types, where):
    """row[key], checked to be one of types; else an error naming where (file:line) and what was found."""
    if key not in row:
        raise ValueError(f"{where}: missing key {key!r} (keys: {sorted(row)}); has the upstream format changed?")
    if not isinstance(row[key], types):
        want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ValueError(f"{where}: {key!r} is a {type(row[key]).__name__}, expected {want}")
    return row[key]


def write_jsonl(path, rows):
    """One JSON object a line, written to path.tmp then renamed over path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def write_text(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def summary(name, split, written, skipped):
    """'prepare_hh | train | pairs 9 | sft 10 | skipped: identical 1, empty_answer 0'."""
    return (f"{name} | {split} | " + " | ".join(f"{k} {v}" for k, v in written.items())
            + " | skipped: " + (", ".join(f"{k} {v}" for k, v in skipped.items()) or "none"))
