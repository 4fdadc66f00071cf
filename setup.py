"""Build hook: ship the experiment notebooks in the wheel, so `deeplense run NAME` works without a source checkout.

Everything else about the build is declared in pyproject.toml. The notebooks live in nbs/experiments (not a package
folder, and not exported by nbdev); building copies them into deeplense_nb/experiments_nbs inside the wheel, where
`deeplense_nb.experiments.experiments_dir` finds them. Editable installs read nbs/experiments of the checkout instead.
"""
import shutil
from pathlib import Path
from setuptools import setup
from setuptools.command.build_py import build_py

class BuildPyWithExperiments(build_py):
    "build_py that also copies nbs/experiments/*.ipynb to deeplense_nb/experiments_nbs in the build folder."
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False): return
        src = Path(__file__).resolve().parent / "nbs" / "experiments"
        dst = Path(self.build_lib) / "deeplense_nb" / "experiments_nbs"
        dst.mkdir(parents=True, exist_ok=True)
        for nb in sorted(src.glob("*.ipynb")): shutil.copy2(nb, dst / nb.name)

setup(cmdclass={"build_py": BuildPyWithExperiments})
