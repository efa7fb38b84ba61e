"""Named target profiles: one place that says what "build for device X" means.

The kernels, the registry and the runtime all ask for a target by a short name
("arm-a76", "opencl-mali", "cuda-sm87", ...) instead of spelling TVM target
JSON in many places.  A :class:`TargetProfile` carries what TVM's ``Target``
does not: the target family (which schedule applies), the cross compiler that
links the host-side shared library for the device, and whether the device code
can be compiled on this machine or has to ship as source (``ship_source``:
CUDA sm_72, which the local nvcc 13 no longer supports; the Jetson Xavier's
own JetPack nvcc/NVRTC compiles it there).

TVM 0.27 takes targets as JSON dicts (``"llvm -mtriple=..."`` strings raise),
so every profile is a dict, turned into ``tvm.target.Target`` on demand.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

TargetFamily = Literal["cpu", "opencl", "cuda"]
TARGET_FAMILIES: tuple[str, ...] = ("cpu", "opencl", "cuda")

AARCH64_TRIPLE = "aarch64-linux-gnu"
AARCH64_ANDROID_TRIPLE = "aarch64-linux-android"
AARCH64_GCC = "aarch64-linux-gnu-gcc"
NDK = "ndk"
"""``cross_compiler`` value meaning "Android NDK clang" (``tvm.support.ndk.create_shared``, env ``TVM_NDK_CC``)."""

# Limits NVIDIA documents for every architecture from sm_70 on (the Jetson tags in TVM use the same).
_CUDA_LIMITS: dict[str, Any] = {
    "max_num_threads": 1024,
    "max_threads_per_block": 1024,
    "max_shared_memory_per_block": 49152,
    "registers_per_block": 65536,
    "thread_warp_size": 32,
}
# Mali and Adreno: TVM's own OpenCL defaults (256 threads per work-group, 16 KiB local memory, no warps).
_MOBILE_OPENCL_LIMITS: dict[str, Any] = {
    "max_num_threads": 256,
    "max_threads_per_block": 256,
    "max_shared_memory_per_block": 16384,
    "thread_warp_size": 1,
}

_ARM64: dict[str, Any] = {"kind": "llvm", "mtriple": AARCH64_TRIPLE, "mattr": ["+neon"]}
_ARM64_ANDROID: dict[str, Any] = {"kind": "llvm", "mtriple": AARCH64_ANDROID_TRIPLE, "mattr": ["+neon"]}
_X86_64: dict[str, Any] = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}


class UnknownTargetError(KeyError):
    """A target name that no profile has; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class TargetProfile:
    """A deployable target: TVM target JSON plus what the build and the runtime need around it.

    ``spec`` is the device target as a TVM JSON dict (without ``host``);
    ``host`` the target of the host-side code for GPU families (None for CPU
    targets, which are their own host).  ``cross_compiler`` links the shared
    library (None: the local compiler, i.e. the machine itself is the device).
    ``nvcc_arch`` is set for CUDA profiles; ``ship_source`` marks device code
    that cannot be compiled here and must be shipped as source.
    """

    name: str
    family: TargetFamily
    description: str
    spec: dict[str, Any]
    host: dict[str, Any] | None = None
    cross_compiler: str | None = None
    nvcc_arch: str | None = None
    ship_source: bool = False
    fp16: bool = False
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def target_dict(self) -> dict[str, Any]:
        """The full TVM target JSON (device with ``host`` folded in), a fresh copy each call."""
        d = copy.deepcopy(self.spec)
        if self.host is not None:
            d["host"] = copy.deepcopy(self.host)
        return d

    def target(self) -> Any:
        """A ``tvm.target.Target`` for this profile (imports TVM lazily)."""
        from tvm.target import Target

        return Target(self.target_dict())

    def host_target(self) -> Any:
        """The target of the host-side code (the device target itself for CPU profiles)."""
        from tvm.target import Target

        return Target(copy.deepcopy(self.host if self.host is not None else self.spec))

    @property
    def is_cross(self) -> bool:
        """True when the library is built here for another machine (needs ``fcompile`` to link)."""
        return self.cross_compiler is not None

    def fcompile(self) -> Callable[..., Any] | None:
        """The ``fcompile`` to pass to ``export_library`` (None: TVM's default, the local compiler).

        Raises RuntimeError naming the fix when the cross compiler is missing.
        """
        if self.cross_compiler is None:
            return None
        if self.cross_compiler == NDK:
            import os

            if not os.environ.get("TVM_NDK_CC"):
                raise RuntimeError(
                    f"target {self.name!r} links with the Android NDK: set TVM_NDK_CC to the NDK's "
                    "aarch64-linux-android<API>-clang (tvm.support.ndk.create_shared uses it)"
                )
            from tvm.support import ndk

            return ndk.create_shared
        import shutil

        if shutil.which(self.cross_compiler) is None:
            raise RuntimeError(
                f"target {self.name!r} needs the cross compiler {self.cross_compiler!r}, which is not on PATH; "
                "install it (Debian: apt-get install gcc-aarch64-linux-gnu)"
            )
        from tvm.support import cc

        return cc.cross_compiler(self.cross_compiler)


