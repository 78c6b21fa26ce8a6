"""Install: pip install -e .[test]   (Python 3.11; see README for the pins' reasons)."""
from setuptools import find_packages, setup

setup(
    name="train_quantization",
    version="0.1.0",
    description="Quantization-aware training and int8 inference for MXNet Gluon CNNs",
    python_requires=">=3.8",
    packages=find_packages(include=["train_quantization", "train_quantization.*"]),
    install_requires=[
        "mxnet==1.9.1",  # last release; CPU build ships oneDNN int8 kernels
        "numpy>=1.20,<1.24",  # mxnet 1.9.1 breaks with numpy>=1.24 (np.bool etc.); 1.23.5 works
        "gluoncv==0.10.5.post0",
        "opencv-python<4.9",  # gluoncv 0.10.5 imports cv2; 4.9+ wants numpy>=1.24
        "matplotlib<3.9",
        "scipy<1.12",
        "pandas<2.2",
        "pyyaml>=5.4",
        "tqdm>=4.60",
        "pillow>=8",
    ],
    # onnx: the ONNX export and ONNX Runtime rows; onnxruntime itself goes in with
    # `pip install --no-deps onnxruntime==1.17.3` (its wheels declare numpy>=1.24.2, MXNet needs <1.24)
    extras_require={"test": ["pytest>=7", "ruff>=0.4"],
                    "onnx": ["onnx==1.14.1", "coloredlogs", "flatbuffers", "sympy", "packaging"]},
)
