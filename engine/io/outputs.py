"""Output files of command-line tools: never replace an input, never replace a file without ``--overwrite``."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- outputs
def check_output_path(path: str | os.PathLike, *, inputs=(), overwrite: bool = False, flag: str = "the output") -> Path:
    """Refuse an output file that would replace an input, or an existing file without ``overwrite``.

    Parameters
    ----------
    path
        The file a command is about to write.
    inputs
        Files or folders the command reads (data files, 10x folders, model folders). The output may not be
        one of these files nor lie inside one of these folders, whatever ``overwrite`` says.
    overwrite
        Allow replacing an existing file that is not an input.
    flag
        Name of the option, for the message (``"--confusion"``).

    Returns
    -------
    pathlib.Path
        ``path`` as a Path (not resolved).

    Raises
    ------
    ConfigError
        The output is an input file, lies in an input folder, is a folder, or exists and ``overwrite`` is
        False. Nothing is written.
    """
    out = Path(path).expanduser()
    target = out.resolve()
    for inp in inputs:
        if inp is None:
            continue
        src = Path(inp).expanduser().resolve()
        if target == src or (src.is_dir() and src in target.parents):
            raise ConfigError(
                f"{flag} would overwrite an input", found=f"{out} (input {inp})",
                expected="a new file outside the input data and model",
                fix=f"choose another file name for {flag}; inputs are never overwritten, not even with --overwrite",
            )
    if out.is_dir():
        raise ConfigError(f"{flag} is a folder", found=str(out), expected="a file name")
    if out.exists() and not overwrite:
        raise ConfigError(f"{flag} already exists", found=str(out), expected="a new file name",
                          fix="choose another name, or pass --overwrite to replace it")
    return out
