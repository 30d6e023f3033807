from setuptools import find_packages, setup

setup(
    name="regionclip",
    version="0.1.0",
    description="RegionCLIP: region-based language-image pretraining, zero-shot and "
    "open-vocabulary detection",
    packages=find_packages(include=["regionclip", "regionclip.*"]),
    python_requires=">=3.9",
    install_requires=[
        # torch is left unpinned on purpose: torchvision pins the torch build it was compiled
        # against, so pip picks a matching pair from the registry.
        "torch",
        "torchvision",
        "fvcore>=0.1.5",
        "iopath",
        "pycocotools>=2.0.6",
        "lvis",
        "open_clip_torch>=2.20,<4",
        "ftfy",
        "regex",
        # lvis requires opencv-python; asking for the headless build as well would install two
        # packages writing the same cv2 folder.
        "opencv-python",
        "tqdm",
        "tensorboard",
        "pillow",
        "numpy",
    ],
    extras_require={"dev": ["pytest"]},
    entry_points={"console_scripts": ["regionclip=regionclip.cli:main"]},
)
