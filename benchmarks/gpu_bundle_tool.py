"""The GPU suite's offline install bundle: what goes in it, and the checks made when it is built and installed.

Used by `benchmarks/gpu_bundle.sh` (where the package index is) and `benchmarks/gpu_suite.sh --bundle` (on a
node without network, before anything is installed: so this file needs only the standard library there).

    python benchmarks/gpu_bundle_tool.py pins                 # NAME==VERSION of every wheel to download
    python benchmarks/gpu_bundle_tool.py manifest DIR --python-version 3.12   # check the closure, write manifest
    python benchmarks/gpu_bundle_tool.py size DIR             # tree + bundle against the 64 MiB limit
    python benchmarks/gpu_bundle_tool.py plan DIR             # node: NAME==VERSION to install (stale/ABI checks)
    python benchmarks/gpu_bundle_tool.py unpack DIR TARGET NAME==VERSION...  # node without pip: unzip the wheels
    python benchmarks/gpu_bundle_tool.py check-target TARGET  # node: the install left the image's packages alone
    python benchmarks/gpu_bundle_tool.py versions TARGET      # node: what runs, and whether bundle or image gave it

The image is assumed to hold torch, Triton and what torch requires (setuptools, sympy, jinja2, ...); never
bundled, never installed. Everything the suite imports beyond that is bundled; numpy too, installed only
where the image lacks it (torch does not require it, the suite's megatron-core and DeepSpeed do).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "manifest.json"
LIMIT_MIB = 64
# Wheels downloaded as they are (pinned by constraints.txt). DeepSpeed (built here, ops off) and the project's
# own wheel come on top. The list is the closure of what the suite imports, less the image (`manifest` checks it).
DOWNLOADED = ["megatron-core", "zstandard", "sentencepiece", "pyyaml", "pydantic", "pydantic-core",
              "annotated-types", "typing-extensions", "typing-inspection", "einops", "hjson", "msgpack", "ninja",
              "psutil", "py-cpuinfo", "tqdm", "packaging", "numpy",
              "fla-core"]  # fla's kernels, the scan benchmark's baseline (its umbrella package wants transformers)
IF_MISSING = {"numpy": "numpy"}  # distribution -> module: installed only where the image cannot import it
IMAGE = ("torch", "triton", "setuptools")  # plus nvidia-*: the image's, never the bundle's
# Requirements of the project that the suite never imports (Hugging Face export, TensorBoard logging).
UNUSED_BY_SUITE = {"hgrn-megatron": {"transformers", "tensorboard", "safetensors"}}
SOURCE_FOLDERS = ("hgrn_megatron", "kernels", "tokenizer", "pretrain")


def fail(message: str, code: int = 2) -> None:
    print(f"gpu_bundle: {message}", file=sys.stderr)
    sys.exit(code)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def is_image_package(name: str) -> bool:
    name = normalize(name)
    return name in IMAGE or name.startswith("nvidia-") or name == "pytorch-triton"


def constraint_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalize(name)] = version.strip()
    return pins


def download_pins(constraints: Path) -> list[str]:
    pins = constraint_pins(constraints)
    missing = [name for name in DOWNLOADED if normalize(name) not in pins]
    if missing:
        fail(f"{constraints}: no '==' pin for {', '.join(missing)} (every bundled wheel is pinned there)")
    return [f"{name}=={pins[normalize(name)]}" for name in DOWNLOADED]


def source_hash(root: Path = ROOT) -> str:
    """What the project wheel was built from: every .py/.cpp of the packaged folders, and setup.py."""
    digest = hashlib.sha256()
    files = [root / "setup.py"]
    for folder in SOURCE_FOLDERS:
        for dirpath, dirnames, filenames in os.walk(root / folder):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            files += [Path(dirpath) / f for f in filenames if f.endswith((".py", ".cpp"))]
    for path in sorted(files):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def wheel_fields(path: Path) -> tuple[str, str, str]:
    """(normalized name, version, python tag) from a wheel's file name."""
    parts = path.name[:-len(".whl")].split("-")
    if len(parts) not in (5, 6):
        fail(f"{path}: not a wheel file name (NAME-VERSION[-BUILD]-PY-ABI-PLATFORM.whl)")
    return normalize(parts[0]), parts[1], parts[-3]


