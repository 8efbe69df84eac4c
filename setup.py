"""Only here because cffi's build hook (cffi_modules) is a setup() keyword; see setup.cfg."""

from setuptools import setup

setup(cffi_modules=["native/build_shim.py:ffibuilder"])
