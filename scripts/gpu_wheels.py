"""The wheels the lent GPU machine's image lacks for minrm and scripts/gpu_check.py, downloaded here
(a machine with the package index) for that image's Python 3.12 on x86-64 Linux. They travel with the
working tree and scripts/gpu_check.py installs them there (`pip install --no-index --no-deps
--target`), first on PYTHONPATH:

    bash scripts/gpu_wheels.sh [DIR]            # DIR: .gpu_wheels (ignored by git)
    bash scripts/gpu_wheels.sh --dry_run [DIR]  # prints the pip command, downloads nothing

The image (the lent machines' description, read 2026-11) has torch 2.11 (CUDA 13), transformers 5.17, triton,
huggingface_hub 1.33, tokenizers, safetensors, pyarrow, pandas, pytest, pyyaml, but not datasets,
liger-kernel, wandb, dill or multiprocess, and its transformers is older than requirements.txt asks.
Each wheel is pinned (`--no-deps`: nothing the image has, torch above all, is pulled in) to the version
the CPU suite runs on. After the download every requirement of every wheel is checked against the
folder and the image's packages; a requirement on an image package whose version nobody has read
there is checked by scripts/gpu_check.py after the install (`check_installed`).
"""

import argparse
import email
import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / ".gpu_wheels"
MAX_MIB = 60  # the working tree travels in 64 MiB with what it carries
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
WHEELS = {  # name: version, and why it travels
    "transformers": "5.25.0",  # the image's 5.17 is older than requirements.txt's >=5.24
    "huggingface-hub": "2.4.0",  # transformers 5.25 asks >=2.4 (checked at import); the image has 1.33
    "httpx2": "2.17.0",  # huggingface-hub 2.4's HTTP client, and what it needs:
    "httpcore2": "2.17.0",
    "anyio": "4.16.0",
    "h11": "0.16.0",
    "idna": "3.21",
    "truststore": "0.10.5",
    "typing-extensions": "4.16.0",  # anyio 4.16 asks >=4.16
    "click": "8.5.1",  # huggingface-hub 2.4 asks >=8.4.2
    "hf-xet": "1.8.0",  # huggingface-hub 2.4 asks >=1.6
    "kernels": "0.19.1",  # transformers 5.25 asks >=0.19.1,<0.20
    "tomlkit": "0.15.3",  # kernels'
    "regex": "2026.12.2",  # transformers 5.25 asks >=2025.10.22 (checked at import)
    "datasets": "5.2.0",  # not in the image
    "dill": "0.4.1",  # datasets', not in the image
    "multiprocess": "0.70.19",  # datasets', not in the image
    "fsspec": "2026.9.0",  # datasets 5.2 asks <=2026.9.0
    "liger-kernel": "0.8.5",  # not in the image
}
# What requirements.txt names that does not travel, and why.
NOT_CARRIED = {
    "torch": "the image's CUDA build (2.11) runs the GPU path: a CUDA torch wheel is far over the size limit",
    "wandb": "imported only with --with_tracking, which no part of the check uses",
}
# The image's packages that the wheels or requirements.txt name: the version read there, or None
# where the package is there but nobody has read its version (KINDS.md's lists, 2026-11).
IMAGE = {
    "torch": "2.11.0",
    "triton": "3.6.0",
    "transformers": "5.17.0",
    "huggingface-hub": "1.33.0",
    "tokenizers": "0.23.2",
    "safetensors": "0.8.0",
    "accelerate": "1.15.0",
    "numpy": "2.5.2",
    **dict.fromkeys(["filelock", "matplotlib", "packaging", "pandas", "pyarrow", "pyyaml", "tqdm", "typer", "xxhash"]),
}
# The image's interpreter, for the wheels' environment markers.
TARGET = dict(
    python_version="3.12",
    python_full_version="3.12.3",
    sys_platform="linux",
    platform_system="Linux",
    platform_machine="x86_64",
    platform_python_implementation="CPython",
    implementation_name="cpython",
    os_name="posix",
    extra="",
)


