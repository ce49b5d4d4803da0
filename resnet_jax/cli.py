"""The ``resnet-jax`` command: ``resnet-jax COMMAND [--flag=value ...]``.

    resnet-jax train --config=cifar10.py:resnet110 --workdir=workdirs/c10_r110
    resnet-jax evaluate --workdir=workdirs/c10_r110 --protocol=ten_crop
    resnet-jax convert --from=torchvision --input=r50.pth --model=resnet50 --output=workdirs/r50
    resnet-jax summary --model=resnet50
    resnet-jax benchmark --model=cifar_resnet56 --batch_size=128
    resnet-jax prepare --dataset=imagenet2012
    resnet-jax plot workdirs/c10_r20 workdirs/c10_r110 --output=fig6.png

``python -m resnet_jax COMMAND`` is the same, ``python -m resnet_jax.main`` is ``train``.
Flags are absl's, one spelling (``--batch_size``). Bad input (a flag, a config field or
file, a workdir, a dataset) prints one line, ``error: ...``, and exits with code 2 before
anything is written; a run that fails (a divergence, a checkpoint that cannot be written)
prints one line and exits with 1."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import textwrap
from collections.abc import Callable

from absl import app, flags, logging

from resnet_jax import cli_shared, commands
from resnet_jax.cli_shared import config_path, fail, resolved_config
from resnet_jax.tools import convert_command

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Command:
    summary: str  # one line for the list of commands
    define: Callable[[], None]
    run: Callable[[list[str]], None]
    positional: str = ''  # what positional arguments it takes ('' : none)


COMMANDS = {
    'train': Command(
        'train a config (resuming its workdir)', commands.define_train, commands.run_train
    ),
    'evaluate': Command(
        "a run's test error by a protocol of the paper",
        commands.define_evaluate,
        commands.run_evaluate,
    ),
    'convert': Command(
        'weights from torchvision, timm, transformers or Keras into a '
        'workdir, or out to torchvision',
        convert_command.define,
        convert_command.run,
    ),
    'summary': Command(
        'a Table-1-like view of a network', commands.define_summary, commands.run_summary
    ),
    'benchmark': Command(
        'images/s, compile time and FLOP/s on synthetic data',
        commands.define_benchmark,
        commands.run_benchmark,
    ),
    'prepare': Command(
        "a dataset's mean image, or a folder's index", commands.define_prepare, commands.run_prepare
    ),
    'plot': Command(
        "runs' training curves in one figure (Fig. 4 and 6)",
        commands.define_plot,
        commands.run_plot,
        positional='WORKDIR [WORKDIR ...]',
    ),
}


# --- parsing -------------------------------------------------------------------------------------

_KINDS = {
    int: 'an integer',
    float: 'a number',
    bool: 'True or False',
    str: 'a string',
    tuple: 'a tuple, e.g. (1,2)',
}


def _field_kind(name: str) -> str:
    from resnet_jax import config as config_lib

    default = config_lib.flatten(config_lib.base_config()).get(name)
    return _KINDS.get(type(default), 'a value of its type')


def _one_line(error: BaseException, argv: list[str]) -> str:
    """The informative line of a flag or config error (config_flags nests several)."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    path = config_path(argv) or 'the default config'
    for e in chain:
        if isinstance(e, flags.UnrecognizedFlagError):
            name = e.flagname
            return (
                f"unknown config field '{name[len('config.') :]}' (every field: "
                'resnet_jax/config.py)'
                if name.startswith('config.')
                else f'unknown flag --{name} (see --help)'
            )
    for e in chain:
        text = str(e)
        field = re.match(r'flag --config\.([\w.]+)=(.*?): ', text)
        if field:
            return f'{field.group(1)} must be {_field_kind(field.group(1))}; got {field.group(2)!r}'
        required = re.search(r'Flag --(\w+) must have a value other than None', text)
        if required:
            return f'--{required.group(1)} is required (see --help)'
        if isinstance(e, flags.IllegalFlagValueError) and 'Unexpected None value' in text:
            return (
                f'config file {path}: get_config() returned None; it must return an '
                'ml_collections.ConfigDict'
            )
        if isinstance(e, flags.Error) and not text.startswith('flag --config'):
            return (
                text[len('flag ') :].splitlines()[0]
                if text.startswith('flag ')
                else text.splitlines()[0]
            )
    first = chain[-1]
    lines = [line.strip() for line in str(first).splitlines() if line.strip()]
    if isinstance(first, (KeyError, AttributeError)) and 'get_config' not in str(first):
        name = str(first).strip('"\'')
        given = [
            a.split('=')[0][len('--config.') :]
            for a in argv
            if a.startswith('--config.') and a.split('=')[0].split('.')[-1] == name
        ]
        if given:
            return f"unknown config field '{given[0]}' (every field: resnet_jax/config.py)"
    if isinstance(first, AttributeError) and 'get_config' in str(first):
        return f'cannot load config file {path}: it has no get_config()'
    return (
        f'cannot load config file {path}: {type(first).__name__}: {lines[0] if lines else ""}'
    ).rstrip(': ')


