"""A stand-in for ``PythonSlicer``, the launcher Slicer sets as ``sys.executable``, written from
its source, so that the worker tests start the worker the way Slicer does.

``python app_launcher.py <launcher path> [arguments...]`` behaves as the launcher binary at
``<launcher path>`` would; :func:`install` writes such a launcher (a ``PythonSlicer`` that execs
this file, its settings file and a ``python-real``). POSIX only, like the tests that use it.

Reproduced from the source (commontk/AppLauncher at dcb7a7e; Slicer/Slicer at 583e9b37d5):

1. ``CMake/SlicerBlockInstallPython.cmake`` (``_install_python_launcher``): ``bin/PythonSlicer``
   is the CTKAppLauncher binary renamed, with ``bin/PythonSlicerLauncherSettings.ini``; the real
   interpreter is installed beside it as ``bin/python-real``.
2. ``SuperBuild/python_configure_python_launcher.cmake``: the settings name ``python-real`` as
   the application (``[Application] path=<APPLAUNCHER_DIR>/python-real``), disable the splash
   screen (``SPLASHSCREEN_DISABLED``), set ``PYTHONHOME``, ``PYTHONNOUSERSITE=1`` and
   ``PIP_REQUIRE_VIRTUALENV=0``, and list ``PYTHONPATH`` paths (``additionalPathVariables``).
3. ``Base/ctkAppLauncherSettings.cpp`` (``expandPlaceHolders``, ``readArrayValues``): the
   settings are an INI file read by QSettings, arrays as ``N\\path`` keys, ``<APPLAUNCHER_DIR>``
   replaced by the launcher's folder; ``<name>LauncherSettings.ini`` sits beside the launcher.
4. ``Base/ctkAppLauncher.cpp`` (``processApplicationToLaunchArgument``): an application that
   does not exist or is not executable is an error (``error: Application does NOT exist [..]``)
   and the launcher exits with 1.
5. ``ctkAppLauncher::configure``: arguments the launcher does not parse (here: all but its own
   ``--launcher-*`` options) are appended to the application's arguments, so
   ``PythonSlicer -m oflsam2.worker`` runs ``python-real -m oflsam2.worker``.
6. ``ctkAppLauncherPrivate::buildEnvironment``: the child gets this process's environment, the
   settings' variables set over it, and each path variable as the settings' paths joined with
   ``:`` followed by ``:`` and the inherited value when there is one (launcher paths first).
7. ``ctkAppLauncherPrivate::runProcess``: without a splash screen the child runs with
   ``QProcess::ForwardedChannels`` and ``ForwardedInputChannel`` (``ctkInteractiveProcess``
   hands it a duplicate of the launcher's stdin): the child writes to and reads from the very
   pipes the launcher was given. It is started with ``QProcess::start`` (Qt: fork and exec, no
   new session or process group), never detached here (``--launcher-detach`` is not used).
8. ``ctkAppLauncherPrivate::applicationFinished``: a child that exits normally makes the
   launcher exit with the child's code; a ``QProcess::CrashExit`` makes it print
   ``error: [<application>] exit abnormally - Report the problem.`` on stderr and exit with 1.
   Qt's ``qprocess_unix.cpp`` (``waitForDeadChild``: ``crashed = info.code != CLD_EXITED``)
   counts a child ended by a signal as a crash; ``qprocess_win.cpp`` (``findExitCode``) an exit
   code from 0x80000000 below 0xD0000000, or 0xf291.
9. ``Main.cpp`` and ``ctkAppLauncher.cpp`` install no signal handler and nothing ties the
   child's life to the launcher: a launcher that is killed or terminated leaves the child
   running (the QProcess destructor, which would kill it, never runs on such a death).

Not reproduced, as irrelevant to the worker: the splash screen and output interception, user
and additional settings files, ``--launcher-*`` options, extra applications, ``<env:NAME>``
expansion, ``LibraryPaths`` and ``Paths`` (``python-real`` here is the test run's own Python,
which finds its libraries by itself), and ``PYTHONHOME`` (it would point that Python at a home
it does not have). Assumed, not read in source: that Slicer's Qt build starts the child with
the default signal dispositions of a C++ program (SIGINT, SIGTERM and SIGPIPE fatal).
"""

from __future__ import annotations

import configparser
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

SETTINGS_SUFFIX = "LauncherSettings.ini"


