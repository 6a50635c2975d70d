#!/usr/bin/env python3
"""An emulated arm64 Debian 12 host (Raspberry Pi OS is Debian 12 with Python 3.11) with an sshd on 127.0.0.1.

For ``edgeres bench --remote`` / ``edgeres eval --remote`` without a Raspberry Pi: the userland is real
arm64 Debian 12 (python3.11, OpenSSH) plus the aarch64 wheels of numpy and the runtimes, run by
qemu-user through binfmt_misc, so the runner executes the runtimes' own ARM kernels (NEON, dot-product).
Latency there is the emulator's, never a device figure; accuracy is the ARM kernels' own.

    sudo python3 tests/arm64_host.py serve           # build (cached) and serve until Ctrl-C
    sudo python3 tests/arm64_host.py build           # only build / check the cache

Needs root (chroot, mounts), apt (the host's Debian sources, for the arm64 packages), pip (the
aarch64 wheels) and qemu-user-static + binfmt-support with the qemu-aarch64 entry enabled
(``mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; update-binfmts --enable qemu-aarch64``).

Why unpacked packages, not debootstrap: maintainer scripts under emulation took over 15 minutes;
``apt-get download`` + unpacking takes seconds and nothing in the image needs those scripts.
Why sshd inside the arm64 root (itself emulated) rather than the host's sshd with a chroot command:
every program the remote side runs (the shell, mktemp, python) is then the arm64 build, as on a Pi.
The image is built once into ``~/.cache/edgeres/arm64-<key>``, the key hashing the package and
wheel lists below, so a changed list builds a new image and an unchanged one starts in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

IMAGE_VERSION = 2
# the closure of these is unpacked (apt resolves it for arm64 from the host's Debian 12 sources)
DEB_PACKAGES = ("python3-minimal", "libpython3.11-stdlib", "openssh-server", "dash", "coreutils", "libstdc++6")
WHEELS = ("numpy==2.2.6", "onnxruntime==1.32.0", "ai-edge-litert==2.3.0", "openvino==2026.4.1")
# the aarch64 wheels' tags (litert is manylinux_2_27, openvino 2_35; Debian 12 has glibc 2.36)
WHEEL_PLATFORMS = ("manylinux_2_35_aarch64", "manylinux_2_28_aarch64", "manylinux_2_27_aarch64",
                   "manylinux_2_17_aarch64", "manylinux2014_aarch64")
CPUS = {"cortex-a76": "Raspberry Pi 5 (BCM2712, 4x Cortex-A76)", "cortex-a72": "Raspberry Pi 4 (BCM2711, 4x Cortex-A72)"}
DEFAULT_CPU = "cortex-a76"
USER = "pi"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeres"


class HostUnavailable(RuntimeError):
    """This machine cannot run the emulated host (not root, no binfmt, no apt...); the message says why."""


def log(message: str) -> None:
    print(f"arm64-host: {message}", file=sys.stderr, flush=True)


def image_key() -> str:
    spec = json.dumps([IMAGE_VERSION, DEB_PACKAGES, WHEELS, WHEEL_PLATFORMS])
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def image_dir() -> Path:
    return CACHE / f"arm64-debian12-py311-{image_key()}"


# --- can this machine run it ---------------------------------------------------------------------

def unavailable_reason() -> str | None:
    """Why the emulated host cannot run here, or None when it can."""
    if sys.platform != "linux":
        return "needs Linux (binfmt_misc and chroot)"
    if os.uname().machine == "aarch64":
        return "this machine is arm64 itself: use `edgeres bench` locally or a real device"
    if os.geteuid() != 0:
        return "needs root (chroot and mounts); run as root or with sudo"
    for tool in ("apt-get", "dpkg-deb", "tar", "chroot", "unshare", "ssh", "scp", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install openssh-client util-linux coreutils)"
    if not (BINFMT / "status").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True)
    if not (BINFMT / "status").exists():
        return f"binfmt_misc cannot be mounted at {BINFMT} (a container without it?)"
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists() and shutil.which("update-binfmts"):
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
    if not entry.exists():
        return "no qemu-aarch64 binfmt entry (apt-get install qemu-user-static binfmt-support)"
    text = entry.read_text()
    if not text.startswith("enabled"):
        return "the qemu-aarch64 binfmt entry is disabled (update-binfmts --enable qemu-aarch64)"
    flags = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("flags:")), "")
    if "F" not in flags:  # without F the interpreter would have to exist inside the chroot
        return f"the qemu-aarch64 binfmt entry lacks the F flag (flags: {flags}); reinstall qemu-user-static"
    return None


# --- the image -----------------------------------------------------------------------------------

def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise HostUnavailable(f"{what} failed (exit {out.returncode}): {' | '.join(tail)}")
    return out


def _apt_config(work: Path) -> Path:
    """A private apt state for arm64 (the host's sources and keys; the host's dpkg is never touched)."""
    for d in ("lists/partial", "archives/partial", "prefs"):
        (work / d).mkdir(parents=True, exist_ok=True)
    (work / "status").touch()
    conf = work / "apt.conf"
    conf.write_text("\n".join([
        'APT::Architecture "arm64";', 'APT::Architectures { "arm64"; };', 'APT::Install-Recommends "false";',
        f'Dir::State "{work}";', f'Dir::State::Lists "{work}/lists";', f'Dir::State::status "{work}/status";',
        f'Dir::Cache "{work}";', f'Dir::Cache::archives "{work}/archives";',
        'Dir::Etc::Preferences "/dev/null";', f'Dir::Etc::PreferencesParts "{work}/prefs";',
        'Debug::NoLocking "true";', ""]))
    return conf


def _download_debs(work: Path) -> list[Path]:
    env = {**os.environ, "APT_CONFIG": str(_apt_config(work)), "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], "apt-get update (arm64 lists)", env=env)
    _run(["apt-get", "install", "-y", "-qq", "--download-only", *DEB_PACKAGES], "apt-get download (arm64)", env=env)
    debs = sorted((work / "archives").glob("*.deb"))
    if not debs:
        raise HostUnavailable("apt downloaded no arm64 package; do the host's apt sources carry arm64 (Debian 12)?")
    return debs


def _unpack(debs: list[Path], root: Path) -> None:
    # merged /usr as Debian 12 has it; tar keeps these links instead of replacing them with folders
    for d in ("bin", "sbin", "lib"):
        (root / "usr" / d).mkdir(parents=True, exist_ok=True)
        (root / d).symlink_to(f"usr/{d}")
    for deb in debs:
        fsys = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        _run(["tar", "-x", "--keep-directory-symlink", "-C", str(root)], f"unpacking {deb.name}", stdin=fsys.stdout)
        if fsys.wait() != 0:
            raise HostUnavailable(f"dpkg-deb could not read {deb}")


def _install_wheels(root: Path) -> None:
    site = root / "usr/local/lib/python3.11/dist-packages"
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--target", str(site), *platforms,
          "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
          *WHEELS], "pip install of the aarch64 wheels")


def _configure(root: Path) -> None:
    etc = root / "etc"
    (etc / "passwd").write_text(f"root:x:0:0:root:/root:/bin/sh\nsshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n"
                                f"{USER}:x:1000:1000:{USER}:/home/{USER}:/bin/sh\n")
    (etc / "group").write_text(f"root:x:0:\nnogroup:x:65534:\n{USER}:x:1000:\n")
    (etc / "shadow").write_text(f"root:*:19000:0:99999:7:::\nsshd:*:19000:0:99999:7:::\n{USER}:*:19000:0:99999:7:::\n")
    os.chmod(etc / "shadow", 0o640)
    (etc / "hostname").write_text("raspberrypi-emulated\n")
    for d, mode in (("tmp", 0o1777), ("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("run/sshd", 0o755), ("root", 0o700),
                    (f"home/{USER}", 0o755), ("run/edgeres", 0o755)):
        (root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(root / d, mode)
    os.chown(root / "home" / USER, 1000, 1000)


def _check_image(root: Path) -> None:
    probe = "import numpy, onnxruntime, ai_edge_litert.interpreter, platform; print(platform.machine())"
    out = _run(["chroot", str(root), "/usr/bin/python3", "-c", probe], "the arm64 python probe", timeout=300)
    if out.stdout.strip() != "aarch64":
        raise HostUnavailable(f"the image's python reports {out.stdout.strip()!r}, not aarch64")


def build_image(force: bool = False) -> Path:
    """The cached image root (built when missing: a few minutes; reused: instant)."""
    reason = unavailable_reason()
    if reason:
        raise HostUnavailable(reason)
    final = image_dir()
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".arm64-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second build waits for the first and then reuses it
        if (final / "ready").exists() and not force:
            return final / "root"
        if final.exists():
            shutil.rmtree(final)
        t0 = time.time()
        work = Path(tempfile.mkdtemp(prefix=f"{final.name}.building-", dir=CACHE))
        try:
            log(f"building the arm64 image in {final} (once; a few minutes)…")
            debs = _download_debs(work / "apt")
            log(f"unpacking {len(debs)} arm64 packages…")
            _unpack(debs, work / "root")
            log("installing the aarch64 wheels: " + ", ".join(WHEELS))
            _install_wheels(work / "root")
            _configure(work / "root")
            _check_image(work / "root")
            shutil.rmtree(work / "apt")
            (work / "ready").write_text(json.dumps({"debs": [d.name for d in debs], "wheels": WHEELS,
                                                    "build_s": round(time.time() - t0, 1)}, indent=1))
            os.rename(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        log(f"image ready in {time.time() - t0:.0f} s")
        return final / "root"


# --- the running host ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Arm64Host:
    """A running emulated host: ``destination`` and ``ssh_options`` are what ``edgeres --remote`` takes."""

    root: Path
    port: int
    cpu: str
    state: Path  # this run's keys and config, inside the root at /run/edgeres/<id>
    pid: int

    @property
    def destination(self) -> str:
        return f"{USER}@127.0.0.1"

    @property
    def ssh_options(self) -> tuple[str, ...]:
        return (f"Port={self.port}", f"IdentityFile={self.state / 'client_key'}", "IdentitiesOnly=yes",
                f"UserKnownHostsFile={self.state / 'known_hosts'}")

    def cli_args(self) -> list[str]:
        return ["--remote", self.destination, *[a for o in self.ssh_options for a in ("--ssh-option", o)]]

    def ssh(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        opts = [a for o in self.ssh_options for a in ("-o", o)] + ["-o", "BatchMode=yes"]
        return subprocess.run(["ssh", *opts, self.destination, command], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_state(root: Path, port: int, cpu: str) -> Path:
    state = Path(tempfile.mkdtemp(prefix=f"sshd-{port}-", dir=root / "run/edgeres"))
    os.chmod(state, 0o755)
    for name in ("host_key", "client_key"):
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(state / name)], "ssh-keygen")
    shutil.copy(state / "client_key.pub", state / "authorized_keys")
    host_pub = (state / "host_key.pub").read_text().split()
    (state / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    inside = "/" + str(state.relative_to(root))
    (state / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {inside}/host_key",
        f"AuthorizedKeysFile {inside}/authorized_keys", "UsePAM no", "StrictModes no",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin no",
        f"AllowUsers {USER}", "PidFile none", "Subsystem sftp internal-sftp",  # scp speaks SFTP
        # sshd gives sessions a clean environment; qemu reads the CPU model from it at every exec
        f"SetEnv QEMU_CPU={cpu}", "LogLevel ERROR", ""]))
    return state


# MIDR fields of the emulated cores (the kernel of a real Pi prints these in /proc/cpuinfo)
CPU_IDS = {"cortex-a76": ("0x4", "0xd0b", "1"), "cortex-a72": ("0x0", "0xd08", "3")}
RUNNER = Path(__file__).resolve().parents[1] / "edgeres" / "measure" / "bench_runner.py"


def _hwcap_names(root: Path, cpu: str) -> list[str]:
    """The features qemu gives the emulated CPU (read in the image, decoded with the runner's table)."""
    probe = ("import ctypes; f = ctypes.CDLL(None).getauxval; f.restype = ctypes.c_ulong; "
             "f.argtypes = [ctypes.c_ulong]; print(f(16), f(26))")
    out = _run(["chroot", str(root), "/usr/bin/python3", "-c", probe], "the HWCAP probe", timeout=120,
               env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "QEMU_CPU": cpu})
    spec = importlib.util.spec_from_file_location("edgeres_bench_runner", RUNNER)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    words = [int(w) for w in out.stdout.split()]
    return [n for w, names in zip(words, (runner.HWCAP_NAMES, runner.HWCAP2_NAMES))
            for bit, n in enumerate(names) if w >> bit & 1]