def detect_host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. ``znver3``, ``icelake-server``), so LLVM uses its vector ISA."""
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def _host_profile() -> TargetProfile:
    import os

    spec: dict[str, Any] = {"kind": "llvm", "mcpu": detect_host_cpu(), "num-cores": os.cpu_count() or 1}
    return TargetProfile(
        name="x86-host",
        family="cpu",
        description=f"this machine's CPU (LLVM, mcpu={spec['mcpu']} detected at run time)",
        spec=spec,
        notes="runs locally; mcpu is detected when the profile is built, so a library is not portable",
    )


def _cuda(name: str, arch: str, description: str, host: dict[str, Any], ship_source: bool = False) -> TargetProfile:
    notes = ""
    if ship_source:
        notes = (
            f"nvcc 13 (this machine) dropped {arch}: ship the CUDA source and compile it on the device "
            "with JetPack's nvcc/NVRTC (see kernels_tvm/TARGETS.md)"
        )
    return TargetProfile(
        name=name,
        family="cuda",
        description=description,
        spec={"kind": "cuda", "arch": arch, **_CUDA_LIMITS},
        host=host,
        cross_compiler=AARCH64_GCC if host.get("mtriple") == AARCH64_TRIPLE else None,
        nvcc_arch=arch,
        ship_source=ship_source,
        fp16=True,
        notes=notes,
    )


def _static_profiles() -> list[TargetProfile]:
    a72 = {**_ARM64, "mcpu": "cortex-a72", "num-cores": 4}
    a76 = {**_ARM64, "mcpu": "cortex-a76", "num-cores": 4}
    a78ae = {**_ARM64, "mcpu": "cortex-a78ae"}
    carmel = {**_ARM64, "mcpu": "carmel"}
    return [
        TargetProfile(
            name="arm64",
            family="cpu",
            description="generic AArch64 Linux CPU with NEON (runs on any ARMv8-A board, and the emulated device)",
            spec=dict(_ARM64),
            cross_compiler=AARCH64_GCC,
        ),
        TargetProfile(
            name="arm-a72",
            family="cpu",
            description="Raspberry Pi 4 (4x Cortex-A72, NEON; no dotprod, no fp16 arithmetic)",
            spec=a72,
            cross_compiler=AARCH64_GCC,
        ),
        TargetProfile(
            name="arm64-android",
            family="cpu",
            description="ARM CPU of an Android phone (AArch64, NEON; library linked with the NDK)",
            spec=dict(_ARM64_ANDROID),
            cross_compiler=NDK,
            notes="Android has no on-device linker: the host links the .so with the NDK's clang (TVM_NDK_CC)",
        ),
        TargetProfile(
            name="arm-a76",
            family="cpu",
            description="Raspberry Pi 5 (4x Cortex-A76, NEON, dotprod, fp16)",
            spec=a76,
            cross_compiler=AARCH64_GCC,
        ),
        TargetProfile(
            name="arm-a78ae",
            family="cpu",
            description="Jetson Orin CPU (Cortex-A78AE, 6-12 cores by module)",
            spec=a78ae,
            cross_compiler=AARCH64_GCC,
            notes="num-cores is left out: Orin Nano has 6 cores, Orin NX 8, AGX Orin 12",
        ),
        TargetProfile(
            name="opencl-mali",
            family="opencl",
            description="ARM Mali GPU through OpenCL (e.g. RK3588 boards, Linux aarch64 host)",
            spec={"kind": "opencl", "device": "mali", **_MOBILE_OPENCL_LIMITS},
            host=dict(_ARM64),
            cross_compiler=AARCH64_GCC,
            fp16=True,
        ),
        TargetProfile(
            name="opencl-mali-android",
            family="opencl",
            description="ARM Mali GPU through OpenCL on an Android phone (host library linked with the NDK)",
            spec={"kind": "opencl", "device": "mali", **_MOBILE_OPENCL_LIMITS},
            host=dict(_ARM64_ANDROID),
            cross_compiler=NDK,
            fp16=True,
        ),
        TargetProfile(
            name="opencl-adreno",
            family="opencl",
            description="Qualcomm Adreno GPU through OpenCL (Android phones; host library linked with the NDK)",
            spec={"kind": "opencl", "device": "adreno", **_MOBILE_OPENCL_LIMITS},
            host=dict(_ARM64_ANDROID),
            cross_compiler=NDK,
            fp16=True,
        ),
        _cuda("cuda-sm72", "sm_72", "Jetson Xavier (Volta GPU, Carmel CPU)", carmel, ship_source=True),
        _cuda("cuda-sm87", "sm_87", "Jetson Orin (Ampere GPU, Cortex-A78AE CPU)", a78ae),
        _cuda("cuda-sm80", "sm_80", "A100-class desktop/server GPU (x86-64 host)", dict(_X86_64)),
        _cuda("cuda-sm90", "sm_90", "H100-class server GPU (x86-64 host)", dict(_X86_64)),
    ]


PROFILE_NAMES: tuple[str, ...] = ("x86-host",) + tuple(p.name for p in _static_profiles())


def get_profile(name: str) -> TargetProfile:
    """The profile called ``name``; UnknownTargetError (listing the known names) otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"target name must be a str, got {type(name).__name__}; known: {', '.join(PROFILE_NAMES)}")
    if name == "x86-host":
        return _host_profile()
    for profile in _static_profiles():
        if profile.name == name:
            return profile
    raise UnknownTargetError(f"unknown target {name!r}; known targets: {', '.join(PROFILE_NAMES)}")


