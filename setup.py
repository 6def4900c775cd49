"""Build lxt_ext: the C++ kernels always, the CUDA kernels when torch is a CUDA build and nvcc exists.

Install with ``pip install --no-build-isolation .`` so the extension is compiled against the torch
already installed (build isolation would fetch a second torch). Only sm_80 and sm_90 are built unless
TORCH_CUDA_ARCH_LIST says otherwise; MAX_JOBS bounds ninja's parallelism (default 2).
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

if 'CUDA_HOME' not in os.environ and shutil.which('nvcc'):
    # nvcc may be a wrapper on PATH (here /usr/local/bin/nvcc); the toolkit root is where
    # include/cuda_runtime.h and lib64/libcudart.so live, which torch cannot guess from a wrapper.
    for root in ('/usr/local/cuda', os.path.dirname(os.path.dirname(os.path.realpath(shutil.which('nvcc'))))):
        if os.path.exists(os.path.join(root, 'include', 'cuda_runtime.h')):
            os.environ['CUDA_HOME'] = root
            break

import torch  # noqa: E402  (after CUDA_HOME is settled: cpp_extension reads it on import)
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
# the version is written once, in the package (importing it here would need the built extension)
with open(os.path.join(ROOT, 'lxt_ext', '__init__.py')) as _init:
    VERSION = re.search(r"^__version__ = '([^']+)'", _init.read(), re.M).group(1)


def want_cuda():
    if os.environ.get('LXT_EXT_NO_CUDA'):
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    sources = sorted(glob.glob(os.path.join('csrc', '**', '*.cpp'), recursive=True))
    include_dirs = [os.path.join(ROOT, 'csrc')]  # sources include each other as "rules/math.h"
    # The C++ standard is the one torch's cpp_extension picks for its headers. -fno-trapping-math
    # lets GCC turn the rules' selects into vector blends (no FP exceptions are ever enabled).
    cxx = ['-O3', '-fno-trapping-math']
    # ATen's header implements at::parallel_for inline with `#pragma omp parallel`: compiled without
    # OpenMP, the CPU kernels would run every loop on one thread. The extension then shares the libgomp
    # torch loaded (same soname), so torch.set_num_threads governs its loops as it does ATen's.
    openmp = ['-fopenmp'] if torch.backends.openmp.is_available() and sys.platform.startswith('linux') else []
    cxx += openmp
    if want_cuda():
        os.environ.setdefault('TORCH_CUDA_ARCH_LIST', '8.0;9.0')
        return cpp_extension.CUDAExtension(
            'lxt_ext._C',
            sources + sorted(glob.glob(os.path.join('csrc', '**', '*.cu'), recursive=True)),
            include_dirs=include_dirs,
            define_macros=[('LXT_EXT_WITH_CUDA', None)],
            extra_compile_args={'cxx': cxx, 'nvcc': ['-O3']},
            extra_link_args=openmp,
        )
    return cpp_extension.CppExtension('lxt_ext._C', sources, include_dirs=include_dirs, extra_compile_args={'cxx': cxx},
                                      extra_link_args=openmp)


os.environ.setdefault('MAX_JOBS', '2')

setup(
    name='lxt_ext',
    version=VERSION,
    description='Fused C++/CUDA LRP rules for zennit: CNN rules and composites, AttnLRP/CP-LRP for transformers',
    long_description=open(os.path.join(ROOT, 'README.md')).read() if os.path.exists(os.path.join(ROOT, 'README.md')) else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['lxt_ext', 'lxt_ext.*']),
    # the embedded default model (weights, model card) and its sample images and masks
    package_data={'lxt_ext': ['data/embedded/*.pt', 'data/embedded/*.json', 'data/embedded/samples/*.png',
                              'data/embedded/masks/*.png']},
    ext_modules=[extension()],
    cmdclass={'build_ext': cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires='>=3.10',
    install_requires=['torch>=2.4', 'zennit>=0.5.1', 'tqdm', 'pillow'],
    extras_require={
        'test': ['pytest', 'pytest-benchmark', 'hypothesis', 'torchvision'],
        'timm': ['timm'],
        'transformers': ['transformers'],
        'safetensors': ['safetensors'],
    },
    entry_points={'console_scripts': ['lxt-ext=lxt_ext.cli:main']},
)
