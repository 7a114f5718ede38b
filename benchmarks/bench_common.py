"""What the TRL comparisons in benchmarks/ share: TRL's own virtualenv, wheels for an offline GPU machine, the
model and tokenizer without the hub, running one side in its own process, peak memory, the shared command line.

Imports only the standard library at module level: the TRL-side scripts (run in TRL's venv, which has no rlhfkit)
import it too, for `peak_memory`, `IterationTimer` and `length_reward`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Pinned first, on its own: on the CPU machines pip then takes the CPU build on disk instead of pulling CUDA wheels.
TORCH_PIN = "torch==2.13.0"
# Packages a GPU image is assumed to carry already; --download-wheels fetches what trl needs beyond them.
GPU_IMAGE_HAS = ("torch", "transformers", "peft", "accelerate")

REPO = Path(__file__).resolve().parent.parent
# Keep both frameworks off the hub: the model is a local directory and nothing else should be fetched.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRL_EXPERIMENTAL_SILENCE": "1",
}


def log(msg: str) -> None:
    print(f"[{Path(sys.argv[0]).stem}] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    env = os.environ.get("RLHFKIT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "rlhfkit"


def trl_venv_dir(trl_version: str) -> Path:
    return cache_root() / "benchmarks" / f"venv-trl-{trl_version}"


def local_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def pip(python: Path | str, *args: str) -> None:
    cmd = [str(python), "-m", "pip", "--disable-pip-version-check", *args]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def site_packages_of_current_interpreter() -> list[str]:
    import sysconfig

    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return sorted(p for p in paths if Path(p).is_dir())


def ensure_trl_venv(wheels: Path | None, trl_version: str, import_check: str,
                    same_as_here: tuple[str, ...] = ("transformers", "accelerate")) -> Path:
    """The python of TRL `trl_version`'s venv, created once. A `.complete` marker guards against a half-built venv.

    `same_as_here`: packages pinned to this interpreter's versions, so that the comparison is of the trainers, not
    of the model code underneath them. `import_check` must import in the new venv before it counts as complete."""
    venv = trl_venv_dir(trl_version)
    python = venv / "bin" / "python"
    marker = venv / ".complete"
    if marker.is_file() and python.exists():
        return python
    if venv.exists():
        log(f"removing incomplete venv {venv}")
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if wheels is not None:
        # Offline GPU machine: reuse the interpreter's torch (CUDA build) and friends, add trl from the wheel dir.
        try:
            import torch  # noqa: F401
        except ImportError:
            sys.exit("--wheels needs an interpreter that already has torch (it is not in the wheel directory)")
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        if sys.prefix != sys.base_prefix:
            # We run from a venv: --system-site-packages only exposes the *base* interpreter's packages, so point the
            # new venv at this venv's site-packages too (plain path lines; rlhfkit's editable hook is not processed).
            (purelib,) = {p for p in (venv / "lib").glob("python*/site-packages")}
            (purelib / "_parent_site_packages.pth").write_text("\n".join(site_packages_of_current_interpreter()) + "\n")
        # Exactly the carried wheels, no resolution: the new venv's own (older) setuptools would shadow the
        # interpreter's and fail torch's requirement on it, with no index to fetch another.
        carried = sorted(str(w) for w in Path(wheels).glob("*.whl"))
        if not any(Path(w).name.startswith(f"trl-{trl_version}-") for w in carried):
            sys.exit(f"no trl-{trl_version} wheel in {wheels} (make it with --download-wheels)")
        pip(python, "install", "--no-index", "--no-deps", *carried)
        subprocess.run([str(python), "-m", "pip", "check"])  # report only: pip check also flags pre-existing issues
    else:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip(python, "install", "--quiet", "--upgrade", "pip")
        pip(python, "install", "--quiet", TORCH_PIN)
        pins = [f"{d}=={v}" for d in same_as_here if (v := local_version(d))]
        pip(python, "install", "--quiet", f"trl=={trl_version}", *pins)
    # Fail now, not mid-benchmark, if the venv cannot import the trainer.
    subprocess.run([str(python), "-c", import_check], check=True, env=os.environ | OFFLINE_ENV)
    marker.write_text(f"created in {time.time() - started:.0f}s\n")
    log(f"TRL venv ready at {venv} ({time.time() - started:.0f}s)")
    return python


# pyarrow (a dependency of `datasets`, which TRL imports; the benchmark never touches arrow) is a 52 MiB wheel, most
# of it Flight RPC and S3 libraries that nothing here loads. Dropping them keeps the carried wheels under ~55 MiB.
# pyarrow imports both optionally (pyarrow.fs lists S3FileSystem as not built; pyarrow.flight fails on import).
PYARROW_DROP_PREFIXES = ("libarrow_flight", "libarrow_python_flight", "_flight.", "libarrow_s3", "_s3fs.",
                         "_pyarrow_cpp_tests")
PYARROW_DROP_DIRS = ("pyarrow/tests/", "pyarrow/include/", "pyarrow/src/")


def slim_pyarrow(wheel: Path) -> None:
    """Rewrite the pyarrow wheel in place without PYARROW_DROP_*; RECORD loses the same lines, so it stays valid."""
    import zipfile

    def dropped(name: str) -> bool:
        return name.startswith(PYARROW_DROP_DIRS) or (
            name.startswith("pyarrow/") and name.count("/") == 1
            and Path(name).name.startswith(PYARROW_DROP_PREFIXES)
        )

    tmp = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            if dropped(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(ln for ln in lines if not dropped(ln.split(",", 1)[0])).encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    tmp.replace(wheel)


def download_wheels(dest: Path, python_version: str | None, trl_version: str, slim: bool = True) -> None:
    """Download trl and the dependencies a torch/transformers/peft/accelerate image lacks, for offline install.

    The missing set is the difference of two dry-run resolutions (with and without trl) on top of the GPU image's
    packages, pinned to the versions in this interpreter. Resolution is for this interpreter (resolving CUDA torch's
    dependencies for another Python trips over nvidia-* wheel tags); only the download targets `python_version`."""
    dest.mkdir(parents=True, exist_ok=True)
    base = [TORCH_PIN] + [f"{d}=={v}" for d in GPU_IMAGE_HAS[1:] if (v := local_version(d))]
    target = []
    if python_version:
        # Another interpreter's binary wheels (pyarrow, xxhash, pandas...): manylinux, binary only.
        target = ["--python-version", python_version, "--implementation", "cp", "--only-binary=:all:"]
        target += [f"--platform={tag}" for tag in ("manylinux2014_x86_64", "manylinux_2_24_x86_64",
                                                   "manylinux_2_27_x86_64", "manylinux_2_28_x86_64")]

    def resolve(reqs: list[str]) -> dict[str, str]:
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            pip(sys.executable, "install", "--quiet", "--dry-run", "--ignore-installed", "--report", str(report), *reqs)
            items = json.loads(report.read_text())["install"]
        return {it["metadata"]["name"].lower().replace("_", "-"): it["metadata"]["version"] for it in items}

    with_trl = resolve(base + [f"trl=={trl_version}"])
    without = resolve(base)
    missing = {n: v for n, v in with_trl.items() if without.get(n) != v}
    log("to download: " + ", ".join(f"{n}=={v}" for n, v in sorted(missing.items())))
    pip(sys.executable, "download", "--quiet", "--no-deps", "--dest", str(dest), *target,
        *[f"{n}=={v}" for n, v in sorted(missing.items())])
    if slim:
        for wheel in dest.glob("pyarrow-*.whl"):
            before = wheel.stat().st_size
            slim_pyarrow(wheel)
            log(f"slimmed {wheel.name}: {before / 2**20:.1f} -> {wheel.stat().st_size / 2**20:.1f} MiB")
    files = sorted(dest.glob("*.whl")) + sorted(dest.glob("*.tar.gz"))
    total = sum(f.stat().st_size for f in files)
    for f in files:
        print(f"{f.stat().st_size / 2**20:8.2f} MiB  {f.name}")
    print(f"{total / 2**20:8.2f} MiB  total, {len(files)} files in {dest}")


# Shapes for timing on randomly initialised weights (no model can be downloaded where the GPUs are). Both use the
# SmolLM2 tokenizer's 49,152-token vocabulary with tied embeddings; llama-1b is Llama-3.2-1B's body (1.07B).
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rope_theta=100000.0),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, rope_theta=500000.0),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "generation_config.json")


def export_tokenizer(model_dir: str, dest: Path) -> None:
    """The tokenizer files of `model_dir` (the bundled model), to carry to a machine that cannot install it."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(model_dir) / name).is_file():
            shutil.copy2(Path(model_dir) / name, dest / name)
    log(f"tokenizer files written to {dest}")