def read_settings(launcher: Path) -> configparser.ConfigParser:
    """Rule 3: ``<launcher folder>/<launcher name>LauncherSettings.ini``, placeholders expanded."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # QSettings keys keep their case
    text = (launcher.parent / (launcher.name + SETTINGS_SUFFIX)).read_text(encoding="utf-8")
    parser.read_string(text.replace("<APPLAUNCHER_DIR>", str(launcher.parent)))
    return parser


def array_values(settings: configparser.ConfigParser, group: str) -> list[str]:
    """A QSettings array (``1\\path=...``, ``2\\path=...``) in order."""
    if not settings.has_section(group):
        return []
    entries = [(int(m.group(1)), value) for key, value in settings.items(group) if (m := re.fullmatch(r"(\d+)\\path", key))]
    return [value for _, value in sorted(entries)]


def child_environment(settings: configparser.ConfigParser, inherited: dict) -> dict:
    """Rule 6."""
    env = dict(inherited)
    if settings.has_section("EnvironmentVariables"):
        env.update(settings.items("EnvironmentVariables"))
    names = settings.get("Environment", "additionalPathVariables", fallback="")
    for name in [n.strip() for n in names.split(",") if n.strip() and settings.has_section(n.strip())]:
        value = os.pathsep.join(array_values(settings, name))
        if name in env:
            value = f"{value}{os.pathsep}{env[name]}"
        env[name] = value
    return env


def crashed(returncode: int, os_name: str = os.name) -> bool:
    """Rule 8: QProcess::CrashExit."""
    if os_name == "nt":
        code = returncode & 0xFFFFFFFF
        return code == 0xF291 or 0x80000000 <= code < 0xD0000000
    return returncode < 0


def main(argv: list[str]) -> int:
    for name in ("SIGINT", "SIGPIPE"):  # rule 9: a C++ program's defaults, not Python's own handlers
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    launcher, arguments = Path(os.path.abspath(argv[0])), argv[1:]
    settings = read_settings(launcher)
    application = settings.get("Application", "path")
    if not os.path.isfile(application) or not os.access(application, os.X_OK):  # rule 4
        print(f"error: Application does NOT exist [{application}]", file=sys.stderr, flush=True)
        return 1
    default_arguments = settings.get("Application", "arguments", fallback="").split()
    arguments = default_arguments + [a for a in arguments if not a.startswith("--launcher")]  # rule 5
    child = subprocess.Popen([application, *arguments], env=child_environment(settings, os.environ))  # rules 6, 7
    returncode = child.wait()
    if crashed(returncode):  # rule 8
        print(f"error: [{application}] exit abnormally - Report the problem.", file=sys.stderr, flush=True)
        return 1
    return returncode


def install(folder: Path, python: str = sys.executable, site_packages: Path | None = None) -> str:
    """Write ``folder/bin/PythonSlicer`` (running this stand-in), its settings and ``python-real``
    (which execs ``python``, keeping its pid); return the launcher's path. ``site_packages``:
    the folder the settings put first on ``PYTHONPATH`` (created; Slicer's own site-packages)."""
    bin_dir = Path(folder) / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    site_packages = site_packages or Path(folder) / "lib" / "Python" / "lib" / "site-packages"
    site_packages.mkdir(parents=True, exist_ok=True)
    launcher = bin_dir / "PythonSlicer"
    _script(launcher, f'exec "{sys.executable}" "{os.path.abspath(__file__)}" "$0" "$@"')
    _script(bin_dir / "python-real", f'exec "{python}" "$@"')
    (bin_dir / ("PythonSlicer" + SETTINGS_SUFFIX)).write_text(
        "[General]\nlauncherNoSplashScreen=true\n\n"
        "[Application]\npath=<APPLAUNCHER_DIR>/python-real\narguments=\nname=PythonSlicer\n\n"
        "[Environment]\nadditionalPathVariables=PYTHONPATH\n\n"
        "[EnvironmentVariables]\nPYTHONNOUSERSITE=1\nPIP_REQUIRE_VIRTUALENV=0\n\n"
        f"[PYTHONPATH]\n1\\path={site_packages}\nsize=1\n",
        encoding="utf-8",
    )
    return str(launcher)


def _script(path: Path, command: str) -> None:
    path.write_text(f"#!/bin/sh\n{command}\n", encoding="utf-8")
    path.chmod(0o755)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
