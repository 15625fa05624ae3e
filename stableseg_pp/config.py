"""Where the shipped Hydra configs are, and composing them outside ``fit`` (``segment``, the SLURM launcher, tests).

The configs stand at the top of the checkout (``configs/``) and ship inside the
package as ``stableseg_pp.configs`` (setup.py maps the folder), so an installed
``stableseg_pp`` finds them from any directory. Users add or override config groups from their own
folder with Hydra's ``--config-dir`` (``fit``) or ``hydra.searchpath``
(docs/configs.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig


def _config_dir() -> str:
    """``stableseg_pp.configs`` (a wheel, or an editable install mapping the checkout's ``configs/``); the
    checkout's ``configs/`` when the project is only on ``PYTHONPATH`` (no install, no mapping)."""
    try:
        return str(resources.files("stableseg_pp.configs"))
    except ModuleNotFoundError:
        return str(Path(__file__).resolve().parent.parent / "configs")


CONFIG_DIR = _config_dir()


def compose_config(overrides: Sequence[str] = (), config_name: str = "fit") -> DictConfig:
    """The composed ``fit`` config with ``overrides`` (``hydra.searchpath=[...]`` adds the user's config folders)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


# run settings that left the methods' nodes (2026-12): a user's old override is told where the key went
MOVED = {
    **{f"zero_shot.{k}": f"stage0.{k}" for k in ("splits", "segmenter", "site_weights", "n_overlays", "writer_threads")},
    **{f"emerdiff.{k}": f"emerdiff_steps.{k}" for k in ("clusters", "kmeans_images", "kmeans_iterations", "score_side")},
}


def compose_checked(overrides: Sequence[str] = (), config_name: str = "fit") -> DictConfig:
    """:func:`compose_config`, with a bad override (an unknown config group option, a key that does not exist, a
    value that does not parse) as one :class:`~stableseg_pp.runtime.errors.ConfigError` line (Hydra's hint kept)."""
    from hydra.errors import HydraException, MissingConfigException

    from stableseg_pp.runtime.errors import ConfigError, one_line

    try:
        return compose_config(overrides, config_name)
    except HydraException as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        message = "; ".join(lines[:2]) if len(lines) <= 2 else one_line(err)  # Hydra's hint (e.g. "use +key=...")
        if isinstance(err, MissingConfigException) and err.options:
            message += f"; available: {', '.join(err.options)}"
        for item in overrides:
            if (key := item.lstrip("+~").split("=")[0]) in MOVED:
                message += f"; {key} is now {MOVED[key]}"
        raise ConfigError(message) from err


BASE_MARK = "# @base"  # a line in a group option that only other options build on (``data/common``): not a choice


def config_groups(folders: Iterable[str | Path] = ()) -> dict[str, list[str]]:
    """Each config group (a folder of the shipped configs or of ``folders``) and the options a user chooses from: its
    yaml files, less the bases marked with a ``# @base`` line. Read from the files, without composing anything."""
    options: dict[str, set[str]] = {}
    for root in (Path(CONFIG_DIR), *map(Path, folders)):
        for path in root.glob("*/*.yaml"):
            try:
                is_base = any(line.strip() == BASE_MARK for line in path.read_text().splitlines())
            except OSError:
                continue
            if not is_base:
                options.setdefault(path.parent.name, set()).add(path.stem)
    return {group: sorted(names) for group, names in sorted(options.items())}


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets a user error of the built class through as itself.

    Hydra wraps whatever a constructor raises in ``InstantiationException``; a
    :class:`~stableseg_pp.runtime.errors.UserError` (a clear message about a
    setting) must reach the command line as one line, so it is unwrapped.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from stableseg_pp.runtime.errors import UserError

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, UserError):
            raise _named_where_nested(cause, node, str(err)) from None
        raise


def _named_where_nested(error: Exception, node: DictConfig, wrapped: str) -> Exception:
    """A nested node's error names its own key (``labeler.first_round.weigh_maps``), not its parent's: a built class
    names its settings by the node it usually is (``labeler.weigh_maps``), and Hydra's wrapper says which node raised
    (``full_key: labeler.first_round``)."""
    own = node._get_full_key(None) if isinstance(node, DictConfig) else ""
    raised = wrapped.rpartition("full_key: ")[2].strip() if "full_key: " in wrapped else ""
    message = str(error)
    if own and raised.startswith(own + ".") and message.startswith(own + ".") and len(error.args) == 1:
        error.args = (raised + message[len(own) :],)
    return error
