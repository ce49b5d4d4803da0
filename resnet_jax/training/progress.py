"""The training run's progress line, printed on process 0 and written as scalars:

[12,800/64,000] 20.0% | 2,350 img/s (588/device) | elapsed 12m03s | ETA 1h42m | loss 0.4132
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

# The scalars written for TensorBoard; the console shows them as the progress line.
SCALARS = ('steps_per_sec', 'images_per_sec', 'images_per_sec_per_device', 'eta_seconds')


def print_line(line: str) -> None:
    """Prints ``line`` in one write, so that other threads' lines never cut into it."""
    sys.stdout.write(line + '\n')
    sys.stdout.flush()


def format_duration(seconds: float) -> str:
    """``42s``, ``12m03s``, ``1h42m``, ``2d03h``."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f'{days}d{hours:02d}h'
    if hours:
        return f'{hours}h{minutes:02d}m'
    if minutes:
        return f'{minutes}m{secs:02d}s'
    return f'{secs}s'


def progress_line(
    step: int,
    total: int,
    images_per_sec: float | None,
    num_devices: int,
    elapsed: float,
    eta: float | None,
    loss: float | None,
) -> str:
    """The progress line; ``None``: not measured yet."""
    parts = [f'[{step:,}/{total:,}] {100 * step / total:.1f}%']
    if images_per_sec is not None:
        parts.append(f'{images_per_sec:,.0f} img/s ({images_per_sec / num_devices:,.0f}/device)')
    parts.append(f'elapsed {format_duration(elapsed)}')
    parts.append(f'ETA {format_duration(eta) if eta is not None else "?"}')
    if loss is not None:
        parts.append(f'loss {loss:.4f}')
    return ' | '.join(parts)


class Progress:
    """Reports the loop's progress when asked and whenever ``every_secs`` passed without a
    line: images/s over the steps since the last report, the ETA from the mean speed since
    the first ``start`` (after the compiling step; evaluations and checkpoints included, as
    they recur). ``print_fn=None``: no console (processes other than 0)."""

    def __init__(
        self,
        total_steps: int,
        batch_size: int,
        num_devices: int,
        start_time: float,
        write_scalars: Callable[[int, dict], None],
        print_fn: Callable[[str], None] | None = print,
        every_secs: float = 30.0,
        clock: Callable[[], float] = time.time,
    ):
        self.total_steps, self.batch_size, self.num_devices = total_steps, batch_size, num_devices
        self.start_time, self.write_scalars, self.print_fn = start_time, write_scalars, print_fn
        self.every_secs, self.clock = every_secs, clock
        self._first: tuple[int, float] | None = None  # (step, time) speeds count from
        self._last: tuple[int, float] | None = None  # the previous report
        self.last_report_time = clock()

    def start(self, step: int) -> None:
        """Marks ``step`` as done now: speeds count from here."""
        if self._first is None:
            self._first = self._last = (step, self.clock())

    def due(self) -> bool:
        return self.clock() - self.last_report_time >= self.every_secs

    def report(self, step: int, loss: float | None = None) -> str:
        """Prints the line for ``step`` and writes its scalars; returns the line."""
        now = self.clock()
        self.start(step)
        images_per_sec = eta = None
        scalars = {}
        (first_step, first_time), (last_step, last_time) = self._first, self._last
        if step > last_step and now > last_time:
            steps_per_sec = (step - last_step) / (now - last_time)
            images_per_sec = steps_per_sec * self.batch_size
            scalars = {
                'steps_per_sec': steps_per_sec,
                'images_per_sec': images_per_sec,
                'images_per_sec_per_device': images_per_sec / self.num_devices,
            }
        if step > first_step and now > first_time:
            mean_steps_per_sec = (step - first_step) / (now - first_time)
            eta = (self.total_steps - step) / mean_steps_per_sec
            scalars['eta_seconds'] = eta
        line = progress_line(
            step,
            self.total_steps,
            images_per_sec,
            self.num_devices,
            now - self.start_time,
            eta,
            loss,
        )
        if scalars:
            self.write_scalars(step, scalars)
        if self.print_fn is not None:
            self.print_fn(line)
        self._last = (step, now)
        self.last_report_time = now
        return line
