"""Build script: the pure-Python package plus (later in this file) the compiled extension.

``kernels/`` is installed as the subpackage ``egp_fast.kernels``.
"""

from setuptools import setup

setup(
    packages=["egp_fast", "egp_fast.ops", "egp_fast.kernels"],
    package_dir={"egp_fast": "egp_fast", "egp_fast.kernels": "kernels"},
)
