"""Package discovery only; all metadata is in pyproject.toml.

`cli/` and `threat_model/` are mapped to the import names `fedse_cli` and `fedse_threat_model`.
"""

from setuptools import find_packages, setup

MAPPED_FOLDERS = {"fedse_cli": "cli", "fedse_threat_model": "threat_model"}

packages = find_packages(include=["fedse_secure", "fedse_secure.*"])
package_dir = {"fedse_secure": "fedse_secure"}
for import_name, folder in MAPPED_FOLDERS.items():
    packages.append(import_name)
    package_dir[import_name] = folder
    for sub in find_packages(where=folder):
        packages.append(f"{import_name}.{sub}")
        package_dir[f"{import_name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir)
