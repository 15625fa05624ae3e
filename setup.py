"""configs/ and launch/ stand at the top of the checkout (the project's card) and ship inside the package as
``stableseg_pp.configs`` and ``stableseg_pp.launch``: setuptools maps the two folders into it, for wheels and for
editable installs alike. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

TOP_LEVEL = {"stableseg_pp.configs": "configs", "stableseg_pp.launch": "launch"}

setup(packages=[*find_packages(include=["stableseg_pp", "stableseg_pp.*"]), *TOP_LEVEL], package_dir=TOP_LEVEL)
