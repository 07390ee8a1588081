"""Ship the atlas's data with the package: `taxonomy/` is copied into the wheel at build time.

The checkout's `taxonomy/` stays the only copy in git; `build_py` puts its entries, vocabulary and schema
under `reference_impls/atlas/data/taxonomy/` in the build, where `reference_impls.atlas.paths` finds them
when kvatlas runs from an installed wheel. Everything else is configured in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class build_py_with_taxonomy(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's taxonomy/ directly
        dest = Path(self.build_lib) / "reference_impls" / "atlas" / "data" / "taxonomy"
        dest.mkdir(parents=True, exist_ok=True)
        for src in sorted((HERE / "taxonomy").glob("*")):
            if src.suffix in (".yaml", ".json"):
                shutil.copy2(src, dest / src.name)


setup(cmdclass={"build_py": build_py_with_taxonomy})
