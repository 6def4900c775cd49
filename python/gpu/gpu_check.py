"""One command that proves lxt_ext's CUDA path on the machine it runs on, writing one markdown report.

    python python/gpu/gpu_check.py [--wheels DIR] [--lxt-path DIR] [--out FILE] [--quick]

Steps (each timed, its status and the tail of its output in the report):
1. install the wheels in ``--wheels`` (no package index is used: ``pip install --no-index``);
2. build the extension in place against the installed torch: CUDA kernels for this GPU's architecture
   only (``TORCH_CUDA_ARCH_LIST`` from ``torch.cuda.get_device_capability()``), ninja on every core;
3. the CUDA tests: tests/unit/ops/test_cuda.py, the CUDA cases of tests/unit/ops/test_attention_op.py and
   tests/unit/ops/test_opcheck.py (opcheck on CUDA);
4. ``compute-sanitizer --tool memcheck`` and ``--tool racecheck`` on a small attention and rule case,
   where compute-sanitizer exists;
5. the GPU benchmarks (python/benchmarks/benchmark_gpu.py: vit_b_16 batch 64 fp32/bf16, the LLaMA-style
   decoder at 4k and 16k tokens, attention alone 1k-64k tokens).
Without a GPU it builds the CPU extension, runs the same test files (their CUDA cases skip) and says
which GPU steps it skipped.

Prepare what the machine lacks where a package index is reachable (the lent GPU machines have none:
torch 2.11 + CUDA 13, Python 3.12, transformers 5, timm, pytest, hypothesis; no zennit, no
torchvision), for that machine's Python and platform:

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        -d wheels zennit==0.5.1
    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        -d wheels torchvision==0.26.0 --index-url https://download.pytorch.org/whl/cu130   # matches torch 2.11
    # optional, LXT 2.1 for the ViT comparison, in a directory of its own (it needs transformers 4.x):
    pip install --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        --target lxt-env lxt==2.1 transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2

and pass ``--wheels wheels --lxt-path lxt-env``. Designed to finish on one H100/H200 in about
5 minutes, build included (``--quick`` shortens the benchmarks); not yet run on a GPU.
"""
import argparse
import datetime
import glob
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python/gpu/ is two below

SANITIZER_CASE = r'''
import torch
from zennit.composites import LayerMapComposite
from lxt_ext.attention import attention_lrp
from lxt_ext.rules import Epsilon, Gamma
for backend in ('lxt_ext', 'aten'):
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(2, 4, 37, 64, device='cuda', dtype=dtype, requires_grad=True) for _ in range(3))
        mask = torch.rand(2, 1, 37, 37, device='cuda') > 0.3
        attention_lrp(q, k, v, mask, backend=backend).sum().backward()
        attention_lrp(q, k, v, is_causal=True, mode='cp', backend=backend).sum().backward()
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 14 * 14, 5)).cuda()
x = torch.randn(2, 3, 16, 16, device='cuda', requires_grad=True)
with LayerMapComposite([(torch.nn.Conv2d, Gamma()), (torch.nn.Linear, Epsilon())]).context(model):
    model(x).sum().backward()
torch.cuda.synchronize()
print('case done')
'''


