"""Build pipetrain's C++ core (``pipetrain._C``) and, where nvcc is found, its CUDA backend.

* ``pipetrain._C`` is every ``csrc/**/*.cpp`` outside ``csrc/cuda/``: plain C++17 + pybind11,
  no torch headers, so it builds in seconds and needs no GPU.
* ``pipetrain._C_cuda`` is ``csrc/cuda/**/*.{cu,cpp}`` compiled by nvcc and linked to
  libcudart. ``PIPETRAIN_CUDA=auto`` (default) builds it when nvcc is found and says what it
  skipped otherwise; ``1`` requires it (CI uses this to compile-check every ``.cu``); ``0``
  skips it. It is imported only when a CUDA device exists.

Objects compile in parallel with ninja (jobs capped by cores and memory, or ``MAX_JOBS``);
setuptools only links.
"""

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CXX_FLAGS = ["-std=c++17", "-O3", "-fPIC", "-pthread", "-fvisibility=hidden", "-Wall", "-Wextra"]
# CI sets PIPETRAIN_WERROR=1 so that a C++ warning fails the build (nvcc's already do).
if os.environ.get("PIPETRAIN_WERROR") == "1":
    CXX_FLAGS.append("-Werror")
# nvcc's own flags; host flags go through -Xcompiler.
NVCC_FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr",
              "-Xcompiler", "-fPIC,-fvisibility=hidden,-Wall,-Wextra", "-Werror=all-warnings"]


def _sources(folder: str, suffixes: tuple[str, ...], exclude: str | None = None) -> list[str]:
    out = []
    for path in sorted((ROOT / folder).rglob("*")):
        if path.suffix in suffixes and not (exclude and exclude in path.relative_to(ROOT).parts):
            out.append(str(path.relative_to(ROOT)))
    return out


def _cuda_home() -> Path | None:
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return Path(candidate)
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return Path("/usr/local/cuda")
    nvcc = shutil.which("nvcc")
    if nvcc and (Path(nvcc).resolve().parent.parent / "include" / "cuda_runtime.h").exists():
        return Path(nvcc).resolve().parent.parent
    return None


def _cuda_wanted() -> Path | None:
    """Return CUDA_HOME if the CUDA extension is to be built, per PIPETRAIN_CUDA."""
    mode = os.environ.get("PIPETRAIN_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"PIPETRAIN_CUDA must be auto, 0 or 1, not {mode!r}")
    if mode == "0":
        print("pipetrain: PIPETRAIN_CUDA=0, skipping the CUDA backend (pipetrain._C_cuda)")
        return None
    home = _cuda_home()
    if home is None:
        if mode == "1":
            sys.exit("pipetrain: PIPETRAIN_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        print("pipetrain: nvcc not found, skipping the CUDA backend (pipetrain._C_cuda); "
              "the CPU backend and the Triton kernels are unaffected")
        return None
    return home


def _jobs() -> int:
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    cores = os.cpu_count() or 1
    try:  # about 1.5 GiB per compiler process at worst (nvcc), so cap by memory too
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        cores = min(cores, max(1, int(mem_gib / 1.5)))
    except (ValueError, OSError):
        pass
    return cores


def _ninja() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # the PyPI package ships the binary
        return str(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        return None


class NinjaBuildExt(build_ext):
    """Compile each extension's objects with one ninja invocation, then link with setuptools."""

    def build_extension(self, ext: Extension) -> None:
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cxx = os.environ.get("CXX") or shlex.split(sysconfig.get_config_var("CXX") or "g++")[0]
        # "-isystem DIR" as two words: nvcc rejects the joined form.
        system = [pybind11.get_include(), sysconfig.get_paths()["include"], *ext.include_dirs]
        includes = [f"-I{ROOT / 'csrc'}"] + [w for d in system for w in ("-isystem", d)]
        cflags = CXX_FLAGS + includes + ext.extra_compile_args
        nvcc = getattr(ext, "nvcc", None)
        lines = [
            f"cxx = {cxx}",
            f"cflags = {' '.join(cflags)}",
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = CXX $in",
        ]
        if nvcc:
            nvflags = NVCC_FLAGS + includes + getattr(ext, "nvcc_args", [])
            lines += [
                f"nvcc = {nvcc}",
                f"nvflags = {' '.join(nvflags)}",
                "rule nvcc",
                "  command = $nvcc -MD -MF $out.d $nvflags -c $in -o $out",
                "  depfile = $out.d",
                "  deps = gcc",
                "  description = NVCC $in",
            ]
        objects = []
        for src in ext.sources:
            obj = build_dir / (src.replace("/", "_") + ".o")
            rule = "nvcc" if src.endswith(".cu") else "cxx"
            lines.append(f"build {obj}: {rule} {ROOT / src}")
            objects.append(str(obj))
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")

        ninja = _ninja()
        if ninja:
            subprocess.run([ninja, "-C", str(build_dir), "-j", str(_jobs())], check=True)
        else:  # no ninja: same commands, one at a time
            print("pipetrain: ninja not found, compiling sequentially")
            for src, obj in zip(ext.sources, objects):
                if src.endswith(".cu"):
                    cmd = [nvcc, *NVCC_FLAGS, *includes, *getattr(ext, "nvcc_args", []), "-c", src, "-o", obj]
                else:
                    cmd = [cxx, *cflags, "-c", src, "-o", obj]
                subprocess.run(cmd, check=True, cwd=ROOT)

        self.compiler.link_shared_object(
            objects, self.get_ext_fullpath(ext.name),
            libraries=ext.libraries, library_dirs=ext.library_dirs,
            runtime_library_dirs=ext.runtime_library_dirs,
            extra_postargs=["-pthread", *ext.extra_link_args], target_lang="c++")


def _extensions() -> list[Extension]:
    core = Extension("pipetrain._C", sources=_sources("csrc", (".cpp",), exclude="cuda"))
    exts = [core]
    home = _cuda_wanted()
    if home is not None:
        cuda_sources = _sources("csrc/cuda", (".cu", ".cpp"))
        if cuda_sources:
            ext = Extension("pipetrain._C_cuda", sources=cuda_sources,
                            include_dirs=[str(home / "include")],
                            library_dirs=[str(home / "lib64")],
                            runtime_library_dirs=[str(home / "lib64")],
                            libraries=["cudart"])
            ext.nvcc = str(home / "bin" / "nvcc")
            archs = os.environ.get("PIPETRAIN_CUDA_ARCH", "80;90").split(";")
            ext.nvcc_args = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
            exts.append(ext)
    return exts


def _packages() -> tuple[list[str], dict[str, str]]:
    """``engine/`` is ``pipetrain``, ``kernels/`` is ``pipetrain.kernels``, subfolders follow."""
    names, dirs = [], {}
    for top, name in (("engine", "pipetrain"), ("kernels", "pipetrain.kernels")):
        for init in sorted((ROOT / top).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / top).parts
            pkg = ".".join((name, *rel))
            names.append(pkg)
            dirs[pkg] = str(Path(top, *rel))
    return names, dirs


PACKAGES, PACKAGE_DIR = _packages()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"pipetrain": ["py.typed"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": NinjaBuildExt},
)
