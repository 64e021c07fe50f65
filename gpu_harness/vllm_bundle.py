"""vLLM 0.8.5.post1 for the GPU box (torch 2.11, Python 3.12, no vLLM, offline).

build (here, pip + network; ``make gpu-bundle [BOX_PYTHON=3.12]``)::

    python3 gpu_harness/vllm_bundle.py build [--python-version 3.12]

writes ``.gpu_bundle/vllm085/`` (ignored, ~21 MB, carried to the box):

- ``vllm-0.8.5.post1.tar.xz``: vLLM's Python files and data files as the
  pinned wheel installed them in ``.venv`` (every file checked against the
  wheel's RECORD hashes), without the compiled extensions (``_C``,
  ``_moe_C``, ``_flashmla_C``, ``cumem_allocator``, FlashAttention), plus its
  dist-info (``importlib.metadata.version("vllm")`` says 0.8.5.post1);
- ``wheels/``: the pure-Python / cp``XY`` manylinux wheels of vLLM's imports
  that the box lacks (``WHEELS``), downloaded with ``pip download --no-deps
  --only-binary=:all:``.

unpack (on the box, stdlib only)::

    export PYTHONPATH=$(python3 gpu_harness/vllm_bundle.py unpack):$PWD

extracts both into ``/tmp/vllm_site`` and adds the two files of
``gpu_harness/site/``: ``vllm/_C.py`` (vLLM imports ``vllm._C``
unconditionally; this one registers the ``stand_ins`` instead, and the
torch-2.11 shims: see ``gpu_harness/box.py``) and ``sitecustomize.py``
(empty stand-in modules for optional imports nothing here uses, ``STUBS``).
"""
import argparse
import base64
import csv
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

VLLM_VERSION = "0.8.5.post1"
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".gpu_bundle" / "vllm085"
SITE_SRC = Path(__file__).resolve().with_name("site")
DEFAULT_TARGET = "/tmp/vllm_site"
# vLLM 0.8.5.post1's imports that the box lacks (its own versions of
# transformers/tokenizers/huggingface_hub are too new for vLLM 0.8.5).
WHEELS = [
    "transformers==4.51.3", "tokenizers==0.21.1", "huggingface_hub==0.30.2",
    "pydantic==2.11.4", "pydantic_core==2.33.2", "annotated-types==0.7.0",
    "typing-inspection==0.4.0", "msgspec==0.19.0", "pyzmq==26.4.0",
    "blake3==1.0.4", "cachetools==5.5.2", "compressed-tensors==0.9.3",
    "gguf==0.16.3", "partial-json-parser==0.2.1.1.post5", "openai==1.77.0",
    "jiter==0.9.0", "distro==1.9.0", "sniffio==1.3.1", "fastapi==0.115.12",
    "starlette==0.46.2", "lark==1.2.2",
]
COMPILED = (".so",)


def _installed_vllm():
    """(site-packages dir, dist-info dir) of the pinned vLLM in .venv."""
    for site in sorted((ROOT / ".venv" / "lib").glob("python3*/site-packages")):
        info = site / f"vllm-{VLLM_VERSION}.dist-info"
        if info.is_dir():
            return site, info
    raise SystemExit(f"vllm {VLLM_VERSION} not found in .venv: run `make setup`")


def _record_hash(path):
    digest = hashlib.sha256(path.read_bytes()).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def build(python_version="3.12", out=OUT, wheel_dir=None):
    site, info = _installed_vllm()
    out.mkdir(parents=True, exist_ok=True)
    members = []
    with open(info / "RECORD", newline="") as f:
        for rel, digest, _ in csv.reader(f):
            if not rel.startswith(("vllm/", info.name + "/")) or rel.endswith(COMPILED):
                continue
            if "__pycache__" in rel or rel.endswith("/RECORD"):
                continue
            path = site / rel
            if digest and _record_hash(path) != digest:
                raise SystemExit(f"{rel} differs from the wheel's RECORD: not a pristine vLLM")
            members.append(rel)
    tar_path = out / f"vllm-{VLLM_VERSION}.tar.xz"
    with tarfile.open(tar_path, "w:xz", preset=9) as tar:
        for rel in sorted(members):
            tar.add(site / rel, arcname=rel, recursive=False)
    wheels = out / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir()
    if wheel_dir is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--python-version", python_version, "--implementation", "cp",
             "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
             "--platform", "manylinux_2_28_x86_64", "-d", str(wheels), *WHEELS], check=True)
    else:
        for w in Path(wheel_dir).glob("*.whl"):
            shutil.copy(w, wheels)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {len(members)} vLLM files, {len(list(wheels.glob('*.whl')))} wheels, "
          f"{size / 2**20:.1f} MB")
    return out


def unpack(bundle=OUT, target=DEFAULT_TARGET):
    """Extract the bundle into ``target`` (idempotent) and return it."""
    target = Path(target)
    stamp = target / ".vllm_bundle_done"
    if not stamp.exists():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(bundle / f"vllm-{VLLM_VERSION}.tar.xz") as tar:
            tar.extractall(target)
        for whl in sorted((bundle / "wheels").glob("*.whl")):
            with zipfile.ZipFile(whl) as z:
                z.extractall(target)
        stamp.write_text("ok\n")
    # the two harness files are copied every time (they live in the repo)
    shutil.copy(SITE_SRC / "vllm_C.py", target / "vllm" / "_C.py")
    shutil.copy(SITE_SRC / "sitecustomize.py", target / "sitecustomize.py")
    return target


def main(argv=None):
    ap = argparse.ArgumentParser(prog="gpu_harness/vllm_bundle.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--python-version", default="3.12")
    b.add_argument("--out", type=Path, default=OUT)
    b.add_argument("--wheel-dir", default=None, help="use these wheels, no download")
    u = sub.add_parser("unpack")
    u.add_argument("--bundle", type=Path, default=OUT)
    u.add_argument("--target", default=DEFAULT_TARGET)
    args = ap.parse_args(argv)
    if args.cmd == "build":
        build(args.python_version, args.out, args.wheel_dir)
    else:
        print(unpack(args.bundle, args.target))


if __name__ == "__main__":
    main()