def wheel_requirements(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = zf.read(meta).decode()
    head = text.split("\n\n", 1)[0]
    return [line.split(":", 1)[1].strip() for line in head.splitlines() if line.startswith("Requires-Dist:")]


def check_closure(wheels: dict[str, tuple[str, Path]], python_version: str) -> list[str]:
    """Every requirement of every bundled wheel, for Linux x86-64 CPython `python_version`, is met by the
    bundle (at a version it accepts), by the image, or is one the suite never imports. Returns the problems."""
    from packaging.requirements import Requirement

    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "os_name": "posix",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    problems = []
    for name, (_, path) in sorted(wheels.items()):
        for text in wheel_requirements(path):
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            dep = normalize(req.name)
            if dep in wheels:
                if not req.specifier.contains(wheels[dep][0], prereleases=True):
                    problems.append(f"{name} requires {text}; the bundle has {dep} {wheels[dep][0]}")
            elif not is_image_package(dep) and dep not in UNUSED_BY_SUITE.get(name, ()):
                problems.append(f"{name} requires {text}, which neither the bundle nor the image supplies")
    return problems


def write_manifest(folder: Path, python_version: str) -> dict:
    wheels = {}
    for path in sorted(folder.glob("*.whl")):
        name, version, _ = wheel_fields(path)
        if is_image_package(name):
            fail(f"{path.name}: {name} belongs to the node's image and must not be bundled")
        wheels[name] = (version, path)
    if "hgrn-megatron" not in wheels or "deepspeed" not in wheels:
        fail(f"{folder}: the project's wheel or DeepSpeed's is missing")
    problems = check_closure(wheels, python_version)
    if problems:
        fail("incomplete bundle:\n  " + "\n  ".join(problems))
    manifest = {
        "python_version": python_version, "source_hash": source_hash(),
        "wheels": [{"name": n, "version": v, "file": p.name,
                    **({"if_missing": IF_MISSING[n]} if n in IF_MISSING else {})} for n, (v, p) in wheels.items()],
    }
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(folder / MANIFEST)
    return manifest


def tree_bytes(root: Path = ROOT, besides: Path | None = None) -> int:
    """What travels with the working tree: tracked files and untracked files git does not ignore (less the
    folder `besides`, when the bundle itself lies in the tree unignored, so that it is not counted twice)."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=root, check=True,
                                 capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        fail(f"cannot list the working tree with git ({err}); the size check needs it")
    paths = [root / p for p in listing.decode().split("\0") if p]
    if besides is not None:
        besides = besides.resolve()
        paths = [p for p in paths if besides not in p.resolve().parents]
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def size_report(folder: Path, limit_mib: float) -> int:
    tree, bundle = tree_bytes(besides=folder), folder_bytes(folder)
    mib = lambda n: n / 2**20
    print(f"bundle {folder}: {mib(bundle):.1f} MiB; working tree {mib(tree):.1f} MiB; "
          f"together {mib(tree + bundle):.1f} MiB of {limit_mib:g} MiB")
    if tree + bundle > limit_mib * 2**20:
        print(f"gpu_bundle: tree + bundle = {mib(tree + bundle):.1f} MiB exceeds the {limit_mib:g} MiB that can "
              f"travel to the node; drop wheels the image already has, or shrink the tree", file=sys.stderr)
        return 3
    return 0


def read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        fail(f"{folder}: no {MANIFEST} (not a bundle; build one with: bash benchmarks/gpu_bundle.sh)")
    except ValueError as err:
        fail(f"{folder / MANIFEST}: not valid JSON ({err})")


def install_plan(folder: Path) -> list[str]:
    """NAME==VERSION for pip, after checking the bundle fits this interpreter and this tree."""
    manifest = read_manifest(folder)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python_version"] != here:
        fail(f"{folder} was built for Python {manifest['python_version']}, this is Python {here} "
             f"(rebuild: bash benchmarks/gpu_bundle.sh --python-version {here})")
    if manifest["source_hash"] != source_hash():
        fail(f"{folder}: its hgrn-megatron wheel was built from other sources than this tree "
             f"(rebuild: bash benchmarks/gpu_bundle.sh)")
    plan = []
    for wheel in manifest["wheels"]:
        module = wheel.get("if_missing")
        if module and importlib.util.find_spec(module) is not None:
            print(f"gpu_bundle: {wheel['name']}: the image's (bundled {wheel['version']} not installed)",
                  file=sys.stderr)
            continue
        plan.append(f"{wheel['name']}=={wheel['version']}")
    return plan


def unpack(folder: Path, target: Path, specs: list[str]) -> int:
    """Install wheels without pip (for an image that lacks it): a wheel is a zip of its import tree, plus
    `NAME.data/{purelib,platlib}/` to merge into it and `scripts`/`headers`/`data`, which the suite never uses."""
    files = {f"{w['name']}=={w['version']}": w["file"] for w in read_manifest(folder)["wheels"]}
    for spec in specs:
        if spec not in files:
            fail(f"{folder}: no wheel for {spec} in its manifest")
        with zipfile.ZipFile(folder / files[spec]) as zf:
            for member in zf.infolist():
                parts = Path(member.filename).parts
                if ".." in parts or member.filename.startswith("/"):
                    fail(f"{files[spec]}: unsafe member path {member.filename}")
                if parts[0].endswith(".data"):
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                        continue
                    parts = parts[2:]
                if member.is_dir():
                    continue
                dest = target.joinpath(*parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(zf.read(member))
                if member.external_attr >> 16 & 0o111:
                    dest.chmod(0o755)
    return 0


def check_target(target: Path) -> int:
    """The offline install put nothing of the image's into the target, and did put the project there."""
    if not target.is_dir():
        print(f"gpu_bundle: {target}: no such install target", file=sys.stderr)
        return 1
    intruders = [p.name for p in target.iterdir()
                 if is_image_package(p.name.split("-")[0]) or p.name in ("torchgen", "functorch")]
    if intruders:
        print(f"gpu_bundle: {target} holds the image's packages: {', '.join(sorted(intruders))}", file=sys.stderr)
        return 1
    if not (target / "hgrn_megatron").is_dir():
        print(f"gpu_bundle: {target} has no hgrn_megatron after the install", file=sys.stderr)
        return 1
    return 0


def versions(target: Path | None) -> int:
    """Each package the suite uses: its version, and whether the bundle (TARGET) or the image supplied it."""
    from importlib import metadata

    target = target.resolve() if target else None
    print(f"python {sys.version.split()[0]} ({sys.executable})")
    for dist, module in (("torch", "torch"), ("triton", "triton"), ("numpy", "numpy"), ("deepspeed", "deepspeed"),
                         ("megatron-core", "megatron.core"), ("pydantic", "pydantic"), ("sentencepiece",
                         "sentencepiece"), ("zstandard", "zstandard"), ("pyyaml", "yaml"),
                         ("fla-core", "fla"), ("hgrn-megatron", "hgrn_megatron")):
        try:
            spec = importlib.util.find_spec(module)
        except ImportError:
            spec = None
        if spec is None:
            print(f"{dist:14s} MISSING")
            continue
        origin = Path(spec.origin or next(iter(spec.submodule_search_locations))).resolve()
        source = "env" if target is None else "bundle" if target in origin.parents else "image"
        print(f"{dist:14s} {metadata.version(dist):14s} {source:6s} {origin.parent}")
    import torch

    print(f"torch CUDA {torch.version.cuda}, device available: {torch.cuda.is_available()}")
    return 0


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pins").add_argument("--constraints", type=Path, default=ROOT / "constraints.txt")
    manifest = sub.add_parser("manifest")
    manifest.add_argument("folder", type=Path)
    manifest.add_argument("--python-version", required=True)
    size = sub.add_parser("size")
    size.add_argument("folder", type=Path)
    size.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    unpack_parser = sub.add_parser("unpack")
    unpack_parser.add_argument("folder", type=Path)
    unpack_parser.add_argument("target", type=Path)
    unpack_parser.add_argument("specs", nargs="+")
    for name in ("plan", "check-target"):
        sub.add_parser(name).add_argument("folder", type=Path)
    sub.add_parser("versions").add_argument("folder", type=Path, nargs="?")
    args = parser.parse_args(argv)
    if args.command == "pins":
        print("\n".join(download_pins(args.constraints)))
    elif args.command == "manifest":
        manifest = write_manifest(args.folder, args.python_version)
        print(f"manifest: {len(manifest['wheels'])} wheels for Python {args.python_version}, closure complete")
    elif args.command == "size":
        return size_report(args.folder, args.limit_mib)
    elif args.command == "plan":
        print(" ".join(install_plan(args.folder)))
    elif args.command == "unpack":
        return unpack(args.folder, args.target, args.specs)
    elif args.command == "check-target":
        return check_target(args.folder)
    elif args.command == "versions":
        return versions(args.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
