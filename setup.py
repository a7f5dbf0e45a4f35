from setuptools import setup

# One distribution, one import name. The top-level kernels/, reference/ and autotune/
# folders are mapped into the package (the layout README.md's Layout section describes), so code
# always imports `subquad.*`.
setup(
    name="subquad",
    version="0.1.0",
    description="Triton kernels for sub-quadratic attention (lightning, neighborhood, HiP, routing)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=["subquad", "subquad.kernels", "subquad.reference", "subquad.autotune"],
    package_dir={
        "subquad": "subquad",
        "subquad.kernels": "kernels",
        "subquad.reference": "reference",
        "subquad.autotune": "autotune",
    },
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "triton>=3.6", "numpy"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "pytest-xdist>=3"],
        "bench": ["matplotlib", "pytest-benchmark>=4"],
    },
)