def download_command(folder: Path) -> list[str]:
    flags = ["--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    flags += [f for p in PLATFORMS for f in ("--platform", p)]
    pins = [f"{name}=={version}" for name, version in WHEELS.items()]
    return [sys.executable, "-m", "pip", "download", "--quiet", *flags, "-d", str(folder), *pins]


def needs(requires: list[str]) -> list[Requirement]:
    """The requirements that hold on the image's interpreter, extras left out."""
    found = [Requirement(r) for r in requires]
    return [r for r in found if r.marker is None or r.marker.evaluate(TARGET)]


def unmet(requires: dict[str, list[str]], have: dict[str, str | None]) -> tuple[list[str], list[str]]:
    """Each package's requirements (`requires`: name -> Requires-Dist lines) against `have` (name ->
    version, None when there but unread): what is not met, and what only the machine itself can tell."""
    problems, unread = [], []
    for name, lines in requires.items():
        for r in needs(lines):
            dep = canonicalize_name(r.name)
            if dep not in have:
                problems.append(f"{name} needs {r}, which is not there")
            elif have[dep] is None:
                if r.specifier:
                    unread.append(f"{name} needs {r}")
            elif not r.specifier.contains(Version(have[dep]), prereleases=True):
                problems.append(f"{name} needs {r}, but {dep} {have[dep]} is there")
    return problems, unread


def wheel_requires(folder: Path) -> dict[str, list[str]]:
    """Each wheel's name -> its Requires-Dist lines, read from the wheel's METADATA."""
    found = {}
    for wheel in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
            headers = email.message_from_bytes(z.read(meta))
        found[canonicalize_name(headers["Name"])] = headers.get_all("Requires-Dist") or []
    return found


def name_version(wheel: Path) -> tuple[str, str]:
    name, version = wheel.name.split("-")[:2]
    return canonicalize_name(name), version


def check_folder(folder: Path) -> list[str]:
    """What is wrong with the folder: a pinned wheel missing or in another version, one not on the
    list, an unmet requirement, or a total over MAX_MIB."""
    wheels = dict(name_version(w) for w in folder.glob("*.whl"))
    problems = [f"{n}=={v} is missing" for n, v in WHEELS.items() if wheels.get(n) != v]
    problems += [f"{w} is not on the list (scripts/gpu_wheels.py WHEELS)" for w in wheels.keys() - WHEELS.keys()]
    found, unread = unmet(wheel_requires(folder), {**IMAGE, **WHEELS})
    mib = sum(w.stat().st_size for w in folder.glob("*.whl")) / 2**20
    if mib > MAX_MIB:
        problems.append(f"the wheels take {mib:.1f} MiB, over the {MAX_MIB} MiB that may travel")
    for line in unread:
        print(f"gpu_wheels: to check on the machine (scripts/gpu_check.py does): {line}")
    return problems + found


def requirements_txt() -> list[Requirement]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]


def check_installed(site: Path) -> list[str]:
    """On the machine, after the install: the requirements of what `site` holds, and requirements.txt's
    but NOT_CARRIED, against the versions this interpreter imports (`site` first on its path)."""
    installed = importlib.metadata.distributions(path=[str(site)])
    requires = {canonicalize_name(d.metadata["Name"]): d.requires or [] for d in installed}
    requires["requirements.txt"] = [str(r) for r in requirements_txt() if canonicalize_name(r.name) not in NOT_CARRIED]
    have = {}
    for r in needs([line for lines in requires.values() for line in lines]):
        try:
            have[canonicalize_name(r.name)] = importlib.metadata.version(r.name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return unmet(requires, have)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", nargs="?", default=str(DEFAULT_DIR), help="the folder of wheels")
    parser.add_argument("--dry_run", action="store_true", help="print the pip command and download nothing")
    args = parser.parse_args()
    folder, command = Path(args.dir).resolve(), download_command(Path(args.dir).resolve())
    print("gpu_wheels: " + " ".join(command), flush=True)
    if args.dry_run:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (w for w in folder.glob("*.whl") if name_version(w) not in WHEELS.items()):
        print(f"gpu_wheels: removing {stale.name}: not on the list (two versions of one package stop the install)")
        stale.unlink()
    if rc := subprocess.run(command).returncode:
        raise SystemExit(f"gpu_wheels: error: pip download failed ({rc}, above): a pin that has no cp312 x86-64 wheel?")
    if problems := check_folder(folder):
        raise SystemExit("gpu_wheels: error: " + "\ngpu_wheels: error: ".join(problems))
    for w in sorted(folder.glob("*.whl")):
        print(f"  {w.stat().st_size / 2**20:6.2f} MiB  {w.name}")
    total = sum(w.stat().st_size for w in folder.glob("*.whl")) / 2**20
    print(f"gpu_wheels: {len(WHEELS)} wheels, {total:.1f} MiB (at most {MAX_MIB}) in {folder}")


if __name__ == "__main__":
    main()
