"""Build / unpack the triton 3.2.0 bundle for the GPU box (torch 2.11 + triton 3.6, Python 3.12, offline).

vLLM 0.8.5.post1 users run triton 3.2.0; the GPU box has triton 3.6.0 and no package registry. This
script packs the cp312 manylinux x86_64 triton 3.2.0 wheel into a ~37 MB tar.xz that travels with the
working tree (the device tool's `carry`), and unpacks it on the box:

  build (here, with pip and network):
      python3 gpu_harness/triton_bundle.py build [--out .gpu_bundle/triton-3.2.0.tar.xz]
    = pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 triton==3.2.0
      unzip; strip --strip-unneeded triton/_C/libtriton.so (debug info: 535 -> 127 MB);
      delete triton/backends/nvidia/bin/nvdisasm, triton/backends/nvidia/lib/cupti/,
      triton/_C/libproton.so, triton/instrumentation/ (unused: SASS disassembly, profiler); tar.xz.
  unpack (on the box, no pip needed):
      export PYTHONPATH=$(python3 gpu_harness/triton_bundle.py unpack .gpu_bundle/triton-3.2.0.tar.xz)
    prints the directory to put first on PYTHONPATH (default /tmp/triton32); `import triton` then
    reports 3.2.0 beside torch 2.11. Stdlib only (tarfile/lzma).
`make triton-bundle` runs the build step.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

VERSION = "3.2.0"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / ".gpu_bundle" / f"triton-{VERSION}.tar.xz"
DROP = ["triton/backends/nvidia/bin/nvdisasm", "triton/backends/nvidia/lib/cupti",
        "triton/_C/libproton.so", "triton/instrumentation"]


def build(out: Path, wheel_dir: str = None) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if wheel_dir is None:
            wheel_dir = tmp / "dl"
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.12", "--implementation", "cp",
                            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                            "-d", str(wheel_dir), f"triton=={VERSION}"], check=True)
        wheels = sorted(Path(wheel_dir).glob(f"triton-{VERSION}-cp312-*.whl"))
        if not wheels:
            raise SystemExit(f"no triton {VERSION} cp312 wheel in {wheel_dir}")
        site = tmp / "site"
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(site)
            for zi in z.infolist():  # zipfile drops the permission bits: ptxas & co must stay executable
                mode = (zi.external_attr >> 16) & 0o777
                if mode and not zi.is_dir():
                    os.chmod(site / zi.filename, mode)
        subprocess.run(["strip", "--strip-unneeded", str(site / "triton/_C/libtriton.so")], check=True)
        for rel in DROP:
            p = site / rel
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        # the wheel's binaries must stay executable (ptxas, cuobjdump)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_suffix(".tmp")
        with tarfile.open(tmp_out, "w:xz", preset=6) as tf:
            for entry in sorted(site.iterdir()):
                tf.add(entry, arcname=entry.name)
        os.replace(tmp_out, out)
    print(f"{out} {out.stat().st_size / 2**20:.1f} MiB")
    return out


def unpack(tarball: Path, dest: Path) -> Path:
    marker = dest / ".unpacked"
    if not marker.exists():
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball, "r:xz") as tf:
            tf.extractall(dest)
        for f in (dest / "triton/backends/nvidia/bin").iterdir():  # ptxas, cuobjdump: executable
            f.chmod(0o755)
        marker.write_text(str(tarball))
    print(dest)
    return dest


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, default=DEFAULT_OUT)
    b.add_argument("--wheel-dir", default=None, help="use an already downloaded wheel from this folder")
    u = sub.add_parser("unpack")
    u.add_argument("tarball", type=Path, nargs="?", default=DEFAULT_OUT)
    u.add_argument("--dest", type=Path, default=Path("/tmp/triton32"))
    a = ap.parse_args()
    if a.cmd == "build":
        build(a.out, a.wheel_dir)
    else:
        unpack(a.tarball, a.dest)


if __name__ == "__main__":
    main()