def random_model_dir(shape: str, tokenizer_dir: Path, seed: int) -> str:
    """A Llama of `shape` with seeded random weights and the given tokenizer, saved once under the cache."""
    target = cache_root() / "benchmarks" / f"random-{shape}-seed{seed}"
    if (target / "config.json").is_file():
        return str(target)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    torch.manual_seed(seed)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    log(f"random {shape} model in {target}")
    return str(target)


def run_json_script(cmd: list[str], label: str, drop_env: tuple[str, ...] = ("PYTHONPATH",)) -> dict:
    """Run one side of a benchmark in its own process (peak memory is then that run's alone); its stdout ends with
    one JSON result line, stderr (progress, warnings) goes straight through. Adds the process's wall time."""
    env = {k: v for k, v in os.environ.items() if k not in drop_env} | OFFLINE_ENV
    log("$ " + " ".join(c if len(c) < 200 else c[:60] + "...}" for c in cmd))
    started = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout)
        raise RuntimeError(f"the {label} run failed (exit {proc.returncode})")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"no JSON result line in the {label} run's output:\n{proc.stdout}")
    result = json.loads(lines[-1])
    result["wall_seconds"] = round(time.time() - started, 1)  # whole process: imports, loading, warm-up included
    return result


def peak_memory(device: str) -> tuple[float, str]:
    """This process's peak memory in GiB: resident set on CPU, the CUDA allocator's maximum on GPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "rss"  # ru_maxrss is in KiB on Linux


def length_reward(text: str) -> float:
    """The GRPO/RLOO benchmark's reward on both sides: a response's length in characters / 100 (costs nothing, so
    the timings are of the trainers)."""
    return len(text) / 100


def add_shared_args(p: argparse.ArgumentParser) -> None:
    """The driver options every TRL comparison has: what to run, the model, timing, device, output, and the set-up
    for an offline GPU machine."""
    p.add_argument("--only", choices=["trl", "rlhfkit", "both"], default="both")
    p.add_argument("--model", default="smollm2-135m-instruct", help="rlhfkit model name (bundled alias or directory)")
    p.add_argument("--prompts", default=str(REPO / "data" / "company" / "train.jsonl"))
    p.add_argument("--iterations", type=int, default=3, help="timed iterations")
    p.add_argument("--warmup-iterations", type=int, default=1, help="untimed iterations before them")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here (default: print only)")
    p.add_argument("--wheels", type=Path, default=None,
                   help="offline: build the TRL venv on this interpreter's packages plus trl from this wheel dir")
    p.add_argument("--download-wheels", type=Path, default=None, metavar="DIR",
                   help="only download trl and its deps missing from a torch/transformers/peft/accelerate image")
    p.add_argument("--wheels-python", default=None, metavar="X.Y",
                   help="with --download-wheels: target Python version for binary wheels (default: this one)")
    p.add_argument("--full-pyarrow", action="store_true",
                   help="with --download-wheels: keep pyarrow's Flight/S3 libraries (+~17 MiB)")
    p.add_argument("--random-init", choices=sorted(SHAPES), default=None,
                   help="time randomly initialised weights of this shape instead of --model")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="with --random-init: tokenizer directory (default: the bundled model's)")
    p.add_argument("--export-tokenizer", type=Path, default=None, metavar="DIR",
                   help="only write the bundled model's tokenizer files to DIR (to carry to a GPU machine)")


def setup_only(args: argparse.Namespace, trl_version: str) -> bool:
    """Run --download-wheels or --export-tokenizer if asked (then the driver has nothing else to do)."""
    if args.download_wheels:
        download_wheels(args.download_wheels, args.wheels_python, trl_version, slim=not args.full_pyarrow)
        return True
    if args.export_tokenizer:
        from rlhfkit.models.registry import resolve_model

        export_tokenizer(resolve_model(args.model), args.export_tokenizer)
        return True
    return False


def device_and_model(args: argparse.Namespace) -> dict:
    """The workload's device, dtype and model: the named one, or random weights of --random-init's shape."""
    import torch
    from rlhfkit.models.registry import resolve_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if args.random_init:
        tokenizer = args.tokenizer or Path(resolve_model(args.model))
        model_name, model_dir = f"random {args.random_init}", random_model_dir(args.random_init, tokenizer, args.seed)
    else:
        model_name, model_dir = args.model, resolve_model(args.model)
    return {"model": model_name, "model_dir": model_dir, "device": device, "dtype": dtype}


def warn_if_busy(device: str) -> None:
    if device == "cpu" and (load := os.getloadavg()[0]) > 0.5:
        log(f"warning: 1-min load average {load:.1f} before starting (it lags by a minute): "
            "if other processes are busy, the CPU timings will be slow")


def write_report(report: dict, out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        log(f"results written to {out}")
    else:
        print(json.dumps(report, indent=2))


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def iteration_timer(device: str, steps_per_iteration: int = 1):
    """A transformers TrainerCallback with wall-clock `marks`: at train begin and after every
    `steps_per_iteration`-th optimizer step (the end of one iteration: rollout, then its updates)."""
    from transformers import TrainerCallback

    class IterationTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            sync(device)
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % steps_per_iteration == 0:
                sync(device)
                self.marks.append(time.perf_counter())

    return IterationTimer()