def _cpuinfo(root: Path, cpu: str, state: Path) -> Path:
    """A /proc/cpuinfo in the aarch64 kernel's format for the emulated CPU, shown in place of the x86
    host's: onnxruntime's and OpenVINO's CPU probes read it (with the host's x86 text they crash).
    Its Model line says it is emulated; the runner detects emulation from the kernel, not from this."""
    variant, part, revision = CPU_IDS[cpu]
    features = " ".join(_hwcap_names(root, cpu))
    block = (f"BogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
             f"CPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: {revision}\n\n")
    text = "".join(f"processor\t: {i}\n{block}" for i in range(os.cpu_count() or 1))
    path = state / "cpuinfo"
    path.write_text(text + f"Model\t\t: qemu-user emulated {cpu} ({CPUS[cpu]}), not a device\n")
    return path


def start_host(cpu: str = DEFAULT_CPU, port: int | None = None, timeout_s: float = 60) -> Arm64Host:
    """Start sshd in the arm64 root (own mount namespace: /proc and /dev vanish with it)."""
    if cpu not in CPUS:
        raise HostUnavailable(f"--cpu {cpu!r}: choose one of {', '.join(CPUS)}")
    root = build_image()
    port = port or _free_port()
    state = _write_state(root, port, cpu)
    inside = "/" + str(state.relative_to(root))
    cpuinfo = _cpuinfo(root, cpu, state)
    # OpenVINO's CPU plugin needs sysfs (without it compile_model crashes); the host's is shown
    script = (f'mount -t proc proc "$1/proc" && mount --bind "$2" "$1/proc/cpuinfo" && mount --bind /dev "$1/dev" && '
              f'mount -t sysfs sysfs "$1/sys" && exec chroot "$1" /usr/sbin/sshd -D -e -f {inside}/sshd_config')
    log_file = open(state / "sshd.log", "w")
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(root), str(cpuinfo)],
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "QEMU_CPU": cpu},
                            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    host = Arm64Host(root, port, cpu, state, proc.pid)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            stop_host(host)
            raise HostUnavailable(f"sshd exited: {(state / 'sshd.log').read_text().strip()[-300:] if state.exists() else ''}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return host
        time.sleep(0.2)
    stop_host(host)
    raise HostUnavailable(f"sshd in the arm64 root did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s")


def processes_in(root: Path) -> list[int]:
    """Pids whose root directory is the image (sshd's sessions and whatever they started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "root") == str(root):
                    pids.append(int(entry.name))
    return pids


def stop_host(host: Arm64Host) -> None:
    """Stop the sshd and every process its sessions left, then remove this run's keys."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(host.pid, signal.SIGTERM)
    with contextlib.suppress(ChildProcessError):
        for _ in range(50):
            if os.waitpid(host.pid, os.WNOHANG) != (0, 0):
                break
            time.sleep(0.1)
        else:
            os.kill(host.pid, signal.SIGKILL)
            os.waitpid(host.pid, 0)
    # started by this sshd and still running in this image (only when nothing else serves from it)
    if not any(p for p in processes_in(host.root) if _is_sshd_listener(p)):
        for pid in processes_in(host.root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            if not processes_in(host.root):
                break
            time.sleep(0.1)
    shutil.rmtree(host.state, ignore_errors=True)


def _is_sshd_listener(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return b"sshd" in Path(f"/proc/{pid}/cmdline").read_bytes() and b"-D" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return False


@contextlib.contextmanager
def running_host(cpu: str = DEFAULT_CPU):
    host = start_host(cpu)
    try:
        yield host
    finally:
        stop_host(host)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="An emulated arm64 Debian 12 host with sshd on 127.0.0.1.")
    p.add_argument("command", choices=("build", "serve", "check"))
    p.add_argument("--cpu", default=DEFAULT_CPU, choices=sorted(CPUS), help="emulated CPU [cortex-a76, a Pi 5's]")
    p.add_argument("--port", type=int, help="sshd port [a free one]")
    p.add_argument("--rebuild", action="store_true", help="build the image again even when cached")
    args = p.parse_args(argv)
    try:
        if args.command == "check":
            print(unavailable_reason() or "ok")
            return 0
        root = build_image(force=args.rebuild)
        if args.command == "build":
            print(root)
            return 0
        host = start_host(args.cpu, args.port)
    except HostUnavailable as e:
        print(f"arm64-host: error: {e}", file=sys.stderr)
        return 2
    print(f"emulated {CPUS[args.cpu]} ({args.cpu}) on qemu-user; sshd on 127.0.0.1:{host.port}. Try:\n"
          f"  edgeres bench DIR {' '.join(host.cli_args())} --runs 10\n"
          f"Ctrl-C stops it.", flush=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        stop_host(host)
    return 0


if __name__ == "__main__":
    sys.exit(main())
