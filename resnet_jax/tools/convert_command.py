"""``resnet-jax convert``: weights from torchvision, timm, transformers or Keras into a
workdir, or a workdir's out as a torchvision state dict.

    resnet-jax convert --input=r50.pth --output=workdirs/r50_tv      # --from=auto, the net inferred
    resnet-jax convert --to=torchvision --workdir=workdirs/r50 --output=r50.safetensors"""

from __future__ import annotations

import sys

from absl import flags

from resnet_jax.cli_shared import fail, quiet, workdir_flag

FLAGS = flags.FLAGS


def define() -> None:
    from resnet_jax.tools import convert

    flags.DEFINE_enum(
        'from',
        'auto',
        ['auto', *convert.SOURCES],
        'Where the weights come from; auto tells by the file: .h5/.keras '
        '(Keras), a folder with config.json (transformers), a .safetensors/.pth/'
        '.pt/.bin file by its names (torchvision and timm share them).',
    )
    flags.DEFINE_string(
        'input',
        None,
        'The weights: a .safetensors/.pth/.pt/.bin state dict '
        '(torchvision, timm), a transformers save_pretrained folder, an .h5 or '
        '.keras model (Keras).',
    )
    flags.DEFINE_enum(
        'model',
        None,
        list(convert.IMAGENET_DEPTHS),
        'The network (default: inferred from the weights; when given, checked against them).',
    )
    flags.DEFINE_string(
        'output',
        None,
        'The workdir to write (evaluate and '
        '--config.init_from read it); with --to, the file to write '
        '(.safetensors or .pth).',
    )
    flags.DEFINE_enum(
        'to',
        None,
        ['torchvision'],
        "The other direction: a workdir's latest "
        "weights as torchvision's state dict (needs --workdir and --output); "
        'a network torchvision does not compute is refused.',
    )
    flags.DEFINE_bool(
        'allow_nonfinite',
        False,
        'Convert weights holding NaN or Inf (refused by default, naming the first such tensor).',
    )
    flags.DEFINE_bool('overwrite', False, 'With --to: replace an existing --output file.')
    workdir_flag(
        None,
        'With --to: the run (or converted weights) to write out; its '
        'config.json says which network it is.',
    )
    flags.mark_flag_as_required('output')


def _resolve(path: str):
    """``path`` as an epath.Path (local or a bucket URL), or the one-line refusal."""
    from resnet_jax import paths
    from resnet_jax.config import ConfigError

    try:
        return paths.resolve(path)
    except ConfigError as e:
        fail(str(e))


def run(argv: list[str]) -> None:
    """Converts torchvision, timm, Hugging Face transformers or Keras ResNet weights into a
    workdir of this library, or (--to=torchvision) a workdir's weights into a state dict
    torchvision's resnets load strictly."""
    del argv
    import warnings

    from resnet_jax import paths

    if FLAGS.to:
        _to_torchvision()
        return
    if FLAGS.workdir is not None:
        fail(
            '--workdir is read with --to=torchvision; converting into this library, '
            '--output names the workdir to write'
        )
    if FLAGS.input is None:
        fail('--input is required (or --to=torchvision --workdir=W to convert the other way)')
    source, output = _resolve(FLAGS.input), _resolve(FLAGS.output)
    if not source.exists():
        fail(f'{FLAGS.input} does not exist')
    try:
        paths.check_not_dangling(output)
    except ValueError as e:
        fail(f'--output={e}')
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        fail(
            f'--output={FLAGS.output} exists and is not an empty folder; converted weights '
            'go into a new workdir'
        )
    from resnet_jax.tools import convert

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always', UserWarning)
            model, variables, source = convert.load_weights(
                FLAGS.input,
                FLAGS.model,
                kind=FLAGS['from'].value,
                allow_nonfinite=FLAGS.allow_nonfinite,
            )
        for warning in caught:  # a stripped prefix: one line each
            if issubclass(warning.category, UserWarning):
                print(f'warning: {warning.message}', file=sys.stderr, flush=True)
        quiet()
        out = convert.save_converted(model, variables, FLAGS.model, source, FLAGS.output)
    except (ValueError, TypeError, ImportError, OSError) as e:
        fail(str(e).splitlines()[0])
    print(
        f'wrote {out} ({convert.table1_name(model)} from {source}, preprocessing '
        f'{convert.PREPROCESSING[source]}); evaluate with: resnet-jax evaluate '
        f'--workdir={out} --protocol=ten_crop'
    )


def _to_torchvision() -> None:
    """``--to=torchvision``: the workdir's network checked, then its latest good
    checkpoint written as a torchvision state dict (nothing is written when refused)."""
    if FLAGS['from'].present or FLAGS.input is not None:
        fail(
            '--to=torchvision reads --workdir; --from and --input are for converting '
            'into this library'
        )
    if FLAGS.workdir is None:
        fail('--to=torchvision needs --workdir (the run to write out)')
    from resnet_jax import paths

    output = _resolve(FLAGS.output)
    if output.suffix not in ('.safetensors', '.pth', '.pt'):
        fail(f'--output={output}: write a .safetensors, .pth or .pt file')
    try:
        paths.check_new_file(output, FLAGS.overwrite)
    except ValueError as e:
        fail(f'--output={e}')
    workdir = _resolve(FLAGS.workdir)
    if not workdir.is_dir():
        fail(
            f'{FLAGS.workdir} does not exist'
            if not workdir.exists()
            else f'{FLAGS.workdir} is not a folder'
        )
    if output.suffix != '.safetensors':
        try:  # before anything imports TensorFlow (the other order can crash the process)
            import torch  # noqa: F401
        except ImportError:
            fail(
                f"writing {output.name} needs torch: pip install 'resnet_jax[interop]' "
                '(a .safetensors file needs no torch)'
            )
    from resnet_jax.tools import convert
    from resnet_jax.training import runs

    quiet()
    try:
        model = convert.check_torchvision(FLAGS.workdir)  # before reading any weights
        variables, step = runs.load_variables(FLAGS.workdir)
        convert.to_torchvision(
            variables,
            FLAGS.workdir,
            path=output,
            overwrite=FLAGS.overwrite,
            allow_nonfinite=FLAGS.allow_nonfinite,
        )
    except (ValueError, TypeError, ImportError, OSError) as e:
        fail(str(e).splitlines()[0])
    name = convert.table1_name(model)
    print(
        f'wrote {output} ({name}, step {step} of {FLAGS.workdir}); load with: '
        f'torchvision.models.{name}().load_state_dict(state_dict, strict=True)'
    )
