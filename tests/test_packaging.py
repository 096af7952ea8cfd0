"""The built wheel carries the twistd plugin, and twistd finds it once installed."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent


class WheelTests(SynchronousTestCase):
    wheel: Path

    @classmethod
    def setUpClass(cls) -> None:
        out = Path(sys.modules[__name__].__file__ or ".").parent.parent / "build" / "test-wheel"
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*.whl"):
            old.unlink()
        # An isolated build, as a user's `pip install fsha` would do it.
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                        "--disable-pip-version-check", "-w", str(out), str(ROOT)],
                       check=True, timeout=600, capture_output=True)
        [cls.wheel] = out.glob("fsha-*.whl")

    def test_wheel_contents(self) -> None:
        names = set(zipfile.ZipFile(self.wheel).namelist())
        self.assertIn("twisted/plugins/fsha_plugin.py", names)
        # twisted/ and twisted/plugins/ must stay namespace folders, or they would shadow
        # Twisted itself / its plugins.
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        for module in ("fsha/tap.py", "fsha/node.py", "fsha/wire/heartbeat.py",
                       "fsha/py.typed"):
            self.assertIn(module, names)
        self.assertFalse([n for n in names if n.startswith("tests/")])
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        text = zipfile.ZipFile(self.wheel).read(entry_points).decode()
        self.assertIn("fsha = fsha.cli:main", text)

    def test_twistd_lists_fsha_after_install(self) -> None:
        home = Path(self.mktemp()).resolve()
        home.mkdir()
        venv = home / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                       check=True, timeout=120)
        python = venv / "bin" / "python"
        site = Path(subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True, timeout=60).stdout.strip())
        # Twisted and the other dependencies come from this test's environment; the path is
        # added as a plain entry, so that environment's editable install of this checkout
        # (a .pth file) is not processed: fsha can only come from the wheel.
        (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--disable-pip-version-check", "--target", str(site), str(self.wheel)],
                       check=True, timeout=300, capture_output=True)
        where = subprocess.run([str(python), "-c", "import fsha; print(fsha.__file__)"],
                               cwd=home, capture_output=True, text=True, timeout=60)
        self.assertTrue(where.stdout.startswith(str(site)), where.stdout + where.stderr)
        result = subprocess.run(
            [str(python), "-c", "from twisted.scripts.twistd import run; run()", "--help"],
            cwd=home, capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"\n\s+fsha\s+A FreeSWITCH high-availability")
        usage = subprocess.run(
            [str(python), "-c", "from twisted.scripts.twistd import run; run()", "fsha",
             "--help"], cwd=home, capture_output=True, text=True, timeout=120)
        self.assertIn("--config", usage.stdout)