def host_target() -> Any:
    """LLVM target for this machine, ``mcpu`` set to the host CPU (so AVX2/AVX-512/NEON are used).

    Unlike the ``x86-host`` profile it carries no ``num-cores``: it is the target the
    kernel registry caches and looks tuning records up under for "this CPU".
    """
    from tvm.target import Target

    cpu = detect_host_cpu()
    desc: dict[str, Any] = {"kind": "llvm"}
    if cpu and cpu != "generic":
        desc["mcpu"] = cpu
    return Target(desc)


HOST_ALIASES: tuple[str, ...] = ("host", "llvm", "cpu")
"""Names that mean "this machine's CPU" wherever a target is asked for."""


def resolve_target(target: Any = None) -> Any:
    """The one place a target designation becomes a ``tvm.target.Target``.

    Accepts None or one of :data:`HOST_ALIASES` (this CPU, :func:`host_target`), a
    profile name (``"arm-a76"``, ``"cuda-sm87"``, ...), a bare GPU kind (``"cuda"``,
    ``"opencl"``), a TVM target JSON dict, or a ``Target`` (returned as is).  Every
    caller (registry, bundles, runtime, device profiles) goes through here, so a name
    means the same target everywhere.
    """
    from tvm.target import Target

    if target is None or (isinstance(target, str) and target in HOST_ALIASES):
        return host_target()
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        if target in PROFILE_NAMES:
            return get_profile(target).target()
        if target in ("cuda", "opencl"):
            return Target({"kind": target})
        try:  # a TVM tag ("nvidia/jetson-orin-nano"), a bare kind ("c") or JSON text
            return Target(target)
        except Exception as err:  # TVM raises its own error types here
            raise UnknownTargetError(
                f"unknown target {target!r}; pass a profile name ({', '.join(PROFILE_NAMES)}), "
                f"{', '.join(HOST_ALIASES)}, cuda, opencl, a TVM tag or a TVM target JSON dict"
            ) from err
    return Target(target)


def get_target(name: str) -> Any:
    """``tvm.target.Target`` of the profile called ``name`` (host folded in for GPU families)."""
    return get_profile(name).target()


def list_profiles(family: str | None = None) -> list[TargetProfile]:
    """Every profile, or those of one family ("cpu", "opencl", "cuda")."""
    if family is not None and family not in TARGET_FAMILIES:
        raise ValueError(f"unknown target family {family!r}; choose one of {', '.join(TARGET_FAMILIES)}")
    profiles = [get_profile(n) for n in PROFILE_NAMES]
    return [p for p in profiles if family is None or p.family == family]


def family_of(target: Any) -> TargetFamily:
    """Family of a ``tvm.target.Target`` (or a profile name): which schedule set applies."""
    if isinstance(target, str):
        return get_profile(target).family
    kind = target.kind.name
    if kind in ("llvm", "c"):
        return "cpu"
    if kind in ("opencl", "cuda"):
        return kind  # type: ignore[return-value]
    raise ValueError(f"no kernel schedules for target kind {kind!r}; supported kinds: llvm, c, opencl, cuda")