def _parse(command: Command, argv: list[str]) -> list[str]:
    """Parses ``argv`` (the program and the command's flags) into the flags; one line and
    exit code 2 for anything that does not parse."""
    path = config_path(argv)
    if path is not None and not os.path.isfile(path):
        fail(
            f'cannot load config file {path}: it does not exist'
            if not os.path.exists(path)
            else f'cannot load config file {path}: it is not a file'
        )
    logging.set_verbosity(logging.ERROR)  # config_flags' warnings: the error says it all
    try:
        rest = FLAGS(argv)
        value = FLAGS['config'].value if 'config' in FLAGS else None
    except Exception as e:  # noqa: BLE001 (a config file can raise anything)
        fail(_one_line(e, argv))
    import ml_collections

    if (value is not None or path is not None) and not isinstance(value, ml_collections.ConfigDict):
        fail(
            f'config file {path}: get_config() returned '
            f'{"None" if value is None else "a " + type(value).__name__}; it must return an '
            'ml_collections.ConfigDict'
        )
    given = [a.split('=')[0][len('--config.') :] for a in argv if a.startswith('--config.')]
    for name in sorted({n for n in given if given.count(n) > 1}):
        field = value
        for part in name.split('.'):
            field = field.get(part) if isinstance(field, ml_collections.ConfigDict) else None
        if isinstance(field, tuple):  # config_flags appends each one to the tuple
            fail(
                f'--config.{name} is given {given.count(name)} times; give the whole tuple '
                f"once, e.g. --config.{name}='(20,40)'"
            )
    if len(rest) > 1 and not command.positional:
        fail(f'unexpected argument {rest[1]!r} (flags are --name=value; see --help)')
    return rest


def _help(name: str, command: Command) -> str:
    """The command's description and its flags."""
    doc = ' '.join(' '.join(command.run.__doc__.split('\n\n')[0].split()).split())
    lines = [
        f'usage: resnet-jax {name} [--flag=value ...]'
        f'{" " + command.positional if command.positional else ""}',
        '',
        textwrap.fill(doc, 88),
        '',
        'flags:',
    ]
    defined = {
        f.name: f
        for module in {__name__, cli_shared.__name__, command.define.__module__}
        for f in FLAGS.get_flags_for_module(module)
    }
    entries = [
        (f'--{f.name}', f'{f.help}{"" if f.default is None else f" (default: {f.default_as_str})"}')
        for f in sorted(defined.values(), key=lambda f: f.name)
    ]
    if 'config' in defined:
        entries.append(
            (
                '--config.<field>=<value>',
                'any field of the config (every one is documented in resnet_jax/config.py)',
            )
        )
    for flag, text in entries:
        lines.append(f'  {flag}')
        lines.append(textwrap.fill(text, 88, initial_indent=' ' * 6, subsequent_indent=' ' * 6))
    return '\n'.join(lines)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = [f'  {name:<{width}}  {c.summary}' for name, c in COMMANDS.items()]
    return '\n'.join(
        [
            'usage: resnet-jax COMMAND [--flag=value ...]',
            '',
            'commands:',
            *rows,
            '',
            "'resnet-jax COMMAND --help' lists a command's flags.",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    """``resnet-jax COMMAND ...`` (``argv``: the whole command line, sys.argv's form)."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ('-h', '--help', 'help'):
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    name = argv[1]
    command = COMMANDS.get(name)
    if command is None:
        fail(f'unknown command {name!r}; commands: {", ".join(COMMANDS)}')
    # config_flags reads the command line (sys.argv) when its flag is defined, to define the
    # --config.<field> overrides: the command's own line, a shipped config named as a path.
    sys.argv = [f'resnet-jax {name}', *resolved_config(argv[2:])]
    try:
        command.define()
    except Exception as e:  # noqa: BLE001 (a config file can raise anything)
        fail(_one_line(e, sys.argv))
    if any(a in ('-h', '--help', '--helpfull', '-?') for a in argv[2:]):
        print(_help(name, command))
        sys.exit(0)
    app.run(command.run, argv=list(sys.argv), flags_parser=lambda args: _parse(command, args))


def run() -> None:
    """The console script ``resnet-jax``."""
    main()
