"""The one compiled part: the DICOM element walk (src/sitebench/qc/_dicom_scan.c).

It is optional: where no C compiler (or no Python headers) is found, the install goes on without
it and `sitebench.qc.dicom_header` walks the elements in Python, reading the same data sets,
only slower. Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("sitebench.qc._dicom_scan", ["src/sitebench/qc/_dicom_scan.c"], optional=True,
                             extra_compile_args=["-O2"])])
