"""Set up the emulated aarch64 device: a Debian arm64 rootfs + aarch64 TVM, run under qemu-user.

Why: the ARM CPU kernels must be shown to run on AArch64, and this machine is
x86-64 with no board attached.  qemu-user runs an aarch64 CPython from a
Debian arm64 root file system; with the aarch64 wheels of apache-tvm and its
dependencies it runs TVM's RPC server, so the host can cross-compile, upload
and run kernels exactly as it would on a Raspberry Pi or a Jetson.

Run ``python -m edgeattn.devices.arm64_emulator_setup`` (idempotent: each
step is skipped when its result is already there).  The cache folder is
``~/.cache/edgeattn/arm64-emu`` unless ``EDGEATTN_ARM64_EMU`` names another.
Needs Debian packages ``qemu-user-static gcc-aarch64-linux-gnu debootstrap``
(``--apt`` installs them when run as root), network access to the Debian
mirror this machine's apt already uses, and to PyPI (through pip).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

from edgeattn.devices.emulated_arm64 import (
    DEBIAN_SUITE,
    PYTHON_VERSION,
    SETUP_COMMAND,
    EmulatorLayout,
    emulator_layout,
)

APT_PACKAGES = ("qemu-user-static", "gcc-aarch64-linux-gnu", "debootstrap")
# Pinned to the host's versions where the RPC protocol depends on them (TVM and its FFI).
PINNED_TO_HOST = ("apache-tvm", "apache-tvm-ffi")
UNPINNED = ("numpy", "ml_dtypes", "psutil", "cloudpickle", "typing_extensions")
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
APT_SOURCE_FILES = ("/etc/apt/sources.list",)
APT_SOURCE_DIR = "/etc/apt/sources.list.d"


class SetupError(RuntimeError):
    """A set-up step that cannot proceed; the message says what to do."""


def log(msg: str) -> None:
    print(f"[arm64-emu] {msg}", flush=True)


# ------------------------------------------------------------------ mirror


def _deb822_blocks(text: str) -> list[dict[str, str]]:
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
            current = {}
            continue
        if line.lstrip().startswith("#") or ":" not in line or line[0].isspace():
            continue
        key, value = line.split(":", 1)
        current[key.strip().lower()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def debian_mirror_from_apt(suite: str = DEBIAN_SUITE) -> str:
    """The Debian mirror this machine's apt uses for ``suite`` (read at run time, never hard-coded).

    ``EDGEATTN_DEBIAN_MIRROR`` overrides it.  Reads one-line ``deb URL suite ...``
    entries and deb822 ``.sources`` blocks.
    """
    override = os.environ.get("EDGEATTN_DEBIAN_MIRROR")
    if override:
        return override
    files = [Path(f) for f in APT_SOURCE_FILES]
    src_dir = Path(APT_SOURCE_DIR)
    if src_dir.is_dir():
        files += sorted(p for p in src_dir.iterdir() if p.suffix in (".list", ".sources"))
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for block in _deb822_blocks(text):
                if "deb" in block.get("types", "").split() and suite in block.get("suites", "").split():
                    uris = block.get("uris", "").split()
                    if uris:
                        return uris[0]
        else:
            for line in text.splitlines():
                parts = line.split("#", 1)[0].split()
                if len(parts) >= 3 and parts[0] == "deb":
                    rest = [p for p in parts[1:] if not p.startswith("[")]
                    if len(rest) >= 2 and rest[1] == suite:
                        return rest[0]
    raise SetupError(
        f"no Debian mirror for suite {suite!r} in /etc/apt/sources.list(.d); "
        "set EDGEATTN_DEBIAN_MIRROR to a Debian mirror URL"
    )


# ------------------------------------------------------------------- steps


def check_tools(install: bool) -> None:
    """The host tools; with ``install`` (as root) apt-get installs the missing ones."""
    missing = [
        pkg
        for pkg, exe in zip(APT_PACKAGES, ("qemu-aarch64-static", "aarch64-linux-gnu-gcc", "debootstrap"), strict=True)
        if shutil.which(exe) is None
    ]
    if not missing:
        return
    command = f"apt-get update && apt-get install -y {' '.join(missing)}"
    if not install:
        raise SetupError(f"missing host tools {', '.join(missing)}: run `{command}` (as root), or pass --apt")
    if os.geteuid() != 0:
        raise SetupError(f"--apt needs root to install {', '.join(missing)}; run `{command}` as root")
    log(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, env=env)


def make_rootfs(layout: EmulatorLayout) -> None:
    """Debian arm64 minbase with python3 (debootstrap first stage, then every .deb unpacked)."""
    done = layout.rootfs / ".edgeattn-rootfs-done"
    if done.exists() and layout.python.exists():
        log(f"rootfs present: {layout.rootfs}")
        return
    if layout.rootfs.exists():
        log(f"removing incomplete rootfs {layout.rootfs}")
        shutil.rmtree(layout.rootfs)
    mirror = debian_mirror_from_apt()
    log(f"debootstrap arm64 {DEBIAN_SUITE} minbase+python3 from {mirror}")
    tmp = layout.rootfs.with_name(layout.rootfs.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    subprocess.run(
        [
            "debootstrap",
            "--foreign",
            "--arch=arm64",
            "--variant=minbase",
            "--include=python3",
            DEBIAN_SUITE,
            str(tmp),
            mirror,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    debs = sorted((tmp / "var/cache/apt/archives").glob("*.deb"))
    if not debs:
        raise SetupError(f"debootstrap left no .deb files in {tmp}/var/cache/apt/archives")
    log(f"unpacking {len(debs)} packages")
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    for deb in debs:  # the archives are not needed any more (~60 MB)
        deb.unlink()
    tmp.rename(layout.rootfs)
    if not layout.python.exists():
        raise SetupError(f"the rootfs has no {layout.python.relative_to(layout.rootfs)}; debootstrap changed?")
    done.write_text(json.dumps({"suite": DEBIAN_SUITE, "mirror": mirror}))


def _host_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError as err:
        raise SetupError(f"{dist} is not installed on the host; `pip install -e .` first") from err


def download_site(layout: EmulatorLayout) -> None:
    """aarch64 wheels (TVM pinned to the host's version) unpacked into the SITE folder."""
    done = layout.site / ".edgeattn-site-done"
    requirements = [f"{d}=={_host_version(d)}" for d in PINNED_TO_HOST] + list(UNPINNED)
    if done.exists() and json.loads(done.read_text()).get("requirements") == requirements:
        log(f"aarch64 site-packages present: {layout.site}")
        return
    wheels = layout.root / "wheels"
    if wheels.exists():  # start clean so only the requested versions get unpacked
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)
    log(f"pip download (aarch64, cp{PYTHON_VERSION.replace('.', '')}): {' '.join(requirements)}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels)]
    for plat in WHEEL_PLATFORMS:
        cmd += ["--platform", plat]
    cmd += ["--python-version", PYTHON_VERSION, "--implementation", "cp", *requirements]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    if layout.site.exists():
        shutil.rmtree(layout.site)
    layout.site.mkdir(parents=True)
    names = [r.split("==")[0].replace("-", "_").lower() for r in requirements]
    for wheel in sorted(wheels.glob("*.whl")):
        if wheel.name.split("-")[0].lower() not in names:
            continue
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(layout.site)
    # zipfile drops the exec bit; shared libraries load fine without it, helper binaries do not
    for so in layout.site.rglob("*.so*"):
        so.chmod(0o755)
    write_wrapper(layout)
    (layout.root / ".edgeattn-pyc-done").unlink(missing_ok=True)
    done.write_text(json.dumps({"requirements": requirements}))


def write_wrapper(layout: EmulatorLayout) -> None:
    """The x86 wrapper that starts aarch64 Python, and the sitecustomize that makes it ``sys.executable``.

    TVM's RPC server spawns its worker with ``sys.executable``; inside qemu that
    is the aarch64 binary, which the x86 kernel cannot exec (no binfmt_misc
    here), so it must name the wrapper that re-enters qemu.
    """
    qemu = shutil.which("qemu-aarch64-static")
    if qemu is None:
        raise SetupError("qemu-aarch64-static is not on PATH: apt-get install qemu-user-static")
    layout.wrapper.write_text(
        "#!/bin/sh\n"
        "# aarch64 CPython under qemu-user (written by edgeattn.devices.arm64_emulator_setup)\n"
        f'PYTHONPATH="{layout.site}" PYTHONNOUSERSITE=1 '
        f'exec "{qemu}" -L "{layout.rootfs}" "{layout.python}" "$@"\n'
    )
    layout.wrapper.chmod(0o755)
    (layout.site / "sitecustomize.py").write_text(
        '"""Make sys.executable the x86 wrapper so subprocesses re-enter qemu (edgeattn)."""\n'
        "import sys\n\n"
        f"sys.executable = {str(layout.wrapper)!r}\n"
    )


def precompile_bytecode(layout: EmulatorLayout) -> None:
    """Write .pyc files for the aarch64 stdlib and site-packages (nothing under qemu writes them).

    Debian's postinst (py3compile) never ran in the unpacked rootfs, and the
    environment may set PYTHONDONTWRITEBYTECODE, so every emulated import would
    compile its sources again: about 40 % of ``import tvm`` under qemu.  Bytecode
    is the same on every platform for one Python version, so the host's Python
    compiles it natively when its version matches (``-d`` keeps the paths the
    emulated Python sees); otherwise the emulated Python does it (slow, once).
    """
    done = layout.root / ".edgeattn-pyc-done"
    if done.exists():
        log("bytecode present")
        return
    stdlib = layout.rootfs / "usr" / "lib" / f"python{PYTHON_VERSION}"
    host_matches = f"{sys.version_info.major}.{sys.version_info.minor}" == PYTHON_VERSION
    python = [sys.executable] if host_matches else [str(layout.wrapper)]
    log(f"precompiling bytecode with the {'host' if host_matches else 'emulated'} Python")
    jobs = [(stdlib, f"/usr/lib/python{PYTHON_VERSION}"), (layout.site, str(layout.site))]
    for folder, shown_as in jobs:
        cmd = [*python, "-m", "compileall", "-q", "-j", "0", "-d", shown_as, str(folder)]
        # some test/template files in the stdlib do not compile; compileall reports them and goes on
        subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done.write_text("ok")


def smoke_test(layout: EmulatorLayout) -> str:
    """Import TVM and numpy under emulation; returns what the aarch64 Python reports."""
    code = (
        "import platform, sys, numpy, tvm; "
        "print(platform.machine(), tvm.__version__, numpy.__version__, sys.executable)"
    )
    out = subprocess.run([str(layout.wrapper), "-c", code], check=True, capture_output=True, text=True, timeout=300)
    line = out.stdout.strip().splitlines()[-1]
    if not line.startswith("aarch64 "):
        raise SetupError(f"the emulated Python did not report aarch64: {line!r}")
    return line


def set_up(install_tools: bool = False) -> EmulatorLayout:
    """Every step, idempotently; returns the layout of the ready emulator."""
    layout = emulator_layout()
    layout.root.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    check_tools(install_tools)
    make_rootfs(layout)
    download_site(layout)
    write_wrapper(layout)
    precompile_bytecode(layout)
    log(f"smoke test (importing tvm under qemu: ~15-60 s, more under load): {smoke_test(layout)}")
    layout.ready_marker.write_text(json.dumps({"tvm": _host_version("apache-tvm"), "suite": DEBIAN_SUITE}))
    log(f"ready in {time.monotonic() - start:.0f} s: {layout.root}")
    return layout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=SETUP_COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--apt", action="store_true", help="apt-get install missing host tools (root only)")
    args = parser.parse_args(argv)
    try:
        set_up(install_tools=args.apt)
    except (SetupError, subprocess.CalledProcessError) as err:
        print(f"arm64 emulator set-up failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
