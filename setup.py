"""Package discovery and the one C extension; all metadata is in pyproject.toml.

`cli/` and `threat_model/` are mapped to the import names `fedse_cli` and `fedse_threat_model`.

`fedse_secure.secagg.masking._kernels` (AEGIS-128X2 masks added in one pass with AES-NI or VAES, and AVX-512
quantisation and release) is optional: where it cannot be compiled, installation goes on and masking computes the
same bytes with numpy.
"""

from setuptools import Extension, find_packages, setup

MAPPED_FOLDERS = {"fedse_cli": "cli", "fedse_threat_model": "threat_model"}

packages = find_packages(include=["fedse_secure", "fedse_secure.*"])
package_dir = {"fedse_secure": "fedse_secure"}
for import_name, folder in MAPPED_FOLDERS.items():
    packages.append(import_name)
    package_dir[import_name] = folder
    for sub in find_packages(where=folder):
        packages.append(f"{import_name}.{sub}")
        package_dir[f"{import_name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

masking_kernels = Extension(
    "fedse_secure.secagg.masking._kernels",
    sources=["fedse_secure/secagg/masking/_kernels.c"],
    extra_compile_args=["-O3"],
    optional=True,
)

setup(packages=packages, package_dir=package_dir, ext_modules=[masking_kernels])
