"""Build hook only (metadata lives in pyproject.toml): ship the top-level rules.yaml and
datasette_metadata.yml, which stay where a checkout's user edits them, as package data in
projectionist/defaults/; an installed `projectionist` copies them to PROJECTIONIST_HOME on first start."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DEFAULT_FILES = ("rules.yaml", "datasette_metadata.yml")


class BuildPyWithDefaults(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "projectionist" / "defaults"
        self.mkpath(str(target))
        for name in DEFAULT_FILES:
            self.copy_file(name, str(target / name))


setup(cmdclass={"build_py": BuildPyWithDefaults})