class Report:
    def __init__(self):
        self.rows, self.sections = [], []

    def step(self, name, command, env=None, timeout=None):
        """Runs ``command``; records status, seconds and the output's tail. Returns the completed process."""
        print(f'== {name}: {" ".join(command)}', flush=True)
        start = time.time()
        try:
            done = subprocess.run(command, cwd=ROOT, env=dict(os.environ, **(env or {})), capture_output=True,
                                  text=True, timeout=timeout)
            status = 'passed' if done.returncode == 0 else f'FAILED (exit {done.returncode})'
            output = done.stdout + done.stderr
        except subprocess.TimeoutExpired as expired:
            done, status = None, f'FAILED (timeout {timeout} s)'
            output = (expired.stdout or b'').decode(errors='replace') + (expired.stderr or b'').decode(errors='replace')
        seconds = time.time() - start
        print(f'   {status} in {seconds:.0f} s', flush=True)
        self.rows.append((name, status, f'{seconds:.0f}'))
        tail = '\n'.join(output.strip().splitlines()[-40:])
        self.sections.append(f'### {name}\n\n`{" ".join(command)}`: {status}, {seconds:.0f} s\n\n```\n{tail}\n```\n')
        return done

    def skip(self, name, why):
        print(f'== {name}: skipped ({why})', flush=True)
        self.rows.append((name, f'skipped: {why}', '-'))

    def write(self, path, header, benchmarks):
        lines = [header, '', '| step | status | s |', '|---|---|---|']
        lines += [f'| {name} | {status} | {seconds} |' for name, status, seconds in self.rows]
        lines += ['', '## Benchmarks', '', benchmarks or '(not run)', '', '## Output of each step', '']
        with open(path, 'w') as f:
            f.write('\n'.join(lines + self.sections))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--wheels', help='a directory of wheels to install first (zennit, hypothesis, ...)')
    parser.add_argument('--lxt-path', help='a directory with LXT 2.1 and transformers 4.x (ViT comparison)')
    parser.add_argument('--out', help='the markdown report (default: gpu_check_<date>.md here)')
    parser.add_argument('--quick', action='store_true', help='shorter benchmarks')
    args = parser.parse_args()
    python = sys.executable
    report = Report()
    today = datetime.date.today().isoformat()
    out = args.out or f'gpu_check_{today}.md'

    if args.wheels:
        wheels = sorted(glob.glob(os.path.join(args.wheels, '*.whl')))
        report.step('install wheels', [python, '-m', 'pip', 'install', '--no-index', '--no-deps', *wheels])

    import torch
    gpu = torch.cuda.is_available()
    env = {'MAX_JOBS': str(os.cpu_count() or 2)}
    if gpu:
        major, minor = torch.cuda.get_device_capability()
        env['TORCH_CUDA_ARCH_LIST'] = f'{major}.{minor}'
        device = f'{torch.cuda.get_device_name()} (sm_{major}{minor})'
    else:
        env['LXT_EXT_NO_CUDA'] = '1'
        device = 'no CUDA device'
    header = (f'# lxt_ext GPU check, {today}\n\n{device}; torch {torch.__version__} (CUDA {torch.version.cuda}), '
              f'Python {sys.version.split()[0]}, {os.cpu_count()} cores; '
              f'compute-sanitizer: {shutil.which("compute-sanitizer") or "absent"}.\n\n'
              f'Command: `{" ".join([os.path.relpath(python), *sys.argv])}`')
    build = report.step('build (in place)', [python, 'setup.py', 'build_ext', '--inplace'], env=env)
    if build is None or build.returncode != 0:
        report.write(out, header, None)
        sys.exit(f'the build failed; see {out}')
    test_env = {'PYTHONPATH': os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')]))}
    selection = [] if not gpu else ['-k', 'cuda or CUDA']
    report.step('CUDA tests' if gpu else 'tests (CPU; their CUDA cases skip)',
                [python, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider', 'tests/unit/ops/test_cuda.py',
                 'tests/unit/ops/test_attention_op.py', 'tests/unit/ops/test_opcheck.py', *selection], env=test_env)
    if gpu:
        # Every case of test_cuda.py (the module is CUDA-only) besides the -k selection above.
        report.step('tests/unit/ops/test_cuda.py (all)', [python, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                                                 'tests/unit/ops/test_cuda.py'], env=test_env)
    sanitizer = shutil.which('compute-sanitizer')
    for tool in ('memcheck', 'racecheck'):
        name = f'compute-sanitizer --tool {tool}'
        if not gpu:
            report.skip(name, 'no GPU')
        elif not sanitizer:
            report.skip(name, 'compute-sanitizer not found')
        else:
            report.step(name, [sanitizer, '--tool', tool, '--error-exitcode', '1', python, '-c', SANITIZER_CASE],
                        env=test_env, timeout=600)
    benchmarks = None
    if gpu:
        command = [python, 'python/benchmarks/benchmark_gpu.py'] + (['--quick'] if args.quick else [])
        command += ['--lxt-path', args.lxt_path] if args.lxt_path else []
        done = report.step('GPU benchmarks', command, env=test_env)
        benchmarks = done.stdout if done is not None else None
    else:
        report.skip('GPU benchmarks (vit_b_16, decoder, attention)', 'no GPU')
    report.write(out, header, benchmarks)
    print(f'report: {out}')
    sys.exit(0 if all(not status.startswith('FAILED') for _, status, _ in report.rows) else 1)


if __name__ == '__main__':
    main()
