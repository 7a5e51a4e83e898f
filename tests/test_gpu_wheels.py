"""scripts/gpu_wheels: the pinned wheels cover what requirements.txt asks beyond the GPU image, the
download command asks for exactly them (cp312, manylinux x86-64, no dependencies), and the checks of
a folder and of an install name what is missing, unmet or too big. No download here: the real one
(`bash scripts/gpu_wheels.sh`) is run by hand, on a machine with the package index."""

import subprocess
import zipfile

from packaging.utils import canonicalize_name
from packaging.version import Version

from scripts import gpu_wheels
from scripts.gpu_wheels import IMAGE, NOT_CARRIED, WHEELS
from tests.conftest import ROOT


def test_dry_run_prints_the_download_of_the_pins_alone(tmp_path):
    folder = tmp_path / "wheels"
    result = subprocess.run(
        ["bash", "scripts/gpu_wheels.sh", "--dry_run", str(folder)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    command = result.stdout.split("gpu_wheels: ", 1)[1].split()
    assert command[1:4] == ["-m", "pip", "download"]
    flags = " ".join(command)
    assert "--no-deps --only-binary=:all: --python-version 3.12 --implementation cp" in flags
    for platform in ("manylinux2014_x86_64", "manylinux_2_28_x86_64"):
        assert f"--platform {platform}" in flags
    assert command[command.index("-d") + 1] == str(folder)
    pins = [c for c in command if "==" in c]
    assert pins == [f"{name}=={version}" for name, version in WHEELS.items()]
    assert not any(p.startswith(("torch==", "triton==", "nvidia")) for p in pins)  # the image's CUDA stack stays
    assert not folder.exists()


def test_the_pins_meet_requirements_txt_where_the_image_does_not():
    """Every requirement is met by a pinned wheel, by a version read on the image, or is left to the
    check on the machine (a package the image has, its version unread), or is not carried, with why."""
    for r in gpu_wheels.requirements_txt():
        name = canonicalize_name(r.name)
        if name in NOT_CARRIED:
            continue
        if name in WHEELS:
            assert r.specifier.contains(Version(WHEELS[name])), f"{name}=={WHEELS[name]} does not meet {r}"
        else:
            assert name in IMAGE, f"requirements.txt's {r} is neither carried nor in the image"
            if IMAGE[name] is not None:
                assert r.specifier.contains(Version(IMAGE[name])), f"the image's {name} {IMAGE[name]} misses {r}"
    # What the image has in a version requirements.txt refuses travels.
    assert Version(IMAGE["transformers"]) < Version("5.24") and "transformers" in WHEELS
    assert {"datasets", "liger-kernel", "dill", "multiprocess"} <= WHEELS.keys()


def fake_wheel(folder, name: str, version: str, *requires: str) -> None:
    with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
        headers = [f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
        z.writestr(
            f"{name.replace('-', '_')}-{version}.dist-info/METADATA", "\n".join(headers) + "\n\nA description.\n"
        )


def test_the_folder_check_names_what_is_missing_unmet_or_too_big(tmp_path, monkeypatch, capsys):
    for name, version in WHEELS.items():
        if name == "transformers":
            requires = ["huggingface-hub>=2.4.0", "tokenizers>=0.30", "no-such-package", "pyarrow>=24.0.0"]
            requires += ["pywin32; sys_platform == 'win32'", "pytest; extra == 'testing'"]
            fake_wheel(tmp_path, name, version, *requires)
        elif name != "dill":
            fake_wheel(tmp_path, name, version)
    fake_wheel(tmp_path, "extra-package", "1.0")
    assert gpu_wheels.check_folder(tmp_path) == [
        "dill==0.4.1 is missing",
        "extra-package is not on the list (scripts/gpu_wheels.py WHEELS)",
        f"transformers needs tokenizers>=0.30, but tokenizers {IMAGE['tokenizers']} is there",
        "transformers needs no-such-package, which is not there",
    ]
    assert (
        "to check on the machine (scripts/gpu_check.py does): transformers needs pyarrow>=24.0.0"
        in capsys.readouterr().out
    )
    monkeypatch.setattr(gpu_wheels, "MAX_MIB", 0.001)
    assert "MiB, over the 0.001 MiB that may travel" in gpu_wheels.check_folder(tmp_path)[2]


def test_the_install_check_reads_what_this_interpreter_imports(tmp_path):
    """On the machine: the installed packages' requirements and requirements.txt's against the versions
    found first on the path (here: this environment, which requirements.txt installed)."""
    info = tmp_path / "probe-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Name: probe\nVersion: 1.0\nRequires-Dist: packaging>=999\nRequires-Dist: pyyaml\n")
    [problem] = gpu_wheels.check_installed(tmp_path)
    assert problem.startswith("probe needs packaging>=999, but packaging ")
