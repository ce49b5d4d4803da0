"""XLA:CPU's process options: the launchers set them in XLA_FLAGS before JAX starts, after
the config is validated, for the deep nets they are measured to help
(``backends.xla_options``, which imports no JAX), and XLA:CPU compiles with them."""

import os
import pathlib
import subprocess
import sys

import pytest

from resnet_jax import models
from resnet_jax.backends import xla_options


def test_process_options_are_for_deep_nets_under_the_cpu_plan():
    loops = ('xla_cpu_disable_loop_unrolling', 'xla_cpu_disable_slp_vectorizer')
    siblings = 'xla_cpu_use_multi_output_fusion'
    assert set(xla_options.PROCESS_OPTIONS) == {*loops, siblings}
    for name, expected in (
        ('cifar_resnet20', ()),
        ('cifar_resnet32', ()),
        ('resnet50', ()),
        ('cifar_resnet56', loops),
        ('cifar_plain56', loops),
        ('cifar_resnet110', loops),
        ('cifar_resnet1202', (*loops, siblings)),
    ):
        stages = models.create_model(name).stage_sizes
        assert xla_options.options_for(stages) == expected, name
    deep = models.create_model('cifar_resnet110').stage_sizes
    assert xla_options.options_for(deep, 'cpu') == loops
    assert xla_options.options_for(deep, 'xla') == ()  # XLA's defaults


def test_the_module_imports_no_jax():
    """Loaded on its own (as a launcher may, before anything imports JAX)."""
    code = (
        'import importlib.util, sys; spec = importlib.util.spec_from_file_location('
        f'"xla_options", {xla_options.__file__!r}); module = importlib.util.'
        'module_from_spec(spec); spec.loader.exec_module(module); '
        'module.configure((200, 200, 200)); '
        'print(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib")))'
    )
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == '[]'


def test_process_options_join_the_users_xla_flags():
    add = xla_options.xla_flags_with
    assert add(['a', 'b']) == '--xla_backend_extra_options=a,b'
    assert (
        add(['a'], '--xla_force_host_platform_device_count=4')
        == '--xla_force_host_platform_device_count=4 --xla_backend_extra_options=a'
    )
    # The user's backend options stay, in one flag; options already there are not repeated.
    assert (
        add(['a', 'b'], '--x=1 --xla_backend_extra_options=c,b=0 --y')
        == '--x=1 --y --xla_backend_extra_options=c,b=0,a'
    )
    assert add(['a'], '--xla_backend_extra_options=a --y') == '--xla_backend_extra_options=a --y'
    assert add([], '--y') == '--y'


def test_runs_that_may_decode_with_dali_turn_xla_gpu_command_buffers_off(monkeypatch):
    monkeypatch.setattr(xla_options, 'dali_installed', lambda: True)
    monkeypatch.setenv('XLA_FLAGS', '--y')
    assert xla_options.configure_input('cpu') == () and os.environ['XLA_FLAGS'] == '--y'
    assert xla_options.configure_input('auto') == xla_options.DALI_FLAGS
    assert os.environ['XLA_FLAGS'] == '--y --xla_gpu_enable_command_buffer='
    monkeypatch.setenv('XLA_FLAGS', '--xla_gpu_enable_command_buffer=FUSION')  # the user's
    assert xla_options.configure_input('dali') == ()
    assert os.environ['XLA_FLAGS'] == '--xla_gpu_enable_command_buffer=FUSION'
    monkeypatch.setattr(xla_options, 'dali_installed', lambda: False)
    monkeypatch.delenv('XLA_FLAGS')
    assert xla_options.configure_input('auto') == () and 'XLA_FLAGS' not in os.environ


_SIBLINGS = """
import sys
from resnet_jax import models
from resnet_jax.backends import xla_options
print(xla_options.configure(models.create_model(sys.argv[1]).stage_sizes))
import jax, jax.numpy as jnp
# Four transposed chunks of one array, as the weight gradient's: sibling fusions.
chunks = lambda x: tuple(x[i:i + 4].transpose(3, 1, 2, 0) for i in range(0, 16, 4))
hlo = jax.jit(chunks).lower(jnp.ones((16, 8, 8, 4))).compile().as_text()
print(sum(' fusion(' in line and line.split('=', 1)[1].lstrip().startswith('(')
          for line in hlo.splitlines()))
"""


@pytest.mark.parametrize(
    'name, fused', [('cifar_resnet20', 0), ('cifar_resnet110', 0), ('cifar_resnet1202', 1)]
)
def test_process_options_make_xla_cpu_fuse_sibling_kernels(name, fused):
    """A fresh process configured for a net of 64-block stages compiles sibling fusions
    as one kernel with several outputs (fewer kernels to generate); ResNet-110's and
    ResNet-20's keep XLA's separate kernels."""
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
    proc = subprocess.run(
        [sys.executable, '-c', _SIBLINGS, name],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    options, multi_output = proc.stdout.strip().splitlines()[-2:]
    assert options == str(xla_options.options_for(models.create_model(name).stage_sizes))
    assert int(multi_output) == fused


# The launcher with xla_options.configure spied on: whether JAX had started its backends
# when it was called (a test may ask JAX's internals; the package never does).
_LAUNCH = """
import sys
from resnet_jax import main
from resnet_jax.backends import xla_options
from jax._src import xla_bridge
configure = xla_options.configure
def spy(stage_sizes, plan='auto'):
    started = xla_bridge.backends_are_initialized()
    options = configure(stage_sizes, plan)
    print(tuple(stage_sizes), plan, started, options, xla_options.process_options(), flush=True)
    raise SystemExit(0)
xla_options.configure = spy
sys.argv = ['main', *sys.argv[1:]]
main.run()
"""


@pytest.mark.parametrize(
    'flags, expected',
    [
        ((), '(3, 3, 3) auto False () []'),
        (
            ('--config.model.name=cifar_resnet56',),
            "(9, 9, 9) auto False ('xla_cpu_disable_loop_"
            "unrolling', 'xla_cpu_disable_slp_vectorizer') ['xla_cpu_disable_loop_unrolling', "
            "'xla_cpu_disable_slp_vectorizer']",
        ),
        (
            ('--config.model.name=cifar_resnet1202',),
            "(200, 200, 200) auto False ('xla_cpu_disable_"
            "loop_unrolling', 'xla_cpu_disable_slp_vectorizer', 'xla_cpu_use_multi_output_fusion') "
            "['xla_cpu_disable_loop_unrolling', 'xla_cpu_disable_slp_vectorizer', "
            "'xla_cpu_use_multi_output_fusion']",
        ),
        (
            ('--config.model.name=cifar_resnet56', '--config.execution=xla'),
            '(9, 9, 9) xla False () []',
        ),
    ],
)
def test_the_launcher_sets_the_process_options_before_jax_starts(tmp_path, flags, expected):
    proc = subprocess.run(
        [sys.executable, '-c', _LAUNCH, f'--workdir={tmp_path}', *flags],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=pathlib.Path(__file__).resolve().parent.parent.parent,
        env=dict(os.environ, XLA_FLAGS=''),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == expected


def test_the_launcher_validates_the_config_before_the_process_options(tmp_path):
    """A bad config is refused before the options are looked at (one line, exit 2)."""
    proc = subprocess.run(
        [sys.executable, '-c', _LAUNCH, f'--workdir={tmp_path}', '--config.model.name=resnet51'],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, XLA_FLAGS=''),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown model 'resnet51'")
    assert proc.stdout == ''
