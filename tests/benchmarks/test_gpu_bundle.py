"""The offline install bundle for GPU nodes (benchmarks/gpu_bundle.sh) and the suite run from it
(benchmarks/gpu_suite.sh --bundle).

The end-to-end test builds the bundle for this machine's Python, then plays the node: a fresh virtual
environment without pip or site-packages of its own, whose only packages are an "image" of symlinks to this
venv's torch, Triton, what torch requires, numpy and pip (the node's image: torch, Triton and their
requirements preinstalled). Before the install that interpreter cannot import DeepSpeed, megatron-core,
pydantic, zstandard, sentencepiece, PyYAML or the project (checked), so everything beyond the image that the
CPU smoke run then uses came from the offline install of the bundle.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_bundle_tool as tool  # noqa: E402

BUNDLED_MODULES = ["deepspeed", "megatron.core", "pydantic", "zstandard", "sentencepiece", "yaml", "fla",
                   "hgrn_megatron"]


def _bash(args: list[str], env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


# ---- argument handling and refusals (fast) ----

@pytest.mark.parametrize("args, message", [
    (["--bundle"], "--bundle needs a folder"),
    (["--bundle", "/nonexistent/bundle"], "no manifest.json there"),
    (["--gpu"], "unknown argument '--gpu'"),
])
def test_suite_rejects_bad_arguments_before_running_anything(args, message, tmp_path):
    result = _bash([str(BENCH / "gpu_suite.sh"), *args], env={**os.environ, "OUT_DIR": str(tmp_path / "out")})
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--python-version", "312"], "expected MAJOR.MINOR"),
    (["--limit-mib", "lots"], "expected a number of MiB"),
    (["--sideways"], "unknown argument '--sideways'"),
])
def test_bundle_script_rejects_bad_arguments(args, message):
    result = _bash([str(BENCH / "gpu_bundle.sh"), *args])
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_size_check_refuses_tree_and_bundle_over_the_limit(tmp_path, capsys):
    tree_mib = tool.tree_bytes() / 2**20
    (tmp_path / "big.whl").write_bytes(b"\0" * 2**21)  # 2 MiB
    assert tool.size_report(tmp_path, limit_mib=tree_mib + 1) == 3
    assert "exceeds the" in capsys.readouterr().err
    assert tool.size_report(tmp_path, limit_mib=tree_mib + 3) == 0


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """A wheel file as pip writes it, reduced to what the closure check reads: its name and METADATA."""
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = "Metadata-Version: 2.1\n" + f"Name: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires) + "\nlong description\nRequires-Dist: not-a-header\n"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


def test_closure_check_finds_missing_and_mismatched_requirements(tmp_path):
    wheels = {tool.normalize(n): (v, _wheel(tmp_path, n, v, reqs)) for n, v, reqs in [
        ("pydantic", "2.14.4", ["pydantic-core==2.50.5", "typing-extensions>=4.16"]),
        ("pydantic-core", "2.50.4", []),
        ("typing-extensions", "4.16.0", []),
        ("deepspeed", "0.19.8", ["torch>=2", "hjson", "nvidia-ml-py", "pytest; extra == 'dev'",
                                 "importlib-metadata; python_version < '3.10'"]),
        ("hgrn-megatron", "0.1.0", ["transformers>=4.45", "tensorboard", "triton>=3.0", "zstandard>=0.22"]),
    ]}
    problems = tool.check_closure(wheels, "3.12")
    assert sorted(problems) == sorted([
        "pydantic requires pydantic-core==2.50.5; the bundle has pydantic-core 2.50.4",
        "deepspeed requires hjson, which neither the bundle nor the image supplies",
        "hgrn-megatron requires zstandard>=0.22, which neither the bundle nor the image supplies",
    ])
    # A requirement of another wheel than the project is not excused by the project's unused list.
    wheels["einops"] = ("0.8.2", _wheel(tmp_path, "einops", "0.8.2", ["tensorboard"]))
    assert "einops requires tensorboard, which neither the bundle nor the image supplies" in \
        tool.check_closure(wheels, "3.12")


def _manifest(folder: Path, **fields) -> Path:
    folder.mkdir(exist_ok=True)
    manifest = {"python_version": f"{sys.version_info.major}.{sys.version_info.minor}",
                "source_hash": tool.source_hash(),
                "wheels": [{"name": "numpy", "version": "1.0", "file": "x.whl", "if_missing": "numpy"},
                           {"name": "deepspeed", "version": "0.19.8", "file": "y.whl"}], **fields}
    (folder / tool.MANIFEST).write_text(json.dumps(manifest))
    return folder


def _plan(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "gpu_bundle_tool.py"), "plan", str(folder)],
                          capture_output=True, text=True, check=False)


def test_install_plan_checks_python_and_sources_and_skips_what_the_image_has(tmp_path):
    ok = _plan(_manifest(tmp_path / "ok"))
    assert ok.returncode == 0 and ok.stdout.split() == ["deepspeed==0.19.8"], ok.stderr  # numpy: this env's
    other_python = _plan(_manifest(tmp_path / "py", python_version="3.99"))
    assert other_python.returncode == 2 and "built for Python 3.99" in other_python.stderr
    stale = _plan(_manifest(tmp_path / "stale", source_hash="0" * 16))
    assert stale.returncode == 2 and "other sources than this tree" in stale.stderr
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / tool.MANIFEST).write_text("{")
    broken = _plan(tmp_path / "broken")
    assert broken.returncode == 2 and "not valid JSON" in broken.stderr


def test_unpack_installs_a_wheel_without_pip(tmp_path):
    """For an image without pip: the import tree and purelib data are unzipped into the target, scripts are not."""
    bundle, target = tmp_path / "bundle", tmp_path / "target"
    _manifest(bundle, wheels=[{"name": "pkg", "version": "1.0", "file": "pkg-1.0-py3-none-any.whl"}])
    with zipfile.ZipFile(bundle / "pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("pkg/__init__.py", "VALUE = 3\n")
        zf.writestr("pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\n")
        zf.writestr("pkg-1.0.data/purelib/pkg_extra.py", "EXTRA = 4\n")
        zf.writestr("pkg-1.0.data/scripts/pkg-tool", "#!/bin/sh\n")
    assert tool.unpack(bundle, target, ["pkg==1.0"]) == 0
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == [
        "pkg-1.0.dist-info/METADATA", "pkg/__init__.py", "pkg_extra.py"]
    found = subprocess.run([sys.executable, "-c", "import pkg, pkg_extra; print(pkg.VALUE + pkg_extra.EXTRA)"],
                           env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "7"
    with pytest.raises(SystemExit):
        tool.unpack(bundle, target, ["pkg==2.0"])


def test_target_check_refuses_the_image_packages(tmp_path):
    (tmp_path / "hgrn_megatron").mkdir()
    assert tool.check_target(tmp_path) == 0
    (tmp_path / "nvidia").mkdir()
    (tmp_path / "torch-2.11.0.dist-info").mkdir()
    assert tool.check_target(tmp_path) == 1


def test_source_hash_follows_the_packaged_sources(tmp_path):
    for folder in tool.SOURCE_FOLDERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "setup.py").write_text("")
    before = tool.source_hash(tmp_path)
    (tmp_path / "kernels" / "__pycache__").mkdir()
    (tmp_path / "kernels" / "__pycache__" / "x.py").write_text("ignored")
    (tmp_path / "README.md").write_text("not packaged")
    assert tool.source_hash(tmp_path) == before
    (tmp_path / "kernels" / "scan.py").write_text("changed = True")
    assert tool.source_hash(tmp_path) != before


# ---- the node played on this machine (minutes: downloads, a DeepSpeed build on first use, the smoke run) ----

def _image_distributions() -> list[str]:
    """torch and Triton with what they require (markers as on the node's Python 3.12), numpy and pip."""
    from packaging.requirements import Requirement

    env = {"python_version": "3.12", "python_full_version": "3.12.0", "extra": ""}
    todo, seen = ["torch", "triton", "numpy", "pip"], set()
    while todo:
        name = tool.normalize(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a requirement of the CUDA build (nvidia-*) on this CPU build's metadata, or a marker's
        seen.add(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return sorted(seen)


def _make_image_python(root: Path) -> Path:
    """A venv with no pip or site-packages of its own; `image.pth` adds a folder of symlinks to this venv's
    copies of the image's distributions (their top-level packages and .dist-info folders) and nothing else."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "node")], check=True)
    python = root / "node" / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    image = root / "image"
    image.mkdir()
    for name in _image_distributions():
        dist = metadata.distribution(name)
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith(("..", "__pycache__"))}
        for top in tops:
            if not (image / top).exists() and (base / top).exists():
                (image / top).symlink_to(base / top)
    (site / "image.pth").write_text(f"{image}\n")
    return python


def _node_env(python: Path, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env.pop("TRITON_INTERPRET", None)
    return {**env, "PYTHON": str(python), "OUT_DIR": str(out), "PYTHONNOUSERSITE": "1",
            "TMPDIR": str(out.parent)}


@pytest.mark.heavy
def test_bundle_installs_offline_and_the_cpu_smoke_suite_runs_from_it(tmp_path):
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    bundle = tmp_path / "bundle"
    built = _bash([str(BENCH / "gpu_bundle.sh"), "--python-version", here, "--out", str(bundle)], timeout=900)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    assert f"bash benchmarks/gpu_suite.sh --bundle {bundle}" in built.stdout
    assert re.search(r"together \d+\.\d MiB of 64 MiB", built.stdout)
    manifest = json.loads((bundle / tool.MANIFEST).read_text())
    names = {w["name"] for w in manifest["wheels"]}
    assert {"deepspeed", "megatron-core", "hgrn-megatron", "zstandard", "sentencepiece", "pydantic", "fla-core"} <= names
    assert not any(tool.is_image_package(n) for n in names)
    # Over the limit: refused, and the bundle already there is left as it was.
    refused = _bash([str(BENCH / "gpu_bundle.sh"), "--python-version", here, "--out", str(bundle),
                     "--limit-mib", "2"], timeout=900)
    assert refused.returncode == 3 and "refused" in refused.stderr
    assert json.loads((bundle / tool.MANIFEST).read_text()) == manifest

    python = _make_image_python(tmp_path)
    probe = "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m.split('.')[0])])"
    before = subprocess.run([str(python), "-c", probe, "torch", "triton", "numpy", *BUNDLED_MODULES],
                            capture_output=True, text=True, check=True, env=_node_env(python, tmp_path / "x"),
                            cwd=tmp_path)  # not the repository root: its hgrn_megatron/ folder would be found
    assert before.stdout.strip() == "['torch', 'triton', 'numpy']"  # the image alone: no bundled package yet

    # Without pip the wheels are unzipped: the same import tree as pip's install (less pip's own records).
    unpacked, by_pip = tmp_path / "unpacked", tmp_path / "by-pip"
    specs = [f"{w['name']}=={w['version']}" for w in manifest["wheels"]]
    assert tool.unpack(bundle, unpacked, specs) == 0
    subprocess.run([sys.executable, "-m", "pip", "--isolated", "install", "--no-index", "--find-links", str(bundle),
                    "--no-deps", "--no-compile", "--target", str(by_pip), "--quiet", *specs], check=True)

    def tree(root: Path) -> set[str]:
        skip = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
        return {str(p.relative_to(root)) for p in root.rglob("*")
                if p.is_file() and p.name not in skip and p.relative_to(root).parts[0] != "bin"}
    assert tree(unpacked) == tree(by_pip)
    # The scan benchmark's baseline imports from the bundle alone (on a GPU it times it; the smoke run skips it).
    fla = subprocess.run([str(python), "-c", "from fla.ops.hgrn import chunk_hgrn, fused_recurrent_hgrn"],
                         env={**_node_env(python, tmp_path / "x"), "PYTHONPATH": str(unpacked)}, cwd=tmp_path,
                         capture_output=True, text=True, check=False)
    assert fla.returncode == 0, fla.stderr[-2000:]

    out = tmp_path / "suite"
    run = _bash([str(BENCH / "gpu_suite.sh"), "--cpu-smoke", "--bundle", str(bundle)],
                env=_node_env(python, out), timeout=1800)
    log = run.stdout[-3000:] + run.stderr[-3000:]
    assert run.returncode == 0, log
    env_txt = (out / "env.txt").read_text()
    for dist in ("deepspeed", "megatron-core", "pydantic", "zstandard", "sentencepiece", "pyyaml", "fla-core",
                 "hgrn-megatron"):
        assert re.search(rf"^{dist} +\S+ +bundle ", env_txt, re.M), (dist, env_txt)
    for dist in ("torch", "triton", "numpy"):
        assert re.search(rf"^{dist} +\S+ +image ", env_txt, re.M), (dist, env_txt)
    target = re.search(r"offline into (\S+) in", env_txt).group(1)
    assert not Path(target).exists()  # removed at exit
    scan = json.loads((out / "scan.json").read_text())
    assert scan["correctness"] and all(c["pass"] for c in scan["correctness"].values())
    assert "compiled 10 kernel variants to sm_90 cubin" in (out / "scan_compile.log").read_text()
    train = json.loads((out / "train.json").read_text())
    assert [r["model"] for r in train["rows"]] == ["tiny:hgrn", "tiny:attention"]
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in train["rows"]), train["rows"]
    assert json.loads((out / "suite.json").read_text())["goals"]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["env.txt", "scan.json", "scan.log", "scan_compile.log", "suite.json", "train.json",
                     "train.log"]

    # The GPU mode's plumbing on an image without pip: the wheels are unpacked, the parts run under their limits
    # and fail for want of a device (exit 2 each), and the report is still written.
    for entry in (tmp_path / "image").glob("pip*"):
        entry.unlink()
    gpu_out = tmp_path / "gpu-mode"
    gpu = _bash([str(BENCH / "gpu_suite.sh"), "--bundle", str(bundle)], env=_node_env(python, gpu_out), timeout=600)
    assert gpu.returncode == 0, gpu.stdout[-3000:] + gpu.stderr[-3000:]
    env_txt = (gpu_out / "env.txt").read_text()
    assert "no pip in this image: unpacking the wheels instead" in env_txt
    assert re.search(r"^megatron-core +\S+ +bundle ", env_txt, re.M), env_txt
    assert "scan benchmark: exit 2" in gpu.stdout and "training steps: exit 2" in gpu.stdout
    assert "no CUDA device" in (gpu_out / "scan.log").read_text()
    assert sorted(p.name for p in gpu_out.iterdir()) == ["env.txt", "scan.log", "suite.json", "train.log"]


@pytest.mark.heavy
def test_default_bundle_installs_offline_for_the_nodes_python_312(tmp_path):
    """The bundle as shipped (Python 3.12, cp312 manylinux wheels) installs with no index for a CPython 3.12
    x86-64 interpreter, as pip on the node selects wheels, and leaves the image's packages out."""
    bundle, target = tmp_path / "bundle", tmp_path / "target"
    built = _bash([str(BENCH / "gpu_bundle.sh"), "--out", str(bundle)], timeout=900)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    manifest = json.loads((bundle / tool.MANIFEST).read_text())
    assert manifest["python_version"] == "3.12"
    specs = [f"{w['name']}=={w['version']}" for w in manifest["wheels"]]
    platforms = re.search(r"PLATFORMS=\((manylinux[^)]*)\)", (BENCH / "gpu_bundle.sh").read_text()).group(1).split()
    subprocess.run([sys.executable, "-m", "pip", "--isolated", "install", "--no-index", "--find-links", str(bundle),
                    "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                    "--abi", "cp312", *[a for p in platforms for a in ("--platform", p)], "--target", str(target),
                    "--quiet", *specs], check=True)
    assert tool.check_target(target) == 0
    assert list((target / "pydantic_core").glob("_pydantic_core.cpython-312-x86_64-linux-gnu.so"))
