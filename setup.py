"""Build step the declarative pyproject.toml cannot say: the wheel carries the top-level
sql/ folder (migrations and named queries) as taskmgr/sql, where taskmgr.resources
finds it in an installed package."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSql(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "taskmgr" / "sql"
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(Path(__file__).resolve().parent.joinpath("sql").glob("*.sql")):
            self.copy_file(str(path), str(target / path.name))


setup(cmdclass={"build_py": BuildPyWithSql})
