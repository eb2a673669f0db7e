"""`pip install .` gives a working package: the twistd plugin and mtactl included."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

from twisted.trial.unittest import SynchronousTestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WheelTests(SynchronousTestCase):
    """The built wheel: the mtactl entry point, the twistd plugin without Twisted's own __init__
    files, py.typed and no tests; installed elsewhere, away from the checkout, mta is a twistd
    command."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.out = tempfile.mkdtemp(prefix="mta-wheel-")
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "-w", cls.out, REPO],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        [name] = [n for n in os.listdir(cls.out) if n.endswith(".whl")]
        cls.wheel = os.path.join(cls.out, name)

    def test_contents(self) -> None:
        with zipfile.ZipFile(self.wheel) as z:
            names = set(z.namelist())
            entry_points = next(n for n in names if n.endswith("entry_points.txt"))
            self.assertIn("mtactl = mta.cli:main", z.read(entry_points).decode())
        self.assertIn("twisted/plugins/mta_plugin.py", names)
        self.assertIn("mta/py.typed", names)
        self.assertIn("mta/smtp/server.py", names)
        # The plugin must not shadow Twisted's own packages.
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertFalse(any(n.startswith("tests/") for n in names))

    def test_installed_copy_provides_the_twistd_plugin(self) -> None:
        """Installed elsewhere, away from the checkout, `mta` is a twistd command."""
        target = os.path.join(self.out, "site")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
             "--target", target, self.wheel],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        # -S: no site processing, so the checkout's editable .pth is not read.
        path = os.pathsep.join([target, sysconfig.get_paths()["purelib"]])
        code = (
            "import mta, sys;"
            "from twisted.plugin import getPlugins;"
            "from twisted.application.service import IServiceMaker;"
            "print(mta.__file__);"
            "print([p.tapname for p in getPlugins(IServiceMaker)])"
        )
        result = subprocess.run(
            [sys.executable, "-S", "-c", code],
            env=dict(os.environ, PYTHONPATH=path), cwd="/",
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr)
        module_file, plugins = result.stdout.splitlines()[:2]
        self.assertTrue(module_file.startswith(target), module_file)
        self.assertIn("'mta'", plugins)
