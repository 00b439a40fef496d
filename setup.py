"""haltkit packaging: the Python package lives in python/haltkit, the Triton kernels in kernels/."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """A module that CMakeLists.txt builds (target ``target``); setuptools compiles nothing itself."""

    def __init__(self, name: str, target: str, optional: bool = False) -> None:
        super().__init__(name, sources=[], optional=optional)
        self.target = target


def _nvcc() -> str | None:
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand):
            return cand
    return None


class CMakeBuild(build_ext):
    """Runs CMakeLists.txt once (haltkit._cpu always, haltkit._C where nvcc exists, haltkit._cuda_emu
    unless HALTKIT_CUDA_EMU=OFF) and puts each
    module where setuptools expects it, for ``pip install .`` and ``pip install -e .`` alike."""

    def build_extension(self, ext: Extension) -> None:
        out = self._cmake_build()
        built = sorted(out.glob(ext.target + ".*.so"))
        if not built:
            if ext.optional:
                why = ("HALTKIT_CUDA_EMU=OFF" if ext.target == "_cuda_emu" else "no nvcc found, or HALTKIT_CUDA=OFF")
                print(f"haltkit: {ext.name} was not built ({why}); the cpu, triton and torch backends are unaffected")
                return
            raise RuntimeError(f"CMake did not produce {ext.target} in {out}")
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], dest)

    def copy_extensions_to_source(self) -> None:
        # Editable installs copy each module into python/haltkit: replace it atomically, so a
        # process that has the old one loaded keeps a valid mapping instead of a truncated file.
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace, regular = self._get_inplace_equivalent(build_py, ext)
            if os.path.exists(regular):
                shutil.copyfile(regular, inplace + ".tmp")
                os.replace(inplace + ".tmp", inplace)
            elif not ext.optional:
                raise RuntimeError(f"{ext.name} was not built")

    def _cmake_build(self) -> Path:
        if getattr(self, "_cmake_out", None) is not None:
            return self._cmake_out
        import pybind11

        build = Path(self.build_temp).resolve() / "cmake"
        out = build / "modules"
        args = [f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}", f"-DPython_EXECUTABLE={sys.executable}",
                f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", "-DCMAKE_BUILD_TYPE=Release"]
        for var in ("HALTKIT_CPU_FLAGS", "HALTKIT_CUDA_ARCHS", "HALTKIT_CUDA", "HALTKIT_CUDA_EMU"):
            if os.environ.get(var):
                args.append(f"-D{var}={os.environ[var]}")
        nvcc = _nvcc()
        if nvcc and os.environ.get("HALTKIT_CUDA", "AUTO").upper() != "OFF":
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if shutil.which("ninja"):
            args.append("-GNinja")
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), *args], check=True)
        log = subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        print(log.stdout)
        if log.returncode != 0:
            raise RuntimeError("building haltkit's native modules failed (see the compiler output above)")
        # The compiler's per-kernel registers, shared memory and spills, kept with the benchmarks.
        ptxas = [ln for ln in log.stdout.splitlines()
                 if ln.startswith(("ptxas", "    ")) and "Compile time" not in ln]
        if ptxas:
            (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
            (ROOT / "bench" / "results" / "ptxas_decode_step.txt").write_text("\n".join(ptxas) + "\n")
        self._cmake_out = out
        return out


setup(
    name="haltkit",
    version="0.1.0",
    description="Fused decode-step kernels and a marginal-value head for early-exit LLM decoding",
    python_requires=">=3.10",
    package_dir={"haltkit": "python/haltkit", "haltkit.kernels": "kernels"},
    packages=["haltkit", "haltkit.reference", "haltkit.kernels", "haltkit.train", "haltkit.models", "haltkit.vllm"],
    # The toy reasoning models (target, draft, value head) ship inside the package.
    package_data={"haltkit.models": ["toy/meta.json", "toy/head.safetensors", "toy/target/*", "toy/draft/*"]},
    # torch is a floor only, so a GPU user keeps the build they already have. transformers runs
    # haltkit.generate's models and the demo (`pip install -e . && haltkit demo` must work).
    install_requires=["torch>=2.4", "numpy", "safetensors", "transformers>=4.56"],
    extras_require={
        "triton": ["triton>=3.0"],
        # pybind11 builds the sanitizer variant of haltkit._cpu; cuobjdump checks haltkit._C's archs.
        "test": ["pytest>=8", "pytest-xdist", "hypothesis", "triton>=3.0", "numpy", "scipy", "transformers>=4.56",
                 "pybind11>=2.11", "nvidia-cuda-cuobjdump", "matplotlib"],
        # The toy models, train-toy and train-head run on Hugging Face Llama; eval-exits and bench plots
        # need matplotlib;
        # bench/e2e_real.py loads SmolLM2's GGUF weights through transformers (gguf, accelerate).
        "toy": ["transformers>=4.56", "matplotlib"],
        "bench": ["transformers>=4.56", "matplotlib", "gguf", "accelerate"],
        # train-head / eval-exits --reasoning-gym DATASET (Apache-2.0, offline generators; about 70 MB and
        # 2 min to install on 2 cores, so CI leaves it out and its test skips there).
        "reasoning-gym": ["reasoning-gym>=0.1.25,<0.2"],
    },
    entry_points={"console_scripts": ["haltkit=haltkit.cli:main"]},
    # haltkit._cuda_emu: the CUDA kernels' sources over a host emulation, which the tests run on
    # CPU tensors (HALTKIT_CUDA_EMU=OFF skips it).
    ext_modules=[CMakeExtension("haltkit._cpu", "_cpu"), CMakeExtension("haltkit._C", "_C", optional=True),
                 CMakeExtension("haltkit._cuda_emu", "_cuda_emu", optional=True)],
    cmdclass={"build_ext": CMakeBuild},
)
